"""Fused training ops benchmark (GPU): tinyformer's fused RMSNorm, LayerNorm, SwiGLU, RoPE and linear + cross-entropy
against the eager torch ops they replace (their references in tinyformer.kernels.reference; for LayerNorm torch's own
F.layer_norm, what ops.layer_norm runs outside training), forward + backward.

Per op and shape: median ms of forward + backward (triton.testing.do_bench, 20th and 80th percentiles), the speedup
over eager torch, and the peak CUDA memory the step allocated beyond its inputs (torch.cuda.max_memory_allocated);
for linear + cross-entropy the issue's target is a peak at most 0.3x that of the materialized logits at V = 49152.
Every measurement is one CSV row (timestamp, device, versions, op, shape, impl, ms, speedup, peak MB, peak ratio)
appended to --results (default benchmarks/results/fused_ops.csv). Without a GPU it says so and exits 0.

    python benchmarks/fused_ops.py
    python benchmarks/fused_ops.py --dtype bf16 --tokens 8192 --vocab 49152 --hidden 576

References: Liger-Kernel's benchmark/ (speed and memory of each fused op against its torch baseline, CSV rows).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import RESULTS, append_rows, now, versions  # noqa: E402

FIELDS = ["timestamp", "device", "torch", "triton", "op", "shape", "dtype", "impl", "ms", "p20_ms", "p80_ms",
          "speedup_vs_torch", "peak_mb", "peak_vs_torch"]


def _cases(args, dtype):
    """(op, shape text, {impl: step}) where step() runs forward + backward once on fresh gradients."""
    from tinyformer import kernels
    from tinyformer.kernels import reference
    dev, N = "cuda", args.tokens
    g = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device=dev, dtype=dtype, generator=g)  # noqa: E731

    x, w = rnd(N, args.d_model).requires_grad_(), (1 + 0.1 * rnd(args.d_model)).requires_grad_()
    dy = rnd(N, args.d_model)
    yield "rms_norm", f"{N}x{args.d_model}", {
        "torch": lambda: reference.rms_norm(x, w).backward(dy),
        "fused": lambda: kernels.rms_norm(x, w).backward(dy)}

    b = (0.1 * rnd(args.d_model)).requires_grad_()
    yield "layer_norm", f"{N}x{args.d_model}", {
        "torch": lambda: torch.nn.functional.layer_norm(x, x.shape[-1:], w, b).backward(dy),  # eager torch's kernel
        "fused": lambda: kernels.layer_norm(x, w, b).backward(dy)}

    gate, up, dh = rnd(N, args.d_ff).requires_grad_(), rnd(N, args.d_ff).requires_grad_(), rnd(N, args.d_ff)
    yield "swiglu", f"{N}x{args.d_ff}", {
        "torch": lambda: reference.swiglu(gate, up).backward(dh),
        "fused": lambda: kernels.swiglu(gate, up).backward(dh)}

    H, Dh = args.d_model // 128, 128
    B, T = max(1, N // 2048), min(N, 2048)
    q = rnd(B, H, T, Dh).requires_grad_()
    ang = torch.arange(T, device=dev, dtype=torch.float32)[:, None] * 10000.0 ** (
        -torch.arange(0, Dh, 2, device=dev).float() / Dh)
    ang = torch.cat((ang, ang), -1)[None, None]  # (1, 1, T, Dh)
    cos, sin, dq = ang.cos(), ang.sin(), rnd(B, H, T, Dh)
    yield "rope", f"{B}x{H}x{T}x{Dh}", {
        "torch": lambda: reference.rope(q, cos, sin).backward(dq),
        "fused": lambda: kernels.rope(q, cos, sin).backward(dq)}

    h, W = rnd(N, args.hidden).requires_grad_(), (rnd(args.vocab, args.hidden) * args.hidden ** -0.5).requires_grad_()
    target = torch.randint(0, args.vocab, (N,), device=dev, generator=g)
    yield "linear_cross_entropy", f"{N}x{args.hidden}x{args.vocab}", {
        # the training loop's unfused path: the logits in the product's dtype, then fp32 for the loss
        "torch": lambda: torch.nn.functional.cross_entropy((h @ W.T).float(), target).backward(),
        "fused": lambda: kernels.linear_cross_entropy(h, W, target).backward()}


def _peak_mb(step) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--tokens", type=int, default=8192, help="rows: batch x sequence (default 8192)")
    ap.add_argument("--d-model", type=int, default=4096,
                    help="RMSNorm / LayerNorm width and RoPE heads x 128 (default 4096)")
    ap.add_argument("--d-ff", type=int, default=11008, help="SwiGLU width (default 11008)")
    ap.add_argument("--hidden", type=int, default=576, help="hidden size into the head (default 576, SmolLM2-135M)")
    ap.add_argument("--vocab", type=int, default=49152, help="vocabulary (default 49152, SmolLM2-135M)")
    ap.add_argument("--results", default=str(RESULTS / "fused_ops.csv"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("fused_ops: needs a CUDA GPU (the fused ops run the Triton interpreter on a CPU: tests, not timings)")
        return 0
    import triton.testing
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    tv, trv = versions()
    rows = []
    for op, shape, impls in _cases(args, dtype):
        got = {}
        for impl, step in impls.items():
            peak = _peak_mb(step)
            ms, p20, p80 = triton.testing.do_bench(step, quantiles=[0.5, 0.2, 0.8])
            got[impl] = (ms, peak)
            rows.append(dict(timestamp=now(), device=torch.cuda.get_device_name(), torch=tv, triton=trv, op=op,
                             shape=shape, dtype=args.dtype, impl=impl, ms=round(ms, 4), p20_ms=round(p20, 4),
                             p80_ms=round(p80, 4), peak_mb=round(peak, 1)))
        for r in rows[-len(impls):]:
            r["speedup_vs_torch"] = round(got["torch"][0] / got[r["impl"]][0], 3)
            r["peak_vs_torch"] = round(got[r["impl"]][1] / max(got["torch"][1], 1e-9), 3)
            print(f"  {op:22s} {shape:18s} {r['impl']:6s} {r['ms']:9.3f} ms  x{r['speedup_vs_torch']:<6} "
                  f"peak {r['peak_mb']:8.1f} MB ({r['peak_vs_torch']}x torch's)")
    append_rows(args.results, FIELDS, rows)
    print(f"fused_ops: {len(rows)} rows -> {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
