"""The `tinyformer` command line: demo | prepare | train | sample | eval | compress | export | bench. It parses
arguments and calls the library: tinyformer.train (train), tinyformer.eval (eval), tinyformer.data (prepare),
tinyformer.compress, tinyformer.export.

`train` takes nanoGPT's option names (--batch_size, --block_size, --max_iters, --learning_rate, ...) as
`--key value` or `--key=value`, so a nanoGPT command line carries over; model fields (--n_layer, --n_head, --d_model,
alias --n_embd) override the preset. Errors print one line and exit with status 2; --debug shows the traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

DEMO_DIR = "out/demo"


def _bool(s: str) -> bool:
    v = str(s).strip().lower()
    if v in ("1", "true", "yes", "y", "on"):
        return True
    if v in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def _typed(default):
    return _bool if isinstance(default, bool) else type(default) if default is not None else str


# ----------------------------------------------------------------------------------------------------------------------
def _train_parser(sub):
    from tinyformer.config import ModelConfig, field_docs
    from tinyformer.train import TRAIN_PRESETS, TrainConfig
    p = sub.add_parser("train", help="train a model (nanoGPT-style options), or fine-tune one (--init_from)",
                       description="Train a model. Options take nanoGPT's names; the preset sets the model and, "
                                   f"for {', '.join(TRAIN_PRESETS)}, the training hyperparameters too. With "
                                   "--init_from PATH, fine-tune that pretrained model on --data (plain text, chat or "
                                   "prompt/completion .jsonl, labelled .jsonl/.csv), in full or with --lora_rank.")
    g = p.add_argument_group("training (TrainConfig)")
    docs = field_docs(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name == "model":
            continue
        default = f.default
        flag = dict(nargs="?", const=True) if isinstance(default, bool) else {}  # `--resume` = `--resume true`
        g.add_argument(f"--{f.name}", type=_typed(default), default=argparse.SUPPRESS, metavar="V",
                       help=f"{docs[f.name]} (default: {default})".replace("%", "%%"), **flag)
    m = p.add_argument_group("model (ModelConfig fields override the preset)")
    docs = field_docs(ModelConfig)
    for f in dataclasses.fields(ModelConfig):
        if f.name in ("vocab_size", "dropout", "num_labels", "label_names", "pooling"):
            continue  # vocab and classes come from the data; dropout and pooling are training options
        typ = {"n_kv_head": int, "d_ff": int, "n_decoder_layer": int, "head_dim": int, "pad_token_id": int}.get(
            f.name, _typed(f.default))
        m.add_argument(f"--{f.name}", type=typ, default=argparse.SUPPRESS, metavar="V",
                       help=f"{docs[f.name]} (default: the preset's)".replace("%", "%%"))
    m.add_argument("--n_embd", dest="d_model", type=int, default=argparse.SUPPRESS, help="nanoGPT's name for d_model")
    p.set_defaults(func=cmd_train)
    return p


def _train_config(args):
    from tinyformer.config import ModelConfig
    from tinyformer.data import PAIR_CORPORA
    from tinyformer.train import TRAIN_PRESETS, TrainConfig
    given = {k: v for k, v in vars(args).items() if k not in ("func", "command", "debug")}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    preset = given.get("preset", TrainConfig.preset)
    data = given.get("data", TrainConfig.data)
    if "preset" not in given and (data in PAIR_CORPORA or (Path(data) / "pairs.json").is_file()):
        preset = given["preset"] = "g2p-cmudict"  # word pairs: the encoder-decoder preset, not the baby GPT
    train_kw = {**TRAIN_PRESETS.get(preset, {}), **{k: v for k, v in given.items() if k in train_fields}}
    model_kw = {k: v for k, v in given.items() if k in model_fields and k not in train_fields}
    return TrainConfig(**train_kw, model=model_kw)


def cmd_train(args):
    from tinyformer.train import train
    cfg = _train_config(args)
    summary = train(cfg)
    _report(summary)


def _report(s):
    tps = f"{s['tokens_per_s']:,.0f}" if s.get("tokens_per_s") else "n/a"
    val = f"{s['val_loss']:.4f}" if s.get("val_loss") is not None else "n/a"
    trainable = s.get("trainable", s["params"])
    part = f"{trainable / 1e6:.2f}M of " if trainable < s["params"] else ""  # LoRA: its adapters, or a new head
    print(f"trained {part}{s['params'] / 1e6:.2f}M parameters for {s['iters']} iterations in {s['seconds']:.1f} s: "
          f"val loss {val}, {tps} tokens/s; saved in {s['out_dir']}" + (f", loss plot {s['plot']}"
                                                                       if s.get("plot") else ""))


# ----------------------------------------------------------------------------------------------------------------------
def cmd_prepare(args):
    from tinyformer.data import PAIR_CORPORA, prepare, prepare_g2p
    if args.data in PAIR_CORPORA:  # word pairs: their own tokenizer (letters and phonemes) and split by word
        if args.tokenizer is not None:
            raise ValueError(f"--tokenizer: {args.data} has its own tokenizer (a token per letter and per phoneme)")
        out = prepare_g2p(args.out, **({} if args.val_fraction is None else {"val_fraction": args.val_fraction}))
    else:
        out = prepare(args.data, args.out, args.tokenizer or "char", args.vocab_size,
                      0.1 if args.val_fraction is None else args.val_fraction)
    print((out / "meta.json").read_text().strip())


def _load_model(path):
    import tinyformer
    model = tinyformer.load(path)
    if model.tokenizer is None:
        raise ValueError(f"{path} has no tokenizer.json: sample and eval need one")
    return model


def cmd_sample(args):
    import torch
    model = _load_model(args.model)
    if model.config.arch != "decoder":
        raise ValueError(f"sample needs a decoder model; {args.model} is an {model.config.arch}")
    tok = model.tokenizer
    prompt = args.prompt if args.prompt else "\n"
    chat = model.chat_template is not None if args.chat is None else args.chat
    if chat:
        from tinyformer.chat import apply_chat_template
        text = apply_chat_template(model, [{"role": "user", "content": prompt}])
    else:
        text = prompt
    from tinyformer.data import encode
    from tinyformer.generate import check_args
    ids = encode(tok, text).tolist()  # a clear error for characters a char-level vocabulary lacks
    if not ids:
        raise ValueError(f"the prompt {prompt!r} encodes to no tokens")
    eos = model.eos_token_id if chat else None
    prompt_ids = torch.tensor([ids])  # (1, T)
    check_args(model, prompt_ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p, eos)
    g = torch.Generator().manual_seed(args.seed)  # (the options checked before any text is printed)
    if args.compile and args.max_new_tokens > 1:
        print("compiling the decode step (torch.compile: tens of seconds the first time)...", file=sys.stderr)
    for n in range(args.num_samples):
        new: list[int] = []
        shown = [0]

        def stream(nxt):
            new.append(int(nxt[0]))
            text = tok.decode(new)
            sys.stdout.write(text[shown[0]:])
            sys.stdout.flush()
            shown[0] = len(text)

        sys.stdout.write("" if chat else prompt)
        model.generate(prompt_ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, generator=g, on_token=stream, eos_token_id=eos, compile=args.compile)
        sys.stdout.write("\n" + ("-" * 40 + "\n" if n + 1 < args.num_samples else ""))


def cmd_eval(args):
    from tinyformer.eval import evaluate
    evaluate(_load_model(args.model), args.data, split=args.split, block_size=args.block_size, stride=args.stride,
             num_beams=args.num_beams, limit=args.limit, name=args.model)


def cmd_export(args):
    import warnings

    from tinyformer.export import export
    calib = None
    if args.method != "rtn":
        from tinyformer.eval import calibration_windows
        model = _load_model(args.model)
        length = min(args.window, model.config.max_seq_len)
        calib = calibration_windows(model.tokenizer, args.calib, args.calib_windows, length, seed=0)
    else:
        model = args.model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = export(model, args.out, format=args.format, quant=args.quant, overwrite=args.overwrite,
                     method=args.method, calib=calib, strict=args.strict)
    for w in caught:
        print(f"tinyformer export: warning: {w.message}", file=sys.stderr)
    size = sum(f.stat().st_size for f in out.rglob("*")) if out.is_dir() else out.stat().st_size
    print(f"wrote {out} ({args.format}{', ' + args.quant if args.quant else ''}, {size / 1e6:.1f} MB)")


def cmd_compress(args):
    from tinyformer.checkpoint import write_json
    from tinyformer.compress.recipe import measure, parse_recipe, report_table, run_recipe
    from tinyformer.data import split_ids
    from tinyformer.eval import calibration_windows, perplexity, sotu_perplexity
    steps = parse_recipe(args.recipe)  # errors before any slow work
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"--out {out} exists and is not empty (pass --overwrite to replace the model in it)")
    model = _load_model(args.model)
    if model.config.arch != "decoder":
        raise ValueError(f"compress needs a decoder language model; {args.model} is an {model.config.arch}")
    length = min(args.window, model.config.max_seq_len)
    if args.eval == "sotu" and not Path(args.eval).exists():
        def evaluate(m):
            return sotu_perplexity(m, window=length)
        metric = "sotu perplexity"
    else:
        val = split_ids(model.tokenizer, args.eval, "val")

        def evaluate(m):
            return perplexity(m, val[: args.eval_tokens], length)
        metric = f"{args.eval} val perplexity"
    calib = calibration_windows(model.tokenizer, args.calib, args.calib_windows, length, seed=0)
    data = calibration_windows(model.tokenizer, args.calib, args.train_windows, length, seed=1)
    print(f"compressing {args.model} with {' -> '.join(v for v, _ in steps)}; calibration {tuple(calib.shape)} "
          f"and training {tuple(data.shape)} windows of {args.calib}")
    rows = [measure(model, evaluate, "original")]
    for i, step in enumerate(steps):
        model = run_recipe(model, [step], calib, data)
        rows.append(measure(model, evaluate, " -> ".join(v for v, _ in steps[: i + 1])))
    model.save(out)
    table = report_table(rows, metric)
    write_json(out / "compression.json", {"recipe": args.recipe, "steps": [[v, kw] for v, kw in steps],
                                          "source": str(args.model), "metric": metric, "rows": rows})
    print(table)
    print(f"compressed model saved in {out} (report in {out / 'compression.json'})")
    return rows


def cmd_demo(args):
    from tinyformer.train import TRAIN_PRESETS, TrainConfig, train
    cfg = TrainConfig(**{**TRAIN_PRESETS["baby-shakespeare-char"], "max_iters": args.iters,
                         "lr_decay_iters": args.iters, "warmup_iters": min(100, args.iters // 10),
                         "eval_interval": max(1, min(250, args.iters))},
                      out_dir=args.out_dir, data="shakespeare", preset="baby-shakespeare-char")
    print(f"tinyformer demo: nanoGPT's baby GPT (4 layers, 4 heads, 128 wide, block 64) on {cfg.data} "
          f"(8 Shakespeare plays, character-level), {cfg.max_iters} iterations on {cfg.device}")
    summary = train(cfg)
    _report(summary)
    import torch

    import tinyformer
    model = tinyformer.load(cfg.out_dir)
    g = torch.Generator().manual_seed(0)
    prompt = model.tokenizer.encode("Romeo:\n").ids
    t = time.perf_counter()
    out = model.generate(torch.tensor([prompt]), 300, temperature=0.8, top_k=50, generator=g)
    dt = time.perf_counter() - t
    print("\n--- sample (temperature 0.8, top-k 50) ---")
    print(model.tokenizer.decode(out[0].tolist()))
    ctx = model.config.max_seq_len
    print(f"--- {300 / dt:,.0f} tokens/s: the KV cache up to the model's {ctx}-token context, then the last {ctx} "
          f"tokens recomputed for each new one (nanoGPT's sliding window) ---")
    print(f"model saved in {cfg.out_dir}: `tinyformer sample --model {cfg.out_dir}` for more text")
    if args.compress:
        recipe = "prune:method=wanda,sparsity=0.5 -> finetune:steps=100,lr=3e-4 -> quantize:bits=8"
        print(f"\n--- compression: {recipe} ---")
        rows = cmd_compress(argparse.Namespace(model=cfg.out_dir, recipe=recipe, out=f"{cfg.out_dir}-compressed",
                                               overwrite=True, calib="shakespeare", eval="shakespeare",
                                               eval_tokens=20_000, window=64, calib_windows=64, train_windows=512))
        if rows[-1]["tokens_per_s"] < rows[-2]["tokens_per_s"]:
            print("(int8 decodes slower here: this model's 3 MB of weights sit in the CPU cache, so the int8 kernel's "
                  "cost per call outweighs the memory traffic it saves; on a model whose weights stream from memory "
                  "it decodes faster: `python benchmarks/generate.py --dtypes fp32,int8` on SmolLM2-135M)")


def _bench_suite():
    """benchmarks/suite.py of this checkout: the suite drives the scripts in benchmarks/, which are not installed."""
    import importlib.util
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "suite.py"
    if not path.is_file():
        raise ValueError(f"the benchmark suite lives in the benchmarks/ folder of a tinyformer checkout (not found at "
                         f"{path.parent}); install tinyformer from a checkout with `pip install -e .`")
    if "tinyformer_bench_suite" not in sys.modules:
        spec = importlib.util.spec_from_file_location("tinyformer_bench_suite", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["tinyformer_bench_suite"] = mod  # before it runs: its dataclasses look their module up
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            del sys.modules["tinyformer_bench_suite"]
            raise
    return sys.modules["tinyformer_bench_suite"]


def cmd_bench(args):
    if args.what == "aot":
        if args.quick or args.only or args.out or args.nanogpt or args.list or args.report_only or args.timeout:
            raise ValueError("the suite's options go without `aot`; `tinyformer bench aot --help` lists aot's own")
        from tinyformer.kernels import aot
        raise SystemExit(aot.main(args.rest))
    if args.rest:
        raise ValueError(f"unexpected arguments {' '.join(args.rest)!r} (`tinyformer bench --help`)")
    if args.timeout is not None and args.timeout <= 0:
        raise ValueError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    suite = _bench_suite()
    if args.list:
        print(suite.describe())
        return
    if args.report_only:
        suite._select(suite.STEPS, args.only)  # the same name check as a run
        print(f"report: {suite.write_report(args.out)}")
        return
    raise SystemExit(suite.run_suite(args.only, quick=args.quick, out=args.out, nanogpt=args.nanogpt,
                                     timeout=args.timeout))


# ----------------------------------------------------------------------------------------------------------------------
def build_parser():
    p = argparse.ArgumentParser(prog="tinyformer", description="tiny transformers written on tensors")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="the main job: train nanoGPT's baby Shakespeare model, sample, save")
    d.add_argument("--iters", type=int, default=2000, help="training iterations (default 2000, nanoGPT's)")
    d.add_argument("--out_dir", default=DEMO_DIR, help=f"where the model, its loss plot and the compressed model go "
                                                         f"(default {DEMO_DIR})")
    d.add_argument("--compress", type=_bool, default=True, metavar="BOOL",
                   help="then prune (Wanda 50%%), fine-tune and int8-quantize the model, with a report (default true)")
    d.set_defaults(func=cmd_demo)

    pr = sub.add_parser("prepare", help="tokenize a corpus or .txt file into a dataset folder")
    pr.add_argument("--data", required=True, help="a built-in corpus (shakespeare, shakespeare-all, sotu, ptb; "
                                                   "cmudict-g2p: grapheme-to-phoneme pairs) or a .txt file")
    pr.add_argument("--out", required=True, help="output folder")
    pr.add_argument("--tokenizer", default=None, choices=["char", "bpe", "word"],
                    help="char (default), byte-level BPE (trained on the train split) or word level; cmudict-g2p "
                         "has its own")
    pr.add_argument("--vocab_size", type=int, default=8192, help="BPE vocabulary size")
    pr.add_argument("--val_fraction", type=float, default=None,
                    help="share held out for validation: the text's last 10%% by default; cmudict-g2p: 2.5%% of "
                         "the words (besides its fixed 10%% test words)")
    pr.set_defaults(func=cmd_prepare)

    _train_parser(sub)

    s = sub.add_parser("sample", help="stream text from a decoder: a training run, a Hugging Face Llama, a GGUF file")
    s.add_argument("--model", required=True,
                   help="a tinyformer model folder (e.g. a training --out_dir), a Hugging Face Llama folder or a "
                        "Llama GGUF file")
    s.add_argument("--prompt", default="", help="text to continue (default: a newline)")
    s.add_argument("--max_new_tokens", type=int, default=500, help="tokens generated per sample (default 500)")
    s.add_argument("--temperature", type=float, default=0.8,
                   help="divides the logits before sampling; 0 is greedy (default 0.8)")
    s.add_argument("--top_k", type=int, default=200, help="sample among the k likeliest tokens only (default 200)")
    s.add_argument("--top_p", type=float, default=None,
                   help="nucleus sampling: among the likeliest tokens holding this much probability (default off)")
    s.add_argument("--num_samples", type=int, default=1, help="independent samples of the prompt (default 1)")
    s.add_argument("--seed", type=int, default=1337, help="seed of the sampling generator (default 1337)")
    s.add_argument("--chat", type=_bool, default=None, metavar="BOOL",
                   help="wrap the prompt in the model's chat template as a user turn and stop at its end-of-sequence "
                        "token (default: true when the model has a chat template)")
    s.add_argument("--compile", action="store_true",
                   help="decode through torch.compile of the model's forward: faster per token after a one-off "
                        "compile (26-41 s for SmolLM2-135M on 2 cores; needs a C++ compiler: without one it warns "
                        "and decodes as before)")
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser("eval", help="perplexity of a decoder on a dataset or text file; the masked-LM loss of an "
                                    "encoder; WER/PER of a G2P model; accuracy, macro-F1 and the confusion matrix "
                                    "of a classifier on labelled .jsonl/.csv")
    e.add_argument("--model", required=True,
                   help="a tinyformer model folder, a Hugging Face BERT or Llama folder, or a Llama GGUF file")
    e.add_argument("--data", required=True,
                   help="a prepared dataset folder (its --split is used), a .txt file (all of it), a built-in "
                        "corpus (shakespeare, shakespeare-all, ptb: its --split, the first 90%% or last 10%% of the "
                        "text, in the model's own tokenizer), or `sotu`: the fixed held-out perplexity protocol (last "
                        "10 State of the Union speeches, first 16,384 tokens of the model's own tokenizer, 32 windows "
                        "of 512); for a classifier, a labelled .jsonl ({\"text\", \"label\"}) or .csv (text,label)")
    e.add_argument("--split", default="val", choices=["train", "val", "test"],
                   help="language models: val by default; paired data: the held-out test split")
    e.add_argument("--num_beams", type=int, default=5, help="encoder-decoder: beam width (greedy is reported too)")
    e.add_argument("--limit", type=int, default=None, help="encoder-decoder: score only the first N words")
    e.add_argument("--block_size", type=int, default=None, help="window (default: the model's max_seq_len)")
    e.add_argument("--stride", type=int, default=None, help="window stride (default: block_size, disjoint)")
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("compress", help="run a compression recipe on a model and report what each step changed",
                       description="Compress a decoder model with a recipe of steps joined by '->', each `verb` or "
                                   "`verb:key=value,...` (verbs: distill, prune, lowrank, quantize, finetune; keys are "
                                   "the verb's keyword arguments), or a named recipe. Each stage is measured: "
                                   "parameters, bytes on disk, perplexity, decode tokens/s.")
    c.add_argument("--model", required=True, help="a model folder or GGUF file")
    c.add_argument("--recipe", required=True,
                   help="e.g. 'distill:steps=300 -> prune:method=wanda,sparsity=0.5 -> quantize:bits=8', or one of: "
                        "int8, int4, int4-gptq, wanda50, distil-prune-int8")
    c.add_argument("--out", required=True, help="folder for the compressed model and compression.json")
    c.add_argument("--overwrite", action="store_true", help="allow --out to be a non-empty folder")
    c.add_argument("--calib", default="sotu",
                   help="text for calibration, distillation and fine-tuning windows: sotu (the training speeches), "
                        "a built-in corpus, a .txt file or a prepared dataset folder (default: sotu)")
    c.add_argument("--eval", default="sotu",
                   help="sotu (the fixed held-out protocol) or a corpus/.txt/dataset folder whose last 10%% (val "
                        "split) is scored (default: sotu)")
    c.add_argument("--eval_tokens", type=int, default=100_000, help="non-sotu evaluation: at most this many tokens")
    c.add_argument("--window", type=int, default=512, help="window length (capped at the model's context)")
    c.add_argument("--calib_windows", type=int, default=32, help="calibration windows (default 32)")
    c.add_argument("--train_windows", type=int, default=256, help="windows for distill/finetune (default 256)")
    c.set_defaults(func=cmd_compress)

    x = sub.add_parser("export",
                       help="write a model as a GGUF file (llama.cpp) or a Hugging Face folder (transformers)",
                       description="Export a decoder to GGUF (Llama family as 'llama', GPT-2 family as 'gpt2', with "
                                   "its tokenizer and chat template), or any Llama / GPT-2 decoder or BERT encoder to "
                                   "a Hugging Face folder. Quantized layers keep their codes where a GGUF block type "
                                   "holds them (int8 -> Q8_0, int4 symmetric -> Q4_0, int4 asymmetric -> Q4_1); a "
                                   "layer a type cannot hold is requantized with a warning naming it (--strict: "
                                   "refused). --quant on a float model quantizes it first (RTN, or --method gptq / "
                                   "awq on --calib windows).")
    x.add_argument("--model", required=True, help="a model folder (tinyformer or Hugging Face) or a GGUF file")
    x.add_argument("--format", required=True, choices=["gguf", "hf"], help="gguf (llama.cpp) or hf (transformers)")
    x.add_argument("--out", required=True, help="the .gguf file or the Hugging Face folder to write")
    x.add_argument("--quant", default=None, choices=["f32", "f16", "q8_0", "q4_0", "q4_1"],
                   help="GGUF type of the block linears (default: each layer as it is: float -> f32)")
    x.add_argument("--method", default="rtn", choices=["rtn", "gptq", "awq"],
                   help="how --quant quantizes a float model (gptq / awq use --calib windows)")
    x.add_argument("--calib", default="sotu", help="calibration text for gptq / awq (default: sotu's training "
                                                     "speeches)")
    x.add_argument("--calib_windows", type=int, default=32, help="calibration windows (default 32)")
    x.add_argument("--window", type=int, default=512, help="calibration window length (capped at the context)")
    x.add_argument("--strict", action="store_true", help="refuse layers that would need requantizing")
    x.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    x.set_defaults(func=cmd_export)

    b = sub.add_parser(
        "bench", help="the benchmark suite and its markdown report; `bench aot`: the AOT compile report alone",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the benchmark suite on this machine (CPU, or the GPU when there is one): training speed "
                    "(against nanoGPT with --nanogpt), attention, low-bit matmul, generation, compression and the "
                    "AOT compile report, each step a script of benchmarks/ in its own process. Each appends CSV "
                    "rows (device, versions, timestamp, configuration) to the results folder, and RESULTS.md is "
                    "rewritten from those CSV files: every row with its date, machine, versions and command. A "
                    "failing step is reported and the suite goes on; the exit status is 1 if any failed.",
        epilog="examples:\n  tinyformer bench --quick\n  tinyformer bench --only matmul aot\n"
               "  tinyformer bench --nanogpt ~/src/nanoGPT --out /tmp/bench\n"
               "  tinyformer bench aot --targets 90 --filter attn   # the AOT report alone, its own options")
    b.add_argument("what", nargs="?", choices=["aot"],
                   help="aot: only the ahead-of-time compile report (registers, spills, shared memory of every "
                        "kernel config for sm_80/sm_90); its own options follow (`tinyformer bench aot --help`)")
    b.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    b.add_argument("--quick", action="store_true",
                   help="small sizes and few iterations: the whole suite in minutes on a CPU (default: full runs)")
    b.add_argument("--only", nargs="+", metavar="NAME",
                   help="run only these steps (default: all; --list names them); the report keeps the latest "
                        "results of the others, dated")
    b.add_argument("--out", default=None, metavar="DIR",
                   help="results folder: the CSV files, PNG plots, logs/ and, for a folder other than the default "
                        "benchmarks/results of this checkout (whose report is benchmarks/RESULTS.md), RESULTS.md")
    b.add_argument("--nanogpt", default=None, metavar="PATH",
                   help="a karpathy/nanoGPT checkout: the training-speed step runs its train.py too, as the anchor")
    b.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="stop a step after S seconds and report it as failed (default: no limit)")
    b.add_argument("--list", action="store_true", help="name the steps and what each measures, then exit")
    b.add_argument("--report-only", action="store_true",
                   help="regenerate RESULTS.md from the results folder's CSV files without running anything")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("tinyformer: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError, OSError, RuntimeError) as e:
        if args.debug:
            raise
        print(f"tinyformer {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
