"""Helpers shared by the tests: `tiny`, a small seeded model of any architecture, and `assert_close`, an elementwise
comparison that reports the count and the first indices of the mismatches (as the mismatch reporters of
Liger-Kernel's and flash-attention's tests do), so a failure says where a kernel went wrong, not only by how much; `run_killing`, a training command killed at
random moments and resumed."""
import json
import signal
import subprocess
import time

import torch

TINY = dict(n_layer=2, n_head=4, d_model=32, vocab_size=50, max_seq_len=40)


def tiny(arch="decoder", seed=0, **overrides):
    """A freshly initialised tinyformer model of `arch`: TINY's sizes, with `overrides` (any ModelConfig field)."""
    from tinyformer import ModelConfig, build
    torch.manual_seed(seed)
    return build(ModelConfig(arch=arch, **{**TINY, **overrides}))


def assert_close(actual, expected, atol=0.0, rtol=0.0, name="tensor", limit=5):
    """|actual - expected| <= atol + rtol * |expected| elementwise, shapes equal; atol may be a tensor that broadcasts
    against them (a tolerance per element). NaN, or inf where expected is finite, is a mismatch. Raises
    AssertionError with the number of mismatches, the max error and the first `limit` indices with their values."""
    a = actual.detach().cpu().double()
    e = expected.detach().cpu().double()
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {tuple(a.shape)}, expected {tuple(e.shape)}")
    tol = torch.as_tensor(atol, dtype=torch.float64).cpu() + rtol * e.abs()
    err = (a - e).abs()
    bad = ~((err <= tol) | (a == e))
    if bad.any():
        idx = bad.nonzero()[:limit].tolist()
        first = ", ".join(f"{tuple(i)}: got {a[tuple(i)].item():.6g} want {e[tuple(i)].item():.6g}" for i in idx)
        worst = err.nan_to_num(float("inf")).max().item()
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.numel()} elements mismatch (max error {worst:.3g}, "
                             f"atol {_describe(atol)}, rtol {rtol:.3g}); first: {first}")


def _describe(atol) -> str:
    if isinstance(atol, torch.Tensor) and atol.numel() > 1:
        return f"{atol.min().item():.3g}..{atol.max().item():.3g}"
    return f"{float(atol):.3g}"


def _iters_logged(out) -> int:
    try:
        return max((r.get("iter", 0) for r in map(json.loads, open(out / "metrics.jsonl"))), default=-1)
    except (OSError, ValueError):  # not written yet, or a line being written
        return -1


def run_killing(argv, out, targets, rng) -> int:
    """Run the training command `argv` (its --out_dir `out`) once per target, with --resume once a checkpoint exists:
    SIGKILL at a random moment (forward, backward, checkpoint writing) once it has logged iteration `target`; a None
    target lets it finish, and it must succeed. Returns how many runs were killed."""
    kills = 0
    for target in targets:
        resume = ["--resume"] if (out / "ckpt.pt").exists() else []
        p = subprocess.Popen(argv + resume, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if target is not None:
            while p.poll() is None and _iters_logged(out) < target:
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.05))
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                kills += 1
        p.wait()
        if target is None:
            assert p.returncode == 0, p.stderr.read().decode()[-2000:]
    return kills

