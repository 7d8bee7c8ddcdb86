"""Attention benchmark: tinyformer's Triton FlashAttention-2 kernels against torch SDPA and the pure-torch reference.

On a CUDA GPU: TFLOP/s of forward, backward and forward+backward for each sequence length, head dim and causal
setting given on the command line, timed with triton.testing.do_bench (median, 20th and 80th percentiles), for the
providers `triton` (tinyformer.kernels.attention), `sdpa_flash` and `sdpa_cudnn` (F.scaled_dot_product_attention
restricted to its flash or its cuDNN backend) and `reference` (tinyformer.kernels.reference.attention; skipped where
its (B, H, Tq, Tk) score matrix would not fit), with the share of the GPU's dense fp16/bf16 peak.
Without a GPU: says so, runs the interpreter correctness sweep on small shapes (errors against fp64 next to plain
torch's), and times the CPU path (SDPA vs the reference) with torch.utils.benchmark.
Every measurement is one CSV row (device, torch/triton versions, timestamp, shape, ms, TFLOP/s, share of peak)
appended to --results (default benchmarks/results/attention.csv); a PNG plot is drawn from the CSV.

    python benchmarks/attention.py                         # GPU: seq 512..16k, D 64/128, causal and not
    python benchmarks/attention.py --seqlens 1024,4096 --head-dims 128 --causal true --modes fwd
    python benchmarks/attention.py --seqlens 256,512      # CPU: sweep + SDPA vs reference

FLOP counts (FlashAttention-2 paper convention): forward 4 * B * H * Tq * Tk * D (two matmuls), halved for causal
square attention; backward 2.5x forward (five matmuls, two of them the recomputation); forward+backward 3.5x.

References: Dao 2023, "FlashAttention-2" (benchmark setup: total tokens fixed at 16k, d_model 2048); the Triton
fused-attention tutorial (triton.testing.do_bench, perf_report); Liger-Kernel's benchmark/ (CSV rows + plots).
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import platform
import sys

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # the kernels must be decorated in interpreter mode, so set it before they are imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tinyformer.kernels import cpu, device, flash_attention as fa  # noqa: E402
from tinyformer.kernels import reference as ref  # noqa: E402
from common import append_rows, versions  # noqa: E402  (benchmarks/common.py)

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_RESULTS = os.path.join(HERE, "results", "attention.csv")
FIELDS = ["timestamp", "device", "torch", "triton", "provider", "mode", "dtype", "batch", "heads_q", "heads_kv",
          "seq_q", "seq_k", "head_dim", "causal", "ms", "ms_p20", "ms_p80", "tflops", "peak_tflops",
          "share_of_peak", "max_err", "plain_torch_err", "note"]

# Dense fp16/bf16 tensor-core peak (TFLOP/s, fp32 accumulate) by device-name substring, from vendor data sheets.
PEAK_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0),
               ("L4", 121.0), ("A10", 125.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("V100", 125.0)]


# ----------------------------------------------------------------------------------------------------------------------
def attention_flops(B, H, Tq, Tk, D, causal, mode):
    f = 4.0 * B * H * Tq * Tk * D
    if causal and Tq == Tk:
        f *= 0.5
    return f * {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}[mode]


def device_name():
    if HAS_CUDA:
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"CPU {line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def peak_tflops(name, override):
    if override:
        return override
    for key, peak in PEAK_TFLOPS:
        if key in name:
            return peak
    return None


def base_row(args, provider, mode, B, Hq, Hkv, T, D, causal):
    tv, trv = versions()
    return dict(timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), device=device_name(),
                torch=tv, triton=trv, provider=provider, mode=mode, dtype=args.dtype, batch=B, heads_q=Hq,
                heads_kv=Hkv, seq_q=T, seq_k=T, head_dim=D, causal=causal)


def shapes(args, default_seqlens):
    """(B, Hq, Hkv, T, D, causal) per the CLI: batch defaults to tokens // T, heads to d_model // D."""
    seqlens = [int(s) for s in (args.seqlens or default_seqlens).split(",")]
    causals = {"both": [False, True], "true": [True], "false": [False]}[args.causal]
    for D in [int(d) for d in args.head_dims.split(",")]:
        Hq = args.heads or max(1, args.d_model // D)
        Hkv = args.kv_heads or Hq
        for causal in causals:
            for T in seqlens:
                B = args.batch or max(1, args.tokens // T)
                yield B, Hq, Hkv, T, D, causal


def make_qkv(B, Hq, Hkv, T, D, dtype, device, requires_grad):
    g = torch.Generator(device=device).manual_seed(0)
    mk = lambda H: torch.randn(B, H, T, D, device=device, dtype=dtype, generator=g,  # noqa: E731
                               requires_grad=requires_grad)
    return mk(Hq), mk(Hkv), mk(Hkv)


# ----------------------------------------------------------------------------------------------------------------------
# GPU
def providers_gpu(names):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def triton_attn(q, k, v, causal):
        return fa.attention(q, k, v, causal=causal)

    def sdpa_on(backend):
        def sdpa(q, k, v, causal):
            if q.shape[1] != k.shape[1]:  # backends without GQA support in some torch versions: expand k/v
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
                v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return sdpa

    def reference(q, k, v, causal):
        return ref.attention(q, k, v, causal=causal)

    table = {"triton": triton_attn, "sdpa_flash": sdpa_on(SDPBackend.FLASH_ATTENTION),
             "sdpa_cudnn": sdpa_on(SDPBackend.CUDNN_ATTENTION), "reference": reference}
    return {n: table[n] for n in names}


def bench_gpu_case(args, pname, fn, modes, B, Hq, Hkv, T, D, causal, dtype, peak):
    import triton.testing
    rows = []
    q, k, v = make_qkv(B, Hq, Hkv, T, D, dtype, "cuda", requires_grad=True)
    o = fn(q, k, v, causal)
    do = torch.randn_like(o)
    for mode in modes:
        if mode == "fwd":
            bench = lambda: fn(q, k, v, causal)  # noqa: E731
        elif mode == "bwd":
            o = fn(q, k, v, causal)
            bench = lambda: o.backward(do, retain_graph=True)  # noqa: E731
        else:
            bench = lambda: fn(q, k, v, causal).backward(do)  # noqa: E731
        ms, p20, p80 = triton.testing.do_bench(bench, quantiles=[0.5, 0.2, 0.8], grad_to_none=[q, k, v])
        tflops = attention_flops(B, Hq, T, T, D, causal, mode) / (ms * 1e-3) / 1e12
        row = base_row(args, pname, mode, B, Hq, Hkv, T, D, causal)
        row.update(ms=round(ms, 4), ms_p20=round(p20, 4), ms_p80=round(p80, 4), tflops=round(tflops, 2),
                   peak_tflops=peak or "", share_of_peak=round(tflops / peak, 3) if peak else "")
        rows.append(row)
        print(f"  {pname:10s} {mode:7s} B={B:<3d} H={Hq:<3d} T={T:<6d} D={D:<4d} causal={causal!s:5s} "
              f"{ms:9.3f} ms {tflops:8.1f} TFLOP/s" + (f" ({tflops / peak:.0%} of peak)" if peak else ""))
    return rows


def run_gpu(args):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    name = device_name()
    peak = peak_tflops(name, args.peak_tflops)
    print(f"GPU: {name}; peak {peak or 'unknown'} TFLOP/s (dense {args.dtype}); results -> {args.results}")
    rows = []
    provs = providers_gpu(args.providers.split(","))
    modes = args.modes.split(",")
    for B, Hq, Hkv, T, D, causal in shapes(args, "512,1024,2048,4096,8192,16384"):
        for pname, fn in provs.items():
            if pname == "reference" and B * Hq * T * T * 4 * 3 > args.reference_max_bytes:
                print(f"  skip reference at B={B} H={Hq} T={T}: its score matrices would not fit")
                continue
            try:
                rows += bench_gpu_case(args, pname, fn, modes, B, Hq, Hkv, T, D, causal, dtype, peak)
            except torch.cuda.OutOfMemoryError:
                print(f"  {pname} B={B} H={Hq} T={T} D={D} causal={causal}: out of memory, skipped")
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# CPU: interpreter correctness sweep + SDPA vs reference timing
SWEEP = [  # (B, Hq, Hkv, Tq, Tk, D): ragged, GQA, Tq < Tk, Tq > Tk
    (1, 4, 2, 77, 130, 64), (1, 3, 1, 130, 77, 80), (2, 2, 2, 33, 33, 128), (1, 2, 1, 1, 300, 64)]


def run_cpu_sweep(args):
    """Max error against fp64 of the kernel (interpreter) and of plain torch in the same dtype, fwd and grads."""
    if not (device.HAS_TRITON and device.INTERPRET):
        print("correctness sweep skipped: needs triton with TRITON_INTERPRET=1 set before the import")
        return []
    rows = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for B, Hq, Hkv, Tq, Tk, D in SWEEP:
            for causal in (False, True):
                g = torch.Generator().manual_seed(Tq * 7 + Tk)
                q, k, v = (torch.randn(B, H, T, D, generator=g).to(dtype)
                           for H, T in ((Hq, Tq), (Hkv, Tk), (Hkv, Tk)))
                do = torch.randn(B, Hq, Tq, D, generator=g).to(dtype)
                res = {}
                for tag, fn, cast in (("want", ref.attention, torch.Tensor.double),
                                      ("plain", lambda *a, **kw: ref.attention(*a, **kw, upcast=False), lambda t: t),
                                      ("kernel", fa.attention, lambda t: t)):
                    leaves = [cast(t).detach().requires_grad_() for t in (q, k, v)]
                    out = fn(*leaves, causal=causal)
                    out.backward(cast(do))
                    res[tag] = [out] + [t.grad for t in leaves]
                errs = [max((x.double() - w).abs().max().item() for x, w in zip(res[t], res["want"]))
                        for t in ("kernel", "plain")]
                path = fa.plan(q, k, v, causal, needs_grad=True).path
                row = base_row(args, "triton_interpreter", "fwd_bwd", B, Hq, Hkv, Tq, D, causal)
                row.update(dtype=str(dtype).replace("torch.", ""), seq_k=Tk, max_err=f"{errs[0]:.3g}",
                           plain_torch_err=f"{errs[1]:.3g}", note=f"correctness sweep ({path} path)")
                rows.append(row)
                print(f"  sweep {row['dtype']:8s} B={B} Hq={Hq} Hkv={Hkv} Tq={Tq:<3d} Tk={Tk:<3d} D={D:<3d} "
                      f"causal={causal!s:5s} kernel err {errs[0]:.2e}  plain torch err {errs[1]:.2e}  "
                      f"ratio {errs[0] / max(errs[1], 1e-30):.2f}")
    return rows


def run_cpu_timing(args):
    from torch.utils import benchmark
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    rows = []
    provs = {"sdpa_cpu": cpu.sdpa_attention, "reference_cpu": ref.attention}
    for B, Hq, Hkv, T, D, causal in shapes(args, "256,512,1024"):
        for pname, fn in provs.items():
            q, k, v = make_qkv(B, Hq, Hkv, T, D, dtype, "cpu", requires_grad=True)
            do = torch.randn(B, Hq, T, D, dtype=dtype)
            for mode in args.modes.split(","):
                if mode == "bwd":
                    continue  # a backward alone needs a retained graph per call; fwd and fwd_bwd bracket it on CPU
                stmt = "fn(q, k, v, causal=causal)" if mode == "fwd" else \
                    "fn(q, k, v, causal=causal).backward(do)"
                t = benchmark.Timer(stmt=stmt, globals=dict(fn=fn, q=q, k=k, v=v, causal=causal, do=do),
                                    num_threads=torch.get_num_threads(),
                                    label="attention", sub_label=f"T={T} D={D}", description=pname)
                m = t.blocked_autorange(min_run_time=args.min_run_time)
                ms = m.median * 1e3
                tflops = attention_flops(B, Hq, T, T, D, causal, mode) / m.median / 1e12
                row = base_row(args, pname, mode, B, Hq, Hkv, T, D, causal)
                row.update(ms=round(ms, 4), ms_p20=round(m._p25 * 1e3, 4) if hasattr(m, "_p25") else "",
                           ms_p80=round(m._p75 * 1e3, 4) if hasattr(m, "_p75") else "", tflops=round(tflops, 4),
                           peak_tflops=args.peak_tflops or "",
                           share_of_peak=round(tflops / args.peak_tflops, 3) if args.peak_tflops else "",
                           note="CPU path; torch.utils.benchmark median")
                rows.append(row)
                print(f"  {pname:14s} {mode:7s} B={B:<2d} H={Hq:<3d} T={T:<5d} D={D:<4d} causal={causal!s:5s} "
                      f"{ms:9.2f} ms {tflops * 1e3:8.1f} GFLOP/s")
    return rows


# ----------------------------------------------------------------------------------------------------------------------
def plot(csv_path, png_path):
    """One panel per (mode, head dim, causal): TFLOP/s against sequence length, a line per provider and device,
    from every row in the CSV that has a time (the sweep rows have none)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install matplotlib)")
        return
    with open(csv_path) as f:
        rows = [r for r in csv.DictReader(f) if r.get("tflops")]
    if not rows:
        print("plot skipped: no timed rows")
        return
    panels = sorted({(r["mode"], int(r["head_dim"]), r["causal"]) for r in rows})
    ncol = min(3, len(panels))
    nrow = -(-len(panels) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5 * ncol, 3.6 * nrow), squeeze=False)
    for ax, (mode, D, causal) in zip(axes.flat, panels):
        lines = {}
        for r in rows:
            if (r["mode"], int(r["head_dim"]), r["causal"]) == (mode, D, causal):
                lines.setdefault((r["provider"], r["device"], r["dtype"]), {})[int(r["seq_q"])] = float(r["tflops"])
        for (prov, dev, dt), pts in sorted(lines.items()):
            xs = sorted(pts)
            ax.plot(xs, [pts[x] for x in xs], marker="o", label=f"{prov} {dt} ({dev[:28]})")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{mode}, D={D}, causal={causal}")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("TFLOP/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    print(f"plot -> {png_path}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", default=None,
                    help="comma-separated sequence lengths (default GPU 512..16384, CPU 256,512,1024)")
    ap.add_argument("--head-dims", default="64,128", help="comma-separated head dims (default 64,128)")
    ap.add_argument("--causal", choices=["both", "true", "false"], default="both")
    ap.add_argument("--modes", default="fwd,bwd,fwd_bwd", help="any of fwd,bwd,fwd_bwd")
    ap.add_argument("--dtype", default=None, help="GPU: bf16 (default) or fp16; CPU: fp32 (default), bf16, fp16")
    ap.add_argument("--tokens", type=int, default=16384, help="batch = tokens // seqlen unless --batch (default 16k)")
    ap.add_argument("--batch", type=int, default=0, help="fixed batch size (overrides --tokens)")
    ap.add_argument("--d-model", type=int, default=2048, help="query heads = d_model // head_dim unless --heads")
    ap.add_argument("--heads", type=int, default=0, help="query heads (default d_model // head_dim)")
    ap.add_argument("--kv-heads", type=int, default=0, help="key/value heads (default = query heads)")
    ap.add_argument("--providers", default="triton,sdpa_flash,sdpa_cudnn,reference",
                    help="GPU providers to time (triton, sdpa_flash, sdpa_cudnn, reference)")
    ap.add_argument("--reference-max-bytes", type=float, default=24e9,
                    help="skip the reference where its fp32 score matrices exceed this many bytes")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="override the device peak (TFLOP/s)")
    ap.add_argument("--results", default=DEFAULT_RESULTS, help="CSV file the rows are appended to")
    ap.add_argument("--plot", default=None, help="PNG path (default: the results path with .png)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--no-sweep", action="store_true", help="CPU: skip the interpreter correctness sweep")
    ap.add_argument("--min-run-time", type=float, default=0.5, help="CPU: seconds per torch.utils.benchmark timing")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if HAS_CUDA:
        args.dtype = args.dtype or "bf16"
        rows = run_gpu(args)
    else:
        args.dtype = args.dtype or "fp32"
        if args.tokens == 16384 and not args.batch:
            args.tokens = 1024  # the CPU default: a batch that times in seconds, not hours
        if args.d_model == 2048 and not args.heads:
            args.d_model = 512
        print("No CUDA GPU on this machine: GPU TFLOP/s (and the targets against SDPA's flash backend) need one. "
              "Running instead: the Triton interpreter correctness sweep on small shapes, and the CPU path "
              "(torch SDPA vs the pure-torch reference) timed with torch.utils.benchmark.")
        rows = [] if args.no_sweep else run_cpu_sweep(args)
        rows += run_cpu_timing(args)
    append_rows(args.results, FIELDS, rows)
    print(f"{len(rows)} rows appended to {args.results}")
    if not args.no_plot and rows:
        plot(args.results, args.plot or os.path.splitext(args.results)[0] + ".png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
