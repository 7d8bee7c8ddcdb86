"""Compression recipes: the compression verbs chained on one model, and the report that compares every stage with the
original (`tinyformer compress --model PATH --recipe ...`).

A recipe is steps joined by "->", each `verb` or `verb:key=value,key=value`, the keys being the verb's own keyword
arguments:

    distill:steps=300 -> prune:method=wanda,sparsity=0.5 -> quantize:bits=8

- `distill`: a student with half the layers (`n_layer=` to choose), initialised from every other teacher layer
  (DistilBERT), trained to match the teacher on the training windows (`steps`, `temperature`, `alpha`, `lr`);
- `prune`, `lowrank`, `quantize`: `prune_`, `lowrank_`, `quantize_` with their own options (data-aware methods get
  the calibration windows);
- `finetune:steps=200`: next-token training on the training windows (after pruning or factoring).

Named recipes (RECIPES) spell out common chains. Each stage is measured: parameters (logical weights: a quantized
or pruned weight still counts its full shape; `nonzero` counts the kept ones), bytes on disk of the saved model,
the evaluation metric, and greedy decode tokens/s, each as a ratio to the original.
"""
from __future__ import annotations

import inspect
import tempfile
import time
from pathlib import Path

import torch

RECIPES = {
    "int8": "quantize:bits=8",
    "int4": "quantize:bits=4,group_size=32",
    "int4-gptq": "quantize:bits=4,group_size=128,method=gptq",
    "wanda50": "prune:method=wanda,sparsity=0.5",
    "distil-prune-int8": "distill:steps=300 -> prune:method=wanda,sparsity=0.5 -> finetune:steps=100 -> "
                         "quantize:bits=8",
}


def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def distill_student(model, data, steps: int = 300, n_layer: int | None = None, temperature: float = 2.0,
                    alpha: float = 0.5, learning_rate: float = 5e-4, batch_size: int = 16):
    """The `distill` step: a student with n_layer blocks (default half) taken from evenly spaced teacher blocks
    (every other one for half), distilled from `model` on the (N, T) training windows. Returns the student."""
    from tinyformer.compress.distill import distill, student_from_teacher
    n = model.config.n_layer
    k = n // 2 if n_layer is None else n_layer
    if not 1 <= k < n:
        raise ValueError(f"distill: n_layer must be in 1..{n - 1} (the teacher has {n}), got {k}")
    layers = sorted({round(i * n / k) for i in range(k)})
    student = student_from_teacher(model, layers=layers)
    return distill(model, student, data, steps, temperature=temperature, alpha=alpha, learning_rate=learning_rate,
                   batch_size=batch_size)


def finetune(model, data, steps: int = 100, lr: float = 5e-5, batch_size: int = 4):
    """The `finetune` step: next-token training of every float weight on the training windows. Weights that are
    exactly zero (pruned) get zero gradients, so with no weight decay they stay zero and the sparsity survives."""
    from tinyformer.compress.lowrank import finetune as lm_finetune
    from tinyformer.model import Linear
    hooks = []
    for m in model.modules():
        if type(m) is Linear and m.weight.requires_grad:
            keep = m.weight.detach() != 0
            if not bool(keep.all()):
                hooks.append(m.weight.register_hook(lambda g, keep=keep: g * keep))
    try:
        lm_finetune(model, data.reshape(-1), steps, block_size=min(256, data.shape[1] - 1), batch_size=batch_size,
                    lr=lr, weight_decay=0.0, train="all")
    finally:
        for h in hooks:
            h.remove()
    return model


def _verbs():
    from tinyformer.compress import lowrank_, prune_, quantize_
    return {"quantize": quantize_, "prune": prune_, "lowrank": lowrank_, "distill": distill_student,
            "finetune": finetune}


DATA_ARGS = ("model", "calib", "teacher", "student", "data")  # filled in by the runner, not the recipe


def parse_recipe(text: str) -> list[tuple[str, dict]]:
    """'verb:k=v,k=v -> verb' (or a RECIPES name) -> [(verb, kwargs)], checked against each verb's signature."""
    text = RECIPES.get(text.strip(), text)
    verbs = _verbs()
    steps = []
    for part in (p.strip() for p in text.split("->")):
        if not part:
            raise ValueError(f"recipe {text!r} has an empty step")
        verb, _, rest = part.partition(":")
        verb = verb.strip()
        if verb not in verbs:
            raise ValueError(f"recipe step {part!r}: unknown verb {verb!r}; expected one of {', '.join(verbs)} "
                             f"(or a named recipe: {', '.join(RECIPES)})")
        allowed = [n for n in inspect.signature(verbs[verb]).parameters if n not in DATA_ARGS]
        kwargs = {}
        for item in filter(None, (s.strip() for s in rest.split(","))):
            key, eq, val = item.partition("=")
            if not eq or key.strip() not in allowed:
                raise ValueError(f"recipe step {part!r}: {item!r} is not key=value with key one of "
                                 f"{', '.join(allowed)}")
            kwargs[key.strip()] = _value(val.strip())
        steps.append((verb, kwargs))
    return steps


def run_recipe(model, steps, calib, data, log=print):
    """Apply `steps` to `model` (in place where the verb is in place); returns the final model. `calib` (N, T)
    calibration windows; `data` (M, T) training windows for distill/finetune."""
    verbs = _verbs()
    for verb, kwargs in steps:
        t = time.perf_counter()
        fn = verbs[verb]
        params = inspect.signature(fn).parameters
        if verb in ("distill", "finetune"):
            model = fn(model, data, **kwargs)
        else:
            model = fn(model, **kwargs, **({"calib": calib} if "calib" in params else {}))
        log(f"  {verb} {kwargs or ''} done in {time.perf_counter() - t:.1f} s")
    return model


def logical_params(model) -> tuple[int, int]:
    """(weights counted at their full shapes, nonzero ones) over float parameters and quantized linears. A quantized
    head of a tied model (`quantize_(head=True)`) is a second copy of the embedding, not another weight: not counted."""
    from tinyformer.qlinear import QuantLinear
    total = nonzero = 0
    tied_copy = model.lm_head if getattr(model.config, "tie_embeddings", False) else None
    for m in model.modules():
        for p in m.parameters(recurse=False):
            total += p.numel()
            nonzero += int(torch.count_nonzero(p))
        if isinstance(m, QuantLinear) and m is not tied_copy:
            bias = m.bias.numel() if m.bias is not None else 0
            total += m.n_out * m.n_in + bias
            codes = getattr(m, "weight", None)  # int8 codes: a pruned weight stays an exact 0 code
            nonzero += (int(torch.count_nonzero(codes)) if codes is not None else m.n_out * m.n_in) + bias
    return total, nonzero


def disk_bytes(model) -> int:
    with tempfile.TemporaryDirectory() as d:
        model.save(d)
        return sum(f.stat().st_size for f in Path(d).iterdir())


@torch.no_grad()
def decode_tokens_per_s(model, prompt_len: int = 16, new_tokens: int = 64, repeats: int = 3) -> float:
    """Greedy batch-1 decode speed with the KV cache (decoder models): at most `new_tokens`, all within the model's
    context (past it `generate` recomputes the sliding window at every token, which is not cached decoding); the
    best of `repeats` runs after half a second of warm-up runs (a 48-token run of the baby model lasts ~50 ms; with
    one 4-token warm-up the demo's first stage measured 690-710 tokens/s, the same model later ~1,100)."""
    if model.config.arch != "decoder":
        return float("nan")
    prompt_len = min(prompt_len, model.config.max_seq_len // 4)
    new_tokens = min(new_tokens, model.config.max_seq_len - prompt_len)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    while time.perf_counter() - start < 0.5:  # warm-up: at least one run and half a second (the first decode of a
        model.generate(ids, new_tokens, temperature=0)  # process ran 35-40% slower for ~0.2 s: thread pools waking)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        model.generate(ids, new_tokens, temperature=0)
        best = min(best, time.perf_counter() - t)
    return new_tokens / best


def measure(model, evaluate, name: str) -> dict:
    total, nonzero = logical_params(model)
    return {"stage": name, "params": total, "nonzero": nonzero, "bytes": disk_bytes(model),
            "metric": evaluate(model), "tokens_per_s": decode_tokens_per_s(model)}


def report_table(rows: list[dict], metric_name: str) -> str:
    """Markdown table; every column also as a ratio to the first row (the original)."""
    base = rows[0]
    out = [f"| stage | params | nonzero | MB on disk | {metric_name} | decode tokens/s |", "|---|---|---|---|---|---|"]
    for r in rows:
        def rel(k, fmt):
            return f"{fmt.format(r[k])} ({r[k] / base[k]:.2f}x)" if base[k] else fmt.format(r[k])
        out.append(f"| {r['stage']} | {rel('params', '{:,}')} | {rel('nonzero', '{:,}')} | "
                   f"{r['bytes'] / 1e6:.2f} ({r['bytes'] / base['bytes']:.2f}x) | "
                   f"{r['metric']:.3f} ({100 * (r['metric'] / base['metric'] - 1):+.2f}%) | {rel('tokens_per_s', '{:.1f}')} |")
    return "\n".join(out)
