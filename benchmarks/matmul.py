"""Low-bit matmul benchmark: tinyformer's int8 (W8A8, weight-only) and int4 (weight-only, group-wise) matmuls against
torch's float matmul of the same shape, measured in the same run.

On a CUDA GPU: the Triton kernels (`int8_matmul` with fp16 output, `quantize_per_token` + `int8_matmul`,
`int8_weight_only_matmul` and `int4_matmul` with fp16 activations, which for prefill (M > 16, groups 32/64/128) runs
the K-plane kernel with the weight as the MMA's register operand; for prefill `quantize_per_token` + `w4a8_matmul`,
the int4 weight on int8 tensor cores; on sm_89+ `fp8_matmul`, e4m3 with row-wise scales, and `w4a8_matmul` with e4m3
activations)
against torch.matmul fp16 (cuBLAS, the anchor) and bf16, torch._int_mm and (sm_89+) torch._scaled_mm with row-wise
scales, timed replayed from a CUDA graph (triton.testing.do_bench_cudagraph: the GPU work alone;
`--timer launch`: do_bench, the Python launch path included) (median, 20th and 80th percentiles); TFLOP/s (TOPS for
int8) = 2 M N K / t and GB/s = bytes of weight + activations + output / t. Default shapes: decode M = 1, 4, 16 and
prefill M = 512, 1024, 4096 for (K, N) in (1024, 1024), (4096, 4096), (4096, 11008), (8192, 8192).
On CPU (no interpreter: torch's own kernels, see kernels/cpu.py): each path with the
activation dtype it is fast in (bf16 for torch's packed weight-only kernels, int8 for torch._int_mm), plus the same
call with fp32 activations (cast inside), against the fp32 torch.matmul anchor; torch.utils.benchmark on --threads
threads, in --rounds rounds over all paths (per-call times pooled; median, or minimum with --stat min). When the
anchor's round medians differ by more than 15% the rows are flagged "noisy": another process was using the CPU
(on a 2-core machine two timing threads then run in scheduler quanta and every path reads ~4, 8 or 12 ms); rerun,
or pass --wait-quiet S to wait (up to S s) for other processes to go idle before each timing.

Every measurement is one CSV row (timestamp, device, torch/triton versions, threads, load average, shape, path,
activation dtype, ms, speedup over the anchor, TFLOP/s, GB/s, note) appended to --results (default
benchmarks/results/matmul.csv); a PNG plot (speedup over the anchor per shape and path) is drawn from this run's rows.

    python benchmarks/matmul.py                                   # defaults for the device at hand
    python benchmarks/matmul.py --shapes 1x4096x4096,16x4096x4096 --group-size 128 --threads 2
    python benchmarks/matmul.py --shapes 1x576x1536 --min-run-time 2 --wait-quiet 60   # on a shared machine

Shapes are MxKxN: an (M, K) activation times a (K, N) weight (stored (N, K), the nn.Linear layout).
Issue target (this project's 2-core CPU): int8 and int4 weight-only at 1 x 4096 @ 4096 x 4096 >= 3x faster than the
fp32 torch.matmul; on a GPU, int4 at batch 1 >= 3x fp16 cuBLAS on 4096^2+ layers and W8A8 faster than fp16 at
M >= 512.

References: Dettmers et al. 2022 (LLM.int8) and Xiao et al. 2023 (SmoothQuant) for W8A8; Frantar et al. 2022
(GPTQ), Lin et al. 2023 (AWQ) and Frantar et al. 2024 (MARLIN, the ~4x batch-1 int4 bound) for weight-only int4;
the Triton matmul tutorial (do_bench, TFLOP/s reporting); Liger-Kernel's benchmark/ (CSV rows + plots).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
from typing import Callable, List

import torch
from common import append_rows, cpu_busy_fraction, versions  # benchmarks/common.py

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_RESULTS = os.path.join(HERE, "results", "matmul.csv")
FIELDS = ["timestamp", "device", "torch", "triton", "threads", "loadavg", "M", "K", "N", "group_size", "path",
          "act_dtype", "stat", "ms", "p20_ms", "p80_ms", "speedup_vs_anchor", "anchor", "tflops", "gbps", "note"]
CPU_SHAPES = "1x4096x4096,4x4096x4096,16x4096x4096,64x4096x4096,256x4096x4096,1x4096x11008,1x11008x4096,1x576x1536"
GPU_SHAPES = ",".join(f"{m}x{k}x{n}" for k, n in ((1024, 1024), (4096, 4096), (4096, 11008), (8192, 8192))
                      for m in (1, 4, 16, 512, 1024, 4096))


def parse_shapes(text: str):
    shapes = []
    for item in text.split(","):
        parts = item.lower().replace(" ", "").split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise SystemExit(f"bad shape {item!r}: expected MxKxN, e.g. 1x4096x4096")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


# ======================================================================================================================
# The paths: (name, activation dtype, fn) built for one shape; each is checked against the reference before timing
# ======================================================================================================================
def make_operands(M, K, N, G, device):
    from tinyformer.kernels import quant, reference
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g) * K ** -0.5  # (N, K) fp32 weight
    x = torch.randn(M, K, generator=g)  # (M, K) fp32 activations
    w8_scale, _ = quant.choose_qparams(w, 8, -1, symmetric=True)  # per channel (N,)
    w8 = quant.quantize(w, w8_scale, torch.zeros_like(w8_scale), 8, -1)  # (N, K) int8
    s4, z4 = quant.choose_qparams(w, 4, G, symmetric=False)  # (N, K / G)
    w4 = reference.pack_int4(quant.quantize(w, s4, z4, 4, G))  # (N, K / 2) uint8
    a8, a_scale = quant.quantize_per_token_int8(x)  # (M, K) int8, (M,)
    f8, f8_scale = reference.quantize_fp8(w)  # (N, K) e4m3, (N,)
    af8, af8_scale = reference.quantize_fp8(x)  # (M, K) e4m3, (M,)
    ops = dict(w=w, x=x, w8=w8, w8_scale=w8_scale, s4=s4, z4=z4, w4=w4, a8=a8, a_scale=a_scale, f8=f8,
               f8_scale=f8_scale, af8=af8, af8_scale=af8_scale)
    return {k: v.to(device) for k, v in ops.items()}


def cpu_paths(o, G) -> List[tuple]:
    from tinyformer.kernels import cpu, quant
    x32, w32 = o["x"], o["w"]
    xb = x32.to(torch.bfloat16)
    wb = w32.to(torch.bfloat16)
    pre = cpu.prepack_int4_cpu(o["w4"], o["s4"], o["z4"], G)  # repacked once, as a quantized linear would
    paths = [
        ("torch.matmul fp32 (anchor)", "fp32", lambda: x32 @ w32.T),
        ("torch.matmul bf16", "bf16", lambda: xb @ wb.T),
        ("w8a8 torch._int_mm", "int8", lambda: cpu.int8_matmul_cpu(o["a8"], o["w8"], o["a_scale"], o["w8_scale"])),
        ("w8a8 + per-token quant", "fp32",
         lambda: cpu.int8_matmul_cpu(*_q(quant, x32, o))),
        ("int8 weight-only", "bf16", lambda: cpu.int8_weight_only_matmul_cpu(xb, o["w8"], o["w8_scale"])),
        ("int8 weight-only", "fp32", lambda: cpu.int8_weight_only_matmul_cpu(x32, o["w8"], o["w8_scale"])),
        (f"int4 weight-only g{G}", "bf16", lambda: pre.matmul(xb)),
        (f"int4 weight-only g{G}", "fp32", lambda: pre.matmul(x32)),
    ]
    if not pre.fast:
        paths = [p for p in paths if not p[0].startswith("int4")]
        print(f"  note: int4 prepack does not apply (N % 16 or group {G}); int4 rows skipped")
    return paths


def _q(quant, x32, o):
    a, s = quant.quantize_per_token_int8(x32)
    return a, o["w8"], s, o["w8_scale"]


def gpu_paths(o, G) -> List[tuple]:
    from tinyformer.kernels import int4_matmul, int8_matmul, int8_weight_only_matmul, w4a8_mm
    xh, wh = o["x"].half(), o["w"].half()
    xb, wb = o["x"].bfloat16(), o["w"].bfloat16()
    s4h, z4h = o["s4"].half(), o["z4"].half()
    M, K = o["x"].shape
    N = o["w"].shape[0]
    w8t = o["w8"].T  # (K, N) column-major view, what torch._int_mm takes for an nn.Linear weight
    paths = [
        ("torch.matmul fp16 (anchor)", "fp16", lambda: xh @ wh.T),
        ("torch.matmul bf16", "bf16", lambda: xb @ wb.T),
        ("w8a8 triton", "int8", lambda: int8_matmul(o["a8"], o["w8"], o["a_scale"], o["w8_scale"],
                                                    out_dtype=torch.float16)),
        ("w8a8 triton + per-token quant", "fp16", lambda: _w8a8_dynamic(xh, o)),
        ("int8 weight-only triton", "fp16", lambda: int8_weight_only_matmul(xh, o["w8"], o["w8_scale"])),
        (f"int4 weight-only triton g{G}", "fp16", lambda: int4_matmul(xh, o["w4"], s4h, z4h, G)),
    ]
    if M > 16 and w4a8_mm.supports_group(G):  # prefill: W4A8, int4 codes on int8 tensor cores, x quantized per token
        paths.append((f"int4 w4a8 triton + per-token quant g{G}", "fp16", lambda: _w4a8_dynamic(xh, o, s4h, z4h, G)))
    if M > 16 and K % 8 == 0 and N % 8 == 0:  # torch._int_mm's CUDA constraints
        paths.insert(2, ("torch._int_mm", "int8", lambda: torch._int_mm(o["a8"], w8t)))
    if torch.cuda.get_device_capability() >= (8, 9):  # e4m3 tensor cores: the fp8 kernel's Triton path, and its anchor
        from tinyformer.kernels import fp8_matmul
        sa, sb = o["af8_scale"][:, None], o["f8_scale"][None, :]  # (M, 1), (1, N): row-wise scales
        paths += [("fp8 triton", "e4m3", lambda: fp8_matmul(o["af8"], o["f8"], o["af8_scale"], o["f8_scale"])),
                  ("torch._scaled_mm fp8", "e4m3",
                   lambda: torch._scaled_mm(o["af8"], o["f8"].T, sa, sb, out_dtype=torch.bfloat16))]
        if M > 16 and w4a8_mm.supports_group(G):  # W4A8 with e4m3 activations: int4 codes on the fp8 tensor cores
            paths.append((f"int4 w4a8 e4m3 triton g{G}", "e4m3", lambda: w4a8_mm.w4a8_matmul(
                o["af8"], o["w4"], o["af8_scale"], s4h, z4h, G, out_dtype=torch.float16)))
    return paths


def _w8a8_dynamic(xh, o):
    from tinyformer.kernels import int8_matmul, quantize_per_token
    a, s = quantize_per_token(xh)  # (M, K) int8, (M,) fp32: the fused Triton quantizer
    return int8_matmul(a, o["w8"], s, o["w8_scale"], out_dtype=torch.float16)


def _w4a8_dynamic(xh, o, s4h, z4h, G):
    from tinyformer.kernels import quantize_per_token, w4a8_matmul
    a, s = quantize_per_token(xh)  # (M, K) int8, (M,) fp32
    return w4a8_matmul(a, o["w4"], s, s4h, z4h, G, out_dtype=torch.float16)


def check(paths, o, G):
    """Every path against the fp32 product of its own quantized weight (a wrong path is never timed)."""
    from tinyformer.kernels import reference
    x, w = o["x"].float(), o["w"].float()
    want = {
        "float": x @ w.T,
        "w8": x @ (o["w8"].float() * o["w8_scale"][:, None]).T,
        "w4": x @ reference.dequantize_int4(o["w4"], o["s4"], o["z4"], G).T,
        "f8": x @ (o["f8"].float() * o["f8_scale"][:, None]).T,
    }
    for name, dt, fn in paths:
        out = fn().float()
        key = "w4" if "int4" in name else "f8" if "fp8" in name else \
            "w8" if ("int8" in name or "w8a8" in name or "_int_mm" in name) else "float"
        if name == "torch._int_mm":
            continue  # raw int32 accumulator
        ref = want[key]
        tol = 0.1 if ("w8a8" in name or "w4a8" in name or "fp8" in name) else 0.03  # these also quantize activations
        err = ((out - ref).norm() / ref.norm()).item()
        if not err < tol:
            raise SystemExit(f"{name} ({dt}) is wrong: relative error {err:.3g} against its reference")


# ======================================================================================================================
# Timing
# ======================================================================================================================
def time_cpu(fn: Callable, threads: int, min_run_time: float):
    """Per-call times in ms (torch.utils.benchmark blocks: each entry is the mean of one block of calls)."""
    from torch.utils import benchmark
    m = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads).blocked_autorange(
        min_run_time=min_run_time)
    return [t * 1e3 for t in m.times]


def wait_quiet(max_wait: float) -> bool:
    """Wait (up to max_wait s) until other processes use < 10% of the CPUs; True if quiet. Two timing threads on a
    2-core machine shared with a busy process run in scheduler quanta (every path then reads ~4, 8 or 12 ms)."""
    import time
    end = time.monotonic() + max_wait
    while True:
        busy = cpu_busy_fraction()
        if 0 <= busy < 0.10 or busy < 0 or time.monotonic() > end:
            return busy < 0.10
        time.sleep(0.5)


def summarize(times, stat):
    """(ms, p20, p80) of pooled per-call times; ms is the median, or the minimum with --stat min (the best estimate
    of the uncontended time on a shared machine)."""
    times = sorted(times)
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))]  # noqa: E731
    return (times[0] if stat == "min" else q(0.5)), q(0.2), q(0.8)


def time_gpu(fn: Callable, timer: str):
    """(median, p20, p80) ms. "graph": the calls replayed from a CUDA graph (do_bench_cudagraph), which times the
    GPU work alone, as a decode loop captured in a graph runs it; "launch": triton's do_bench, which also counts
    the Python launch path (its ~20-400 us per call dominates every small shape on a fast GPU)."""
    import triton.testing
    if timer == "graph":
        return tuple(triton.testing.do_bench_cudagraph(fn, quantiles=[0.5, 0.2, 0.8]))
    return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8]))


ACT_BYTES = {"int8": 1, "fp16": 2, "bf16": 2, "fp32": 4}


def bytes_moved(name, act_dtype, M, K, N, G):
    """Bytes a path must move at least once: its weight (int4 + fp16 scale/zero pairs, int8 + fp32 scales, or the
    float weight), the activations in the dtype it reads, and an fp16/bf16 output."""
    if "int4" in name:
        w = N * K // 2 + 2 * 2 * N * (K // G)
    elif "int8" in name or "w8a8" in name or "_int_mm" in name:
        w = N * K + 4 * N
    else:
        w = ACT_BYTES[act_dtype] * N * K  # torch.matmul: the weight is in the activation dtype
    return w + ACT_BYTES[act_dtype] * M * K + 2 * M * N


def run(args):
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    torch_v, triton_v = versions()
    if device == "cuda":
        dev_name = torch.cuda.get_device_name()
        shapes = parse_shapes(args.shapes or GPU_SHAPES)
    else:
        torch.set_num_threads(args.threads)
        dev_name = f"cpu: {platform.processor() or platform.machine()} ({os.cpu_count()} cores, {args.threads} threads)"
        shapes = parse_shapes(args.shapes or CPU_SHAPES)
    stamp = _dt.datetime.now().isoformat(timespec="seconds")
    print(f"device: {dev_name}; torch {torch_v}, triton {triton_v}; group size {args.group_size}"
          + (f"; others busy {cpu_busy_fraction():.0%} of the CPUs" if device == "cpu" else ""))
    rows = []
    for M, K, N in shapes:
        G = args.group_size
        if K % G:  # e.g. K = 576 with G = 128: the largest of 128/64/32 that divides K
            fits = [g for g in (128, 64, 32) if K % g == 0 and g < G]
            if not fits:
                print(f"skip {M}x{K}x{N}: K is not a multiple of {G}, 64 or 32")
                continue
            print(f"{M}x{K}x{N}: K is not a multiple of {G}; int4 uses group size {fits[0]}")
            G = fits[0]
        o = make_operands(M, K, N, G, device)
        paths = (gpu_paths if device == "cuda" else cpu_paths)(o, G)
        check(paths, o, G)
        anchor_name = paths[0][0]
        if device == "cuda":
            results = [(p, time_gpu(p[2], args.timer)) for p in paths]
            note = f"timer {args.timer}"
        else:  # rounds over all paths, so a burst of load from another process hits every path alike
            pooled = {i: [] for i in range(len(paths))}
            anchor_rounds = []
            busy = False
            for _ in range(args.rounds):
                for i, p in enumerate(paths):
                    if args.wait_quiet > 0:
                        busy |= not wait_quiet(args.wait_quiet)
                    t = time_cpu(p[2], args.threads, args.min_run_time / args.rounds)
                    pooled[i] += t
                    if i == 0:
                        anchor_rounds.append(summarize(t, "median")[0])
            results = [(p, summarize(pooled[i], args.stat)) for i, p in enumerate(paths)]
            spread = max(anchor_rounds) / min(anchor_rounds) - 1
            note = (f"noisy: anchor rounds {' '.join(f'{a:.3f}' for a in anchor_rounds)} ms" if spread > 0.15 else "")
            if busy:
                note = (note + "; " if note else "") + f"other processes busy after waiting {args.wait_quiet:.0f} s"
        anchor_ms = results[0][1][0]
        load = " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else ""
        print(f"\n{M} x {K} @ {K} x {N}" + (f"   [{note}]" if note else ""))
        for (name, dt, _), (ms, p20, p80) in results:
            flops = 2 * M * N * K / (ms * 1e-3) / 1e12
            gbps = bytes_moved(name, dt, M, K, N, G) / (ms * 1e-3) / 1e9
            speed = anchor_ms / ms
            print(f"  {name:34s} {dt:5s} {ms:9.3f} ms  {speed:6.2f}x  {flops:8.3f} TFLOP/s  {gbps:8.1f} GB/s")
            rows.append(dict(timestamp=stamp, device=dev_name, torch=torch_v, triton=triton_v,
                             threads=args.threads if device == "cpu" else "", loadavg=load, M=M, K=K, N=N,
                             group_size=G, path=name, act_dtype=dt, ms=f"{ms:.4f}",
                             stat=args.stat if device == "cpu" else "median", p20_ms=f"{p20:.4f}",
                             p80_ms=f"{p80:.4f}", speedup_vs_anchor=f"{speed:.3f}", anchor=anchor_name,
                             tflops=f"{flops:.4f}", gbps=f"{gbps:.2f}", note=note))
    return rows


def plot(rows, png_path):
    """Speedup over the anchor (log scale) for every shape (groups) and path (bars) of this run."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    import re
    label = lambda r: f"{re.sub(r' g[0-9]+$', '', r['path'])} [{r['act_dtype']}]"  # noqa: E731 (G is in the tick)
    shape = lambda r: f"{r['M']}x{r['K']}x{r['N']} g{r['group_size']}"  # noqa: E731
    shapes = list(dict.fromkeys(shape(r) for r in rows))
    paths = list(dict.fromkeys(label(r) for r in rows))
    val = {(shape(r), label(r)): float(r["speedup_vs_anchor"]) for r in rows}
    fig, ax = plt.subplots(figsize=(min(16, max(8, 1.6 * len(shapes))), 5.5))
    width = 0.8 / max(1, len(paths))
    for i, p in enumerate(paths):
        xs = [j + i * width for j, s in enumerate(shapes) if (s, p) in val]
        ys = [val[(s, p)] for s in shapes if (s, p) in val]
        ax.bar(xs, ys, width, label=p)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(3.0, color="red", linewidth=0.8, linestyle="--", label="3x target (weight-only, 1x4096x4096)")
    ax.set_yscale("log")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
    ax.set_xticklabels([f"{s}" for s in shapes], rotation=30, ha="right")
    ax.set_ylabel(f"speedup over {rows[0]['anchor']}")
    ax.set_title(f"low-bit matmul, {rows[0]['device']} (MxKxN), {rows[0]['timestamp']}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=120)
    print(f"plot -> {png_path}")


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=None, help="comma-separated MxKxN (default: decode + prefill per device)")
    ap.add_argument("--group-size", type=int, default=128, help="int4 group size (32, 64, 128; default 128)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    ap.add_argument("--min-run-time", type=float, default=1.0, help="CPU: seconds of timing per path and shape")
    ap.add_argument("--rounds", type=int, default=3, help="CPU: rounds over all paths (default 3)")
    ap.add_argument("--wait-quiet", type=float, default=0.0,
                    help="CPU: before each timing wait up to this many seconds for other processes to go idle")
    ap.add_argument("--stat", choices=["median", "min"], default="median",
                    help="CPU: the time reported per path (default median; min on a shared machine)")
    ap.add_argument("--cpu", action="store_true", help="time the CPU paths even when a GPU is present")
    ap.add_argument("--timer", choices=["graph", "launch"], default="graph",
                    help="GPU: replay from a CUDA graph (default: GPU time alone) or time each Python launch")
    ap.add_argument("--results", default=DEFAULT_RESULTS, help="CSV file the rows are appended to")
    ap.add_argument("--plot", default=None, help="PNG path (default: the results path with .png)")
    ap.add_argument("--no-plot", action="store_true")
    return ap.parse_args(argv)


def main(argv=None):
    if os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available():
        print("TRITON_INTERPRET=1 is set: the CPU timings would be of the interpreter; unset it", file=sys.stderr)
        return 2
    args = parse(argv)
    rows = run(args)
    if rows:
        append_rows(args.results, FIELDS, rows)
        print(f"\n{len(rows)} rows appended to {args.results}")
        if not args.no_plot:
            plot(rows, args.plot or os.path.splitext(args.results)[0] + ".png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
