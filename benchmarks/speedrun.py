"""Time to a target loss on character-level Shakespeare: tinyformer's speedrun preset against nanoGPT's baby GPT, on
the same machine in the same run.

1. nanoGPT's own train.py (a checkout passed as --nanogpt; never shipped with tinyformer) trains its baby GPT for
   `--iters` iterations on our token files (benchmarks/train_speed.py prepares them). Its time is the sum of the
   per-iteration times it logs for iterations 0 .. iters-1, its evaluations included. It runs before tinyformer's
   seeds and again after them, and the mean of the two times is the anchor (the machine's speed drifts).
2. The target L* is the validation loss of nanoGPT's final model, estimated as the mean cross-entropy over
   `--eval_batches` random batches of 12 windows of 64 characters of the validation split (fp32, fixed windows).
3. tinyformer trains `--preset speedrun-shakespeare-char --target_loss L*` for each seed; its evaluations (the same
   estimator: 300 random batches of 12 x 64 from the validation split) stop it at the first one at or below L*. One
   costs as much as ~60 training steps, so the points come every 25 iterations and `--target_gate 0.025` skips those
   where the validation loss predicted from training (the mean training loss since the last point plus the gap
   between the two at the last evaluation) is still more than 0.025 above L*. Its time is the training loop's wall time as `tinyformer train` reports it, evaluations and checkpoints
   included. Its final model is then scored on nanoGPT's fixed windows too (`val_same_windows`): a seed reaches L*
   when that score is at most L*.
4. Prints tinyformer's time over nanoGPT's time per seed; with --ablation, the preset with one lever put back to the
   baby GPT's choice per row (bf16 autocast and Newton-Schulz -> fp32, Muon -> AdamW, the 1000-iteration schedule
   with 20 warmup steps -> nanoGPT's 2000 with 100, rotary/RMSNorm/no biases -> learned positions/LayerNorm/biases,
   gated evaluations every 25 -> every 100), each row's time to L*.

Rows go to --csv (one per tinyformer run). References: karpathy/nanoGPT (the baby GPT); Jordan et al. 2024,
modded-nanogpt (time to a target validation loss as the measure of a training recipe).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import append_rows, machine_name, now  # benchmarks/common.py
from train_speed import NANOGPT_ITER, nanogpt_command, nanogpt_workdir

PRESET = "speedrun-shakespeare-char"
# every run's evaluations: a point every 25 iterations, run where the validation loss predicted from training is
# within 0.025 of L* (twice the standard error of a 25-step mean of training loss: its steps' losses scatter by 0.063)
EVALUATIONS = ["--eval_interval", "25", "--target_gate", "0.025"]
ABLATIONS = {  # lever -> the options that put the baby GPT's choice back
    "all levers": [],
    "fp32 (no bf16 autocast or Newton-Schulz)": ["--dtype", "float32"],
    "AdamW (no Muon)": ["--optimizer", "adamw"],
    "baby schedule": ["--max_iters", "2000", "--lr_decay_iters", "2000", "--warmup_iters", "100"],
    "baby architecture": ["--pos", "learned", "--norm", "layernorm", "--bias", "true"],
    "evaluations every 100, ungated": ["--eval_interval", "100", "--target_gate", "-1"],
}


@torch.no_grad()
def val_loss(logits_of, val_ids: np.ndarray, batches: int, seed: int = 0, batch: int = 12, block: int = 64):
    """(mean, standard error) of the cross-entropy of `batches` random batches of `batch` windows of `block` tokens of
    val_ids, in fp32; the windows are fixed by `seed`, so two models are scored on the same ones."""
    gen = torch.Generator().manual_seed(seed)
    data = torch.from_numpy(np.asarray(val_ids, dtype=np.int64))
    losses = []
    for _ in range(batches):
        start = torch.randint(len(data) - block, (batch,), generator=gen)
        x = torch.stack([data[s:s + block] for s in start.tolist()])  # (batch, block)
        y = torch.stack([data[s + 1:s + 1 + block] for s in start.tolist()])
        losses.append(F.cross_entropy(logits_of(x).float().flatten(0, 1), y.flatten()).item())
    return float(np.mean(losses)), float(np.std(losses, ddof=1) / np.sqrt(batches))


def run_nanogpt(nanogpt_dir, data_dir, iters, val_ids, eval_batches):
    """(seconds of its `iters` iterations, their median ms, L*: its final model's val_loss)."""
    work = nanogpt_workdir(nanogpt_dir, data_dir)
    try:
        log = subprocess.run(nanogpt_command(work, iters, always_save=True), cwd=work, capture_output=True,
                             text=True, check=True).stdout
        ms = [float(t) for it, t in NANOGPT_ITER.findall(log) if int(it) < iters]
        sys.path.insert(0, str(work))
        from model import GPT, GPTConfig  # nanoGPT's model.py, from the checkout
        ckpt = torch.load(work / "out" / "ckpt.pt", map_location="cpu", weights_only=False)
        if ckpt["iter_num"] != iters:
            raise RuntimeError(f"nanoGPT's last checkpoint is from iteration {ckpt['iter_num']}, not {iters}")
        model = GPT(GPTConfig(**ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])
        model.eval()
        target, _ = val_loss(lambda x: model(x, x)[0], val_ids, eval_batches)  # targets given: logits at every position
    finally:
        sys.path.remove(str(work)) if str(work) in sys.path else None
        shutil.rmtree(work)
    return sum(ms) / 1000, float(np.median(ms[5:])), target


def run_tinyformer(data_dir, target, seed, options, val_ids, eval_batches):
    """One tinyformer run to the target: dict of its seconds, iterations, in-training val loss and the score of its
    final model on nanoGPT's windows."""
    import tinyformer
    out = tempfile.mkdtemp(prefix="tf-speedrun-")
    cmd = [sys.executable, "-m", "tinyformer", "train", "--data", str(data_dir), "--preset", PRESET,
           "--target_loss", f"{target:.6f}", "--seed", str(seed), "--out_dir", out, "--progress", "false",
           "--plot", "false", "--eval_iters", str(eval_batches), "--log_interval", "1", *EVALUATIONS, *options]
    started = time.perf_counter()
    log = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    process_s = time.perf_counter() - started
    m = re.search(r"for (\d+) iterations in ([\d.]+) s: val loss ([\d.]+)", log)
    model = tinyformer.load(out).eval()
    same, se = val_loss(model, val_ids, eval_batches)
    c = model.config
    rows = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    shutil.rmtree(out)
    # where the time goes: the steps that did not evaluate, and the rest (evaluations with their checkpoints and steps,
    # the last evaluation, the last checkpoint)
    step_ms = [r["dt_ms"] for r in rows if "dt_ms" in r and "val_loss" not in r]
    seconds = float(m.group(2))
    return dict(iters=int(m.group(1)), seconds=seconds, val_loss=float(m.group(3)), process_s=process_s,
                val_same_windows=same, val_same_windows_se=se, reached=same <= target,
                ms_per_iter=float(np.median(step_ms[5:])), steps_s=sum(step_ms) / 1000,
                eval_s=seconds - sum(step_ms) / 1000,
                architecture=f"{c.pos} positions, {c.norm}, {'biases' if c.bias else 'no biases'}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nanogpt", required=True, help="path to a karpathy/nanoGPT checkout (train.py, model.py)")
    p.add_argument("--iters", type=int, default=2000, help="nanoGPT's iterations (its baby GPT run: 2000)")
    p.add_argument("--seeds", type=int, default=3, help="tinyformer seeds (1337, 1338, ...)")
    p.add_argument("--eval_batches", type=int, default=300, help="batches of 12 x 64 in every val loss estimate")
    p.add_argument("--ablation", action="store_true", help="also time the preset with each lever put back")
    p.add_argument("--ablation_seeds", type=int, default=1, help="seeds per ablation row")
    p.add_argument("--csv", default="benchmarks/results/speedrun.csv")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more tinyformer train options")
    args = p.parse_args(argv)
    from tinyformer.data import TokenData, cached_prepare, default_cache_dir
    data_dir = cached_prepare("shakespeare", default_cache_dir(), "char")
    val_ids = np.asarray(TokenData(data_dir).splits["val"])
    ng_before, ng_ms, target = run_nanogpt(args.nanogpt, data_dir, args.iters, val_ids, args.eval_batches)
    print(f"nanoGPT: {args.iters} iterations in {ng_before:.1f} s ({ng_ms:.1f} ms/iter); L* = {target:.4f} "
          f"(mean over {args.eval_batches} batches of 12 x 64)")
    results = []
    for s in range(args.seeds):
        results.append(("all levers", s, run_tinyformer(data_dir, target, 1337 + s, args.extra, val_ids,
                                                        args.eval_batches)))
    # the machine's speed drifts by 10-20% over minutes: nanoGPT again after the seeds, and the mean of its two
    # times as the anchor
    ng_after, _, _ = run_nanogpt(args.nanogpt, data_dir, args.iters, val_ids, args.eval_batches)
    ng_s = (ng_before + ng_after) / 2
    print(f"nanoGPT again: {ng_after:.1f} s; the anchor is their mean, {ng_s:.1f} s")
    if args.ablation:
        for lever in (lever for lever in ABLATIONS if lever != "all levers"):
            for s in range(args.ablation_seeds):
                results.append((lever, s, run_tinyformer(data_dir, target, 1337 + s, ABLATIONS[lever] + args.extra,
                                                          val_ids, args.eval_batches)))
    rows = []
    for lever, s, r in results:
        ratio = r["seconds"] / ng_s
        print(f"{lever:>26} seed {1337 + s}: {r['seconds']:6.1f} s, {r['iters']:4d} iterations, val {r['val_loss']:.4f}"
              f" (on nanoGPT's windows {r['val_same_windows']:.4f} +- {r['val_same_windows_se']:.4f}), "
              f"{r['ms_per_iter']:.1f} ms/iter, steps "
              f"{r['steps_s']:.1f} s + evaluations and checkpoints {r['eval_s']:.1f} s -> {ratio:.3f}x nanoGPT's time"
              + ("" if r["reached"] else "  (did NOT reach L*)"))
        rows.append(dict(timestamp=now(), machine=machine_name(), torch=torch.__version__,
                         threads=torch.get_num_threads(), lever=lever, seed=1337 + s, nanogpt_iters=args.iters,
                         nanogpt_s=f"{ng_s:.2f}", nanogpt_ms_per_iter=f"{ng_ms:.2f}", target_loss=f"{target:.4f}",
                         eval_batches=args.eval_batches,
                         tinyformer_s=f"{r['seconds']:.2f}", process_s=f"{r['process_s']:.2f}", iters=r["iters"],
                         val_loss=f"{r['val_loss']:.4f}", val_same_windows=f"{r['val_same_windows']:.4f}",
                         val_same_windows_se=f"{r['val_same_windows_se']:.4f}",
                         ms_per_iter=f"{r['ms_per_iter']:.2f}", steps_s=f"{r['steps_s']:.2f}",
                         eval_s=f"{r['eval_s']:.2f}",
                         reached=r["reached"], time_vs_nanogpt=f"{ratio:.3f}",
                         options=" ".join(EVALUATIONS + ABLATIONS[lever] + args.extra),
                         nanogpt_s_before=f"{ng_before:.2f}", nanogpt_s_after=f"{ng_after:.2f}",
                         architecture=r["architecture"]))
    main_rows = [r for r in rows if r["lever"] == "all levers"]
    ratios = [float(r["time_vs_nanogpt"]) for r in main_rows]
    print(f"tinyformer / nanoGPT time: {np.mean(ratios):.3f}x mean over {len(ratios)} seeds "
          f"({min(ratios):.3f}..{max(ratios):.3f}); every seed reached L*: {all(r['reached'] for r in main_rows)}")
    append_rows(args.csv, list(rows[0]), rows)
    print(f"rows appended to {args.csv}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
