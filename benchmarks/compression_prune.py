"""Pruning on real models (issue #7): perplexity of SmolLM2-135M and of our own sotu-decoder, dense and pruned
(50% magnitude, 50% Wanda, 2:4 magnitude, 2:4 Wanda), and structured pruning (feed-forward neurons, attention heads)
with parameters, bytes on disk and forward / decode tokens/s against the dense model.

Perplexity protocol: benchmarks/compression.py's (its `protocol_data` and `perplexity` are imported, not copied):
the sotu speeches sorted by file name, the last 10 held out (stripped, joined with a blank line), the model's own
tokenizer, the first 16,384 tokens in 32 disjoint windows of 512 (64 of 256 for the sotu-decoder, whose context is
256), each window scored on its own; Wanda's calibration is that script's 32 windows (seed 0) of the other 239
speeches. The sotu-decoder trained on the first 90% of the corpus text, which ends before the held-out speeches (its
validation split, the last 10%, contains them): its perplexity is on text it never trained on.

SmolLM2's packaged weights were stored as 4-bit Q4_1: "dense" here means those weights dequantized to fp32.

References: Sun et al. 2023 (Wanda; their table 2 anchors LLaMA-2-7B at 5.12 dense, 6.42 with 50% Wanda, 14.89 with
50% magnitude); Mishra et al. 2021 (2:4); Zhu & Gupta 2017 (gradual pruning); tinyformer/compress/prune.py.

    python benchmarks/compression_prune.py                      # both models, every variant (hours on 2 CPUs)
    python benchmarks/compression_prune.py --models sotu-decoder --sotu-decoder out/sotu-decoder
    python benchmarks/compression_prune.py --models smollm2 --variants dense wanda50 neurons25-wanda

Each function returns rows (dicts); one CSV row per (model, variant) is appended to --csv
(benchmarks/results/compression_prune.csv) and a markdown table is printed.
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import tinyformer  # noqa: E402
from common import append_rows, machine_name, now, versions  # noqa: E402  (benchmarks/common.py)
from compression import CALIB_WINDOWS, load_model, perplexity, protocol_data  # noqa: E402  (the shared protocol)
from tinyformer.compress import prune_, prune_iterative_  # noqa: E402

# name -> (method, pattern, sparsity); "dense" is the unpruned model
VARIANTS = {
    "dense": None,
    "magnitude50": ("magnitude", "unstructured", 0.5),
    "wanda50": ("wanda", "unstructured", 0.5),
    "magnitude2:4": ("magnitude", "2:4", 0.5),
    "wanda2:4": ("wanda", "2:4", 0.5),
    "neurons25-magnitude": ("magnitude", "neurons", 0.25),
    "neurons25-wanda": ("wanda", "neurons", 0.25),
    "heads33-wanda": ("wanda", "heads", 1 / 3),
}
CSV_FIELDS = ["timestamp", "machine", "torch", "model", "variant", "method", "pattern", "sparsity", "structure",
              "params", "nonzero", "bytes", "ppl", "ppl_vs_dense", "eval_tokens", "window", "calib_windows",
              "forward_tok_s", "decode_tok_s", "dense_forward_tok_s", "dense_decode_tok_s", "forward_speedup",
              "decode_speedup", "reload_max_diff",
              "prune_s", "eval_s"]


# ----------------------------------------------------------------------------------------------------------------------
# measurements
def nonzero_params(model) -> int:
    return sum(int(torch.count_nonzero(p)) for p in model.parameters())


@torch.no_grad()
def save_load(model) -> tuple[int, float]:
    """(bytes on disk of model.save, max |logits difference| of the reloaded model on 16 tokens): a pruned model
    must save and load as it is."""
    x = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as d:
        model.save(d)
        size = sum(f.stat().st_size for f in Path(d).iterdir())
        diff = float((tinyformer.load(d)(x) - model(x)).abs().max())
    return size, diff


@torch.no_grad()
def speeds(model, window: int, min_run_time: float = 2.0) -> tuple[float, float]:
    """(forward tokens/s of one window of `window` tokens, greedy batch-1 decode tokens/s of 32 new tokens after a
    16-token prompt), each the median of torch.utils.benchmark's blocked_autorange."""
    from torch.utils import benchmark
    x = torch.randint(0, model.config.vocab_size, (1, window), generator=torch.Generator().manual_seed(0))
    env = {"model": model, "x": x, "torch": torch}
    with torch.no_grad():
        fwd = benchmark.Timer("model(x)", globals=env).blocked_autorange(min_run_time=min_run_time).median
        dec = benchmark.Timer("model.generate(x[:, :16], 32, temperature=0)", globals=env).blocked_autorange(
            min_run_time=min_run_time).median
    return window / fwd, 32 / dec


def speeds_ab(dense, model, window: int, rounds: int = 3) -> dict:
    """Forward / decode tokens/s of the pruned and the dense model, measured in alternation `rounds` times; the best
    round of each (the least disturbed by other processes on a shared machine) is reported."""
    f_d, d_d, f_p, d_p = [], [], [], []
    for _ in range(rounds):
        a, b = speeds(dense, window)
        c, d = speeds(model, window)
        f_d.append(a), d_d.append(b), f_p.append(c), d_p.append(d)
    return dict(forward_tok_s=round(max(f_p), 1), decode_tok_s=round(max(d_p), 2),
                dense_forward_tok_s=round(max(f_d), 1), dense_decode_tok_s=round(max(d_d), 2),
                forward_speedup=round(max(f_p) / max(f_d), 3), decode_speedup=round(max(d_p) / max(d_d), 3))


def structure_summary(model) -> str:
    """e.g. 'heads 9->6 x30, d_ff 1536->1152 x30' (shapes of the pruned modules against the config)."""
    cfg, parts = model.config, {}
    for m in model.modules():
        if isinstance(m, tinyformer.model.Attention) and m.n_head != cfg.n_head:
            key = f"heads {cfg.n_head}->{m.n_head}"
            parts[key] = parts.get(key, 0) + 1
        elif isinstance(m, tinyformer.model.FeedForward) and getattr(m, "d_ff", cfg.d_ff) != cfg.d_ff:
            key = f"d_ff {cfg.d_ff}->{m.d_ff}"
            parts[key] = parts.get(key, 0) + 1
    return ", ".join(f"{k} x{n}" for k, n in parts.items())


def original(name: str, sotu_dir: str):
    model = load_model(name, Path(sotu_dir))  # compression.py's loader (SmolLM2's GGUF, or the trained folder)
    if model is None:
        raise SystemExit(f"no {name} model to benchmark")
    return model.eval()


def run_model(name: str, variants: list[str], sotu_dir: str = "out/sotu-decoder", n_calib: int = CALIB_WINDOWS,
              iterative_steps: int = 0, log=print, on_row=None, ppl_too: bool = True) -> list[dict]:
    """One row per variant of one model (each a fresh copy of the original): perplexity on the held-out speeches,
    parameters (all, nonzero), bytes on disk and the reloaded model's largest logit difference; structured variants
    also forward / decode tokens/s, measured interleaved with the original's. `on_row(row)` sees each row as soon as
    it is measured (the runs are long on a CPU). ppl_too=False skips the perplexities (sizes and speeds only)."""
    dense = original(name, sotu_dir)
    evals, calib = protocol_data(dense, n_calib)  # (N, W) eval windows, (n_calib, W) calibration windows
    window = evals.shape[1]
    log(f"{name}: {evals.numel()} eval tokens in {evals.shape[0]} windows of {window}, calibration "
        f"{tuple(calib.shape)}")
    rows, dense_ppl = [], None
    torch_v, _ = versions()
    for v in variants:
        spec = VARIANTS[v]
        t = time.perf_counter()
        model = dense if spec is None else prune_(copy.deepcopy(dense), spec[2], spec[0], spec[1], calib=calib)
        prune_s = time.perf_counter() - t
        t = time.perf_counter()
        ppl = perplexity(model, evals) if ppl_too else float("nan")
        eval_s = time.perf_counter() - t
        dense_ppl = ppl if spec is None and ppl_too else dense_ppl
        row = dict(timestamp=now(), machine=machine_name(), torch=torch_v, model=name, variant=v,
                   method=spec[0] if spec else "", pattern=spec[1] if spec else "",
                   sparsity=round(spec[2], 4) if spec else 0.0, structure=structure_summary(model),
                   params=model.num_params(), nonzero=nonzero_params(model), ppl=round(ppl, 4),
                   ppl_vs_dense=round(ppl / dense_ppl, 4) if dense_ppl else "", eval_tokens=evals.numel(),
                   window=window, calib_windows=f"{n_calib}x{window}" if spec and spec[0] == "wanda" else "",
                   prune_s=round(prune_s, 1), eval_s=round(eval_s, 1))
        row["bytes"], row["reload_max_diff"] = save_load(model)
        if spec is not None and spec[1] in ("neurons", "heads"):
            row.update(speeds_ab(dense, model, window))
        log(f"{name} {v}: ppl {ppl:.3f}" + (f" ({ppl / dense_ppl:.3f}x dense)" if dense_ppl else "")
            + f", params {row['params']:,} (nonzero {row['nonzero']:,}), {row['bytes'] / 1e6:.1f} MB (reloaded: "
            f"max |dlogit| {row['reload_max_diff']:.1e}), prune {prune_s:.0f} s, eval {eval_s:.0f} s"
            + (f", forward {row['forward_tok_s']:.0f} vs {row['dense_forward_tok_s']:.0f} tok/s, decode "
               f"{row['decode_tok_s']:.1f} vs {row['dense_decode_tok_s']:.1f} tok/s" if "forward_tok_s" in row
               else "") + f"  [{row['structure']}]" * bool(row["structure"]))
        rows.append(row)
        if on_row:
            on_row(row)
        if model is not dense:
            del model
    if iterative_steps and name == "sotu-decoder":
        rows.append(run_iterative(dense, evals, dense_ppl, iterative_steps, log))
        if on_row:
            on_row(rows[-1])
    return rows


def run_iterative(dense, evals, dense_ppl, steps, log=print) -> dict:
    """50% magnitude reached gradually (cubic schedule, 4 pruning events) during `steps` fine-tune steps on the
    sotu-decoder's own training split (which ends before the held-out speeches), to set against one-shot 50%
    magnitude (the magnitude50 row)."""
    from tinyformer.train import TrainConfig, resolve_data
    data = resolve_data(TrainConfig(data="sotu", tokenizer="bpe", bpe_vocab_size=8192))
    if data.tokenizer.to_str() != dense.tokenizer.to_str():
        raise SystemExit("the prepared sotu dataset's tokenizer is not the sotu-decoder's")
    train_ids = torch.from_numpy(data.splits["train"].astype("int64"))
    model = copy.deepcopy(dense)
    t = time.perf_counter()
    prune_iterative_(model, train_ids, 0.5, steps, "magnitude", n_prunes=4, lr=3e-4, batch_size=4,
                     block_size=evals.shape[1])
    prune_s = time.perf_counter() - t
    ppl = perplexity(model, evals)
    log(f"sotu-decoder iterative magnitude 50% ({steps} fine-tune steps, {prune_s:.0f} s): ppl {ppl:.3f}"
        + (f" ({ppl / dense_ppl:.3f}x dense)" if dense_ppl else ""))
    return dict(timestamp=now(), machine=machine_name(), torch=versions()[0], model="sotu-decoder",
                variant=f"magnitude50-iterative{steps}", method="magnitude", pattern="unstructured", sparsity=0.5,
                structure="", params=model.num_params(), nonzero=nonzero_params(model), bytes=save_load(model)[0],
                ppl=round(ppl, 4), ppl_vs_dense=round(ppl / dense_ppl, 4) if dense_ppl else "",
                eval_tokens=evals.numel(), window=evals.shape[1], prune_s=round(prune_s, 1))


def table(rows) -> str:
    out = ["| model | variant | structure | params | nonzero | MB | ppl | vs dense | fwd tok/s (dense) | "
           "decode tok/s (dense) |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        fwd = f"{r['forward_tok_s']:.0f} ({r['dense_forward_tok_s']:.0f})" if r.get("forward_tok_s") else ""
        dec = f"{r['decode_tok_s']:.1f} ({r['dense_decode_tok_s']:.1f})" if r.get("decode_tok_s") else ""
        ratio = f"{r['ppl_vs_dense']:.3f}" if r["ppl_vs_dense"] != "" else ""
        out.append(f"| {r['model']} | {r['variant']} | {r['structure']} | {r['params'] / 1e6:.2f} M | "
                   f"{r['nonzero'] / 1e6:.2f} M | {r['bytes'] / 1e6:.1f} | {r['ppl']:.3f} | {ratio} | {fwd} | "
                   f"{dec} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["sotu-decoder", "smollm2"], choices=["sotu-decoder", "smollm2"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="dense (when given) runs first: the reference of the ratios")
    p.add_argument("--sotu-decoder", default=str(ROOT / "out" / "sotu-decoder"), help="the trained model's folder")
    p.add_argument("--calib-windows", type=int, default=CALIB_WINDOWS, help="Wanda's calibration windows")
    p.add_argument("--iterative-steps", type=int, default=60, help="sotu-decoder: gradual 50%% magnitude with this "
                                                                   "many fine-tune steps (0 = skip)")
    p.add_argument("--no-ppl", action="store_true", help="sizes and speeds only (structured variants)")
    p.add_argument("--csv", default=str(ROOT / "benchmarks" / "results" / "compression_prune.csv"))
    args = p.parse_args(argv)
    variants = sorted(set(args.variants), key=lambda v: (v != "dense", list(VARIANTS).index(v)))
    rows = []
    for name in args.models:
        rows += run_model(name, variants, args.sotu_decoder, args.calib_windows, args.iterative_steps,
                          on_row=lambda r: append_rows(args.csv, CSV_FIELDS, [r]), ppl_too=not args.no_ppl)
    print(table(rows))


if __name__ == "__main__":
    main()
