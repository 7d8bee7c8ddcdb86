"""Training speed of the baby Shakespeare preset on this machine, against nanoGPT's own train.py in the same run.

Measures tinyformer's ms/iter, tokens/s and final validation loss for `--iters` iterations of the
baby-shakespeare-char preset (4 layers, 4 heads, 128 wide, block 64, batch 12), and, when `--nanogpt DIR` points at a
checkout of karpathy/nanoGPT (not shipped with tinyformer), runs nanoGPT's train.py with the same settings on the
same token files and device, so the speed is reported as a ratio against that anchor. Rows go to a CSV (--csv).
`--iters 60` is the suite's quick look (`tinyformer bench --quick`).

Reference: karpathy/nanoGPT README, "I only have a macbook" (the baby GPT CPU command line).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import append_rows, machine_name, now  # benchmarks/common.py


def eval_interval(iters):
    """The preset's 250, or `iters` when 250 does not divide it: nanoGPT evaluates only at multiples of its interval,
    so its last validation loss is the one after the last iteration, as tinyformer's is."""
    return 250 if iters % 250 == 0 else iters


def run_tinyformer(data_dir, iters, extra, device="cpu"):
    out = tempfile.mkdtemp(prefix="tf-speed-")
    cmd = [sys.executable, "-m", "tinyformer", "train", "--data", str(data_dir), "--preset", "baby-shakespeare-char",
           "--max_iters", str(iters), "--lr_decay_iters", str(iters), "--out_dir", out, "--progress", "false",
           "--plot", "false", "--log_interval", "1", "--eval_interval", str(eval_interval(iters)), "--device", device,
           *extra]
    subprocess.run(cmd, check=True)
    rows = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    steps = [r["dt_ms"] for r in rows if "dt_ms" in r and "val_loss" not in r][5:]  # skip warm-up and eval steps
    val = [r["val_loss"] for r in rows if "val_loss" in r][-1]
    shutil.rmtree(out)
    return float(np.median(steps)), val


def nanogpt_workdir(nanogpt_dir, data_dir) -> Path:
    """A temporary folder holding nanoGPT's train.py, model.py, configurator.py and shakespeare_char config, and our
    token files as its data/shakespeare_char (raw uint16 and meta.pkl, as its prepare.py writes them)."""
    from tinyformer.data import TokenData
    work = Path(tempfile.mkdtemp(prefix="nanogpt-"))
    for f in ("train.py", "model.py", "configurator.py"):
        shutil.copy(Path(nanogpt_dir) / f, work / f)
    (work / "config").mkdir()
    shutil.copy(Path(nanogpt_dir) / "config" / "train_shakespeare_char.py", work / "config")
    d = TokenData(data_dir)
    ddir = work / "data" / "shakespeare_char"
    ddir.mkdir(parents=True)
    for split in ("train", "val"):
        np.asarray(d.splits[split], dtype=np.uint16).tofile(ddir / f"{split}.bin")
    vocab = d.tokenizer.get_vocab()
    itos = {i: s for s, i in vocab.items()}
    with open(ddir / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(vocab), "itos": itos, "stoi": vocab}, f)
    return work


def nanogpt_command(work, iters, device="cpu", always_save=False) -> list:
    """nanoGPT's baby GPT command line ("I only have a macbook"), logging every iteration's time."""
    return [sys.executable, "train.py", "config/train_shakespeare_char.py", f"--device={device}", "--compile=False",
            "--eval_iters=20", f"--eval_interval={eval_interval(iters)}", "--log_interval=1", "--block_size=64",
            "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", f"--max_iters={iters}",
            f"--lr_decay_iters={iters}", "--dropout=0.0", f"--always_save_checkpoint={always_save}",
            f"--out_dir={Path(work) / 'out'}"]


NANOGPT_ITER = re.compile(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms")  # one line per iteration of its log


def run_nanogpt(nanogpt_dir, data_dir, iters, device="cpu"):
    """nanoGPT's baby GPT on our token files: (median ms per iteration, its last validation loss)."""
    work = nanogpt_workdir(nanogpt_dir, data_dir)
    log = subprocess.run(nanogpt_command(work, iters, device), cwd=work, capture_output=True, text=True,
                         check=True).stdout
    times = [float(t) for _, t in NANOGPT_ITER.findall(log)][5:]
    vals = [float(v) for v in re.findall(r"val loss ([\d.]+)", log)]
    shutil.rmtree(work)
    return float(np.median(times)), vals[-1] if vals else float("nan")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--nanogpt", default=None, help="path to a karpathy/nanoGPT checkout to measure as the anchor")
    p.add_argument("--device", default=None, help="cpu, cuda, ... for both runs (default: cuda when present)")
    p.add_argument("--csv", default="benchmarks/results/train_speed.csv")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more tinyformer train options")
    args = p.parse_args(argv)
    from tinyformer.data import cached_prepare, default_cache_dir
    data_dir = cached_prepare("shakespeare", default_cache_dir(), "char")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokens = 12 * 64
    results = {}
    if args.nanogpt:
        results["nanogpt"] = run_nanogpt(args.nanogpt, data_dir, args.iters, device)
    results["tinyformer"] = run_tinyformer(data_dir, args.iters, args.extra, device)
    anchor = results.get("nanogpt", (None, None))[0]
    rows = []
    for impl, (ms, val) in results.items():
        ratio = anchor / ms if anchor else None
        rows.append(dict(timestamp=now(), machine=machine_name(), torch=torch.__version__,
                         threads=torch.get_num_threads(), device=device, impl=impl, iters=args.iters,
                         ms_per_iter=f"{ms:.2f}",
                         tokens_per_s=f"{tokens / ms * 1000:.0f}", val_loss=f"{val:.4f}",
                         speed_vs_nanogpt=f"{ratio:.3f}" if ratio else "", options=" ".join(args.extra)))
        print(f"{impl:>10}: {ms:7.2f} ms/iter, {tokens / ms * 1000:8.0f} tokens/s, val loss {val:.4f}"
              + (f", {ratio:.2f}x nanoGPT's speed" if ratio else ""))
    append_rows(args.csv, list(rows[0]), rows)
    print(f"rows appended to {args.csv}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
