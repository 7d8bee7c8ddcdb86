"""Parameter-efficient fine-tuning: LoRA adapters on a model's linear layers, over a float base or a frozen int8 /
int4 one (QLoRA), saved and read in Hugging Face PEFT's layout (adapter_config.json + adapter_model.safetensors).

A `LoRALinear` wraps a base linear (`model.Linear`, or `qlinear.Int8Linear` / `Int4Linear`):
y = base(x) + (dropout(x) @ A^T @ B^T) * alpha / r, A (r, in) Kaiming-uniform (a = sqrt(5), as PEFT and nn.Linear
initialise), B (out, r) zero, so training starts from the unchanged model. The base stays frozen; its products keep
their kernels (the int8 / int4 ones are differentiable in x, `kernels.matmul.FrozenWeightMatmul`), and where the
model's forward asks `ops.linears` for q/k/v or gate/up together, the bases' products still stack into one GEMM and
each adapter adds its own low-rank term (`ops.linears` sees `scheme = "lora"`): no second copy of the forward.

Verbs (each changes the model in place and returns it, as tinyformer.compress's do):
- `add_lora_(model, rank, alpha=None, dropout=0.0, targets=None, train=())`: wrap the targeted linears, freeze the
  rest except the `train` modules (PEFT's modules_to_save, e.g. a classification head).
- `quantize_base_(model, bits, group_size=128)`: QLoRA's frozen int8 / int4 base (round to nearest), before add_lora_.
- `merge_lora_(model, unload=False)`: fold alpha / r * B @ A into each float base weight, keeping the pre-merge weight
  so that `unmerge_lora_(model)` restores it bit-exactly. `unload=True` (or `unload_lora(model)`) then replaces each
  wrapper by its merged base: a plain model that `model.save` writes and `tinyformer.load` reads with no LoRA keys.
- `save_adapter(model, dir)` / `load_adapter(model, dir)`: PEFT's files and tensor names (a Llama base:
  base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight; a BERT base:
  base_model.model.encoder.layer.0.attention.self.query.lora_A.weight; other architectures: tinyformer's own module
  names), so `peft.PeftModel.from_pretrained` reads ours onto transformers' model of the same base and
  `tinyformer.load(base, adapter=dir)` reads PEFT's.
- `trainable_state_dict(model)`: the tensors that training changes (adapters and `train` modules), for checkpoints.

References: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (the update B A scaled by alpha / r,
B = 0 at the start, merging for inference); Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs"
(adapters trained through a frozen low-bit base, the gradient flowing through its dequantized weight); Kalajdzievski
2023 (rsLoRA: alpha / sqrt(r), read from PEFT's use_rslora); huggingface/peft (file layout and tensor names, read to
match them, not copied).

Legend: r rank, K in-features, N out-features.
"""
from __future__ import annotations

import fnmatch
import json
import math
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyformer import ops
from tinyformer.checkpoint import atomic_write, write_json
from tinyformer.model import Linear
from tinyformer.names import BERT_BLOCK, LLAMA_BLOCK, bert_name, llama_name
from tinyformer.qlinear import Int4Linear, Int8Linear

__all__ = ["LoRALinear", "add_lora_", "quantize_base_", "merge_lora_", "unmerge_lora_", "unload_lora", "save_adapter", "load_adapter",
           "lora_modules", "trainable_state_dict", "DEFAULT_ALPHA", "DEFAULT_TARGETS"]

DEFAULT_ALPHA = 8  # PEFT's LoraConfig default lora_alpha
# every block's attention (self and cross) and feed-forward projection
DEFAULT_TARGETS = (r".*blocks\.\d+\.(attn|cross_attn)\.w[qkvo]", r".*blocks\.\d+\.mlp\.w[123]")
BASES = (Linear, Int8Linear, Int4Linear)  # exact types: W8A8 / FP8 have no input gradient, LowRankLinear no weight
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel's attribute path to the wrapped transformers model

# Hugging Face names users know -> ours, for `targets` (both Llama's and BERT's block tables, full and last part)
ALIASES = {**{v: k for k, v in LLAMA_BLOCK.items()}, **{v.rpartition(".")[2]: k for k, v in LLAMA_BLOCK.items()},
           **{v: k for k, v in BERT_BLOCK.items()}, "query": "attn.wq", "key": "attn.wk", "value": "attn.wv"}


class LoRALinear(nn.Module):
    """y = base(x) + (dropout(x) @ lora_A^T @ lora_B^T) * scaling, scaling = alpha / r (alpha / sqrt(r) with rsLoRA).
    The base is frozen; lora_A (r, K) and lora_B (N, r) are the trained parameters, in the base's float dtype (fp32
    over an int8 / int4 base); x is cast to it for the adapter's products, as PEFT does."""

    scheme = "lora"  # ops.linears stacks the bases of layers that read one input and adds each `delta`

    def __init__(self, base: nn.Module, rank: int, alpha: float = DEFAULT_ALPHA, dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__()
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"LoRA rank must be a positive int, got {rank!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        self.base, self.rank, self.alpha, self.dropout, self.use_rslora = base, rank, alpha, float(dropout), use_rslora
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        n_out, n_in = _shape(base)
        w = getattr(base, "weight", None)
        dtype = w.dtype if isinstance(w, torch.Tensor) and w.is_floating_point() else torch.float32
        device = _device(base)
        self.lora_A = nn.Parameter(torch.empty(rank, n_in, dtype=dtype, device=device))  # (r, K)
        self.lora_B = nn.Parameter(torch.zeros(n_out, rank, dtype=dtype, device=device))  # (N, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's init of A (nn.Linear's default)
        self.unmerged_weight = None  # while merged: the base's weight as it was before, for a bit-exact unmerge

    @property
    def merged(self) -> bool:
        return self.unmerged_weight is not None

    def delta(self, x):
        """The adapter's term (..., N) for x (..., K), in lora_A's dtype; None while merged (the base holds it)."""
        if self.merged:
            return None
        h = F.dropout(x, self.dropout, self.training).to(self.lora_A.dtype)
        return ops.linear(ops.linear(h, self.lora_A), self.lora_B) * self.scaling  # (..., K) -> (..., r) -> (..., N)

    def forward(self, x):
        y = self.base(x)
        d = self.delta(x)
        return y if d is None else y + d.to(y.dtype)

    def merge(self) -> None:
        if self.merged:
            return
        if type(self.base) is not Linear:
            raise ValueError(f"cannot merge a LoRA adapter into a {type(self.base).__name__} base: the update does "
                             f"not fit its {self.base.scheme} codes; dequantize first (load the float base, "
                             f"load_adapter onto it, then merge), or keep the adapter unmerged")
        w = self.base.weight
        with torch.no_grad():
            self.unmerged_weight = w.detach().clone()  # a float subtraction would not give the weight back exactly
            update = (self.lora_B.float() @ self.lora_A.float()) * self.scaling  # (N, r) @ (r, K) -> (N, K)
            w.copy_((w.float() + update).to(w.dtype))  # in place: optimizers keep their reference to the Parameter

    def unmerge(self) -> None:
        if not self.merged:
            return
        with torch.no_grad():
            self.base.weight.copy_(self.unmerged_weight)
        self.unmerged_weight = None

    def extra_repr(self):
        return f"rank={self.rank}, alpha={self.alpha}, dropout={self.dropout}, merged={self.merged}"


def _shape(base) -> tuple[int, int]:
    if isinstance(base, Linear):
        return tuple(base.weight.shape)  # (N, K)
    return base.n_out, base.n_in


def _device(module):
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def lora_modules(model) -> dict[str, LoRALinear]:
    """{qualified name: LoRALinear} of the model's adapters, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


# ----------------------------------------------------------------------------------------------------------------------
# add, merge, unmerge
def _matches(name: str, pattern: str) -> bool:
    """PEFT's rule (the name, or a suffix after a dot), a shell-style wildcard, or a regular expression over the whole
    qualified name; Hugging Face names (q_proj, attention.output.dense, ...) stand for ours (`ALIASES`)."""
    pattern = ALIASES.get(pattern, pattern)
    if name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:  # a wildcard pattern such as "*.wq" is no regular expression
        return False


def _set(model, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def add_lora_(model, rank: int, alpha: float | None = None, dropout: float = 0.0, targets=None, train=()):
    """Wrap the linears whose qualified names match `targets` (a pattern or a list: see `_matches`; default
    DEFAULT_TARGETS, every block's attention and feed-forward projection) in LoRALinear adapters of rank `rank`,
    alpha `alpha` (None: PEFT's default, 8) and input dropout `dropout`. Freezes every parameter except the adapters'
    and those of the modules matching `train` (PEFT's modules_to_save, e.g. "classifier"). Returns the model.

    Raises ValueError when a target or train pattern matches nothing."""
    alpha = DEFAULT_ALPHA if alpha is None else alpha
    targets = [targets] if isinstance(targets, str) else list(targets or DEFAULT_TARGETS)
    train = [train] if isinstance(train, str) else list(train)
    inside = {n for n, m in model.named_modules() if isinstance(m, LoRALinear) for n in (n, n + ".base")}
    linears = {n: m for n, m in model.named_modules() if type(m) in BASES and n not in inside}
    chosen = {}
    for pattern in targets:
        hits = {n: m for n, m in linears.items() if _matches(n, pattern)}
        if not hits:
            raise ValueError(f"LoRA target {pattern!r} matches no linear layer of this model (e.g. "
                             f"{', '.join(list(linears)[:3]) or 'none left unwrapped'})")
        chosen.update(hits)
    modules = dict(model.named_modules())
    trained = {}
    for pattern in train:
        hits = {n: m for n, m in modules.items() if n and _matches(n, pattern) and n not in chosen}
        if not hits:
            raise ValueError(f"train pattern {pattern!r} matches no module of this model")
        trained.update(hits)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, base in chosen.items():
        _set(model, name, LoRALinear(base, rank, alpha, dropout))
    for m in trained.values():
        for p in m.parameters():
            p.requires_grad_(True)
    model.lora_train = sorted(set(getattr(model, "lora_train", ())) | set(trained))  # saved with the adapter
    return model


def quantize_base_(model, bits: int, group_size: int = 128):
    """QLoRA's frozen low-bit base: every float linear of the blocks becomes an Int8Linear (bits=8, per output
    channel) or Int4Linear (bits=4, per group of `group_size` inputs), round-to-nearest, in place; call before
    add_lora_, whose adapters then train through the quantized products. (`compress.quantize_` offers the
    calibrated methods for a model that is not trained further.) Returns the model."""
    if bits not in (8, 4):
        raise ValueError(f"a quantized base has 8 or 4 bits, got {bits!r}")
    for name, m in list(model.named_modules()):
        if type(m) is Linear and ".blocks." in f".{name}":
            q = Int8Linear.from_weight(m.weight, m.bias) if bits == 8 else \
                Int4Linear.from_weight(m.weight, m.bias, group_size)
            _set(model, name, q.to(m.weight.device))
    return model


def merge_lora_(model, unload: bool = False):
    """Fold each adapter's update into its float base weight (the model then runs at the base's speed); keeps the
    pre-merge weights, so `unmerge_lora_` restores them bit-exactly. unload=True then replaces each wrapper by its
    merged base (`unload_lora`): a plain model for `model.save`. Raises ValueError for an int8 / int4 base."""
    adapters = lora_modules(model)
    bad = [n for n, m in adapters.items() if type(m.base) is not Linear]
    if bad:
        adapters[bad[0]].merge()  # raises, naming the base's scheme, before any weight changed
    for m in adapters.values():
        m.merge()
    return unload_lora(model) if unload else model


def unmerge_lora_(model):
    """Restore each merged base weight exactly as it was before `merge_lora_`. Returns the model."""
    for m in lora_modules(model).values():
        m.unmerge()
    return model


def unload_lora(model, merge: bool = True):
    """Replace each LoRALinear by its base, merged first (merge=False drops the adapters instead): a plain model whose
    state dict has no LoRA keys, which `model.save` writes and `tinyformer.load` reads. Returns the model."""
    for name, m in lora_modules(model).items():
        if merge:
            m.merge()
        elif m.merged:
            m.unmerge()
        _set(model, name, m.base)
    if hasattr(model, "lora_train"):
        del model.lora_train
    return model


def trainable_state_dict(model) -> dict:
    """The tensors that LoRA training changes, by tinyformer's names (adapters and `train` modules): what a training
    checkpoint needs beside the base (which stays as loaded); `model.load_state_dict(sd, strict=False)` restores it."""
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if v.requires_grad}


# ----------------------------------------------------------------------------------------------------------------------
# PEFT's files
def _hf_param_names(model, ours: str) -> list[str]:
    """Our parameter name -> the names a transformers model of the same base gives it, the one to write first: Llama
    (LlamaForCausalLM, then LlamaModel) for a decoder, BERT (BertModel, then BertFor*) for an encoder; last our own
    name, the only one for what has no Hugging Face counterpart (encoder-decoder, cross-attention, a task head)."""
    try:
        if model.config.arch == "decoder":
            return [llama_name(ours, "model."), llama_name(ours, ""), ours]
        if model.config.arch == "encoder":
            return [bert_name(ours), "bert." + bert_name(ours), ours]
    except (KeyError, ValueError, IndexError):  # not in the architecture's table
        pass
    return [ours]


def _hf_module_names(model, ours: str) -> list[str]:
    """Our module name -> its Hugging Face names, as `_hf_param_names` (a module is named by its weight's name)."""
    return [n.removesuffix(".weight") for n in _hf_param_names(model, ours + ".weight")]


def _unwrapped(name: str) -> str:
    """A name inside a LoRALinear ("...wq.base.weight") -> the name it has in the plain model ("...wq.weight")."""
    return name.replace(".base.", ".").removesuffix(".base")


def _suffixes(hf: str, adapted: set[str], every: set[str]) -> str:
    """The shortest dotted suffix of `hf` that PEFT's target_modules rule (name == s or name ends with "." + s) maps
    to adapted modules only (BERT's "dense" and "output.dense" would reach others), else the whole name."""
    parts = hf.split(".")
    for i in range(len(parts) - 1, -1, -1):
        s = ".".join(parts[i:])
        if s.isdigit() or s == "dense":
            continue
        if all(n in adapted for n in every if n == s or n.endswith("." + s)):
            return s
    return hf


def save_adapter(model, path, base_model_name_or_path: str | None = None) -> None:
    """Write `path`/adapter_model.safetensors + adapter_config.json in PEFT's layout and names (see the module's
    docstring), each file atomically (whole or not at all; other files in the folder stay)."""
    from safetensors.torch import save

    adapters = lora_modules(model)
    if not adapters:
        raise ValueError("the model has no LoRA adapters to save (add_lora_ or load_adapter first)")
    every = {_hf_module_names(model, _unwrapped(n))[0] for n, m in model.named_modules() if type(m) in BASES}
    hf_of = {name: _hf_module_names(model, name)[0] for name in adapters}
    adapted = set(hf_of.values())
    tensors, targets, ranks, alphas = {}, set(), {}, {}
    for name, m in adapters.items():
        hf = hf_of[name]
        tensors[f"{PEFT_PREFIX}{hf}.lora_A.weight"] = m.lora_A.detach().contiguous().cpu()  # (r, K)
        tensors[f"{PEFT_PREFIX}{hf}.lora_B.weight"] = m.lora_B.detach().contiguous().cpu()  # (N, r)
        targets.add(_suffixes(hf, adapted, every))
        ranks[hf], alphas[hf] = m.rank, m.alpha
    saved = []
    for name in getattr(model, "lora_train", ()):
        for k, v in model.get_submodule(name).state_dict().items():
            tensors[PEFT_PREFIX + _hf_param_names(model, f"{name}.{k}")[0]] = v.detach().contiguous().cpu()
        saved.append(name.rpartition(".")[2])  # PEFT matches modules_to_save by the name's last part
    first = next(iter(adapters.values()))
    r, alpha = first.rank, first.alpha
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": alpha, "lora_dropout": first.dropout, "target_modules": sorted(targets),
        "rank_pattern": {k: v for k, v in ranks.items() if v != r},  # full names: they match one module each
        "alpha_pattern": {k: v for k, v in alphas.items() if v != alpha},
        "modules_to_save": saved or None, "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
        "use_rslora": first.use_rslora, "use_dora": False, "inference_mode": True, "layers_to_transform": None,
        "layers_pattern": None, "revision": None,
    }
    if model.config.num_labels:  # a trained classification head: its classes, for load_adapter to rebuild it (PEFT
        # warns about the key and ignores it, as a transformers user gives num_labels to from_pretrained)
        config["tinyformer"] = {"label_names": model.config.label_names, "pooling": model.config.pooling}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)  # (a training run's out_dir, which holds its checkpoint and metrics too)
    atomic_write(path / ADAPTER_WEIGHTS, lambda f: f.write(save(tensors, metadata={"format": "pt"})))
    write_json(path / ADAPTER_CONFIG, config)


def _pattern_value(hf: str, pattern: dict, default):
    """PEFT's rank_pattern / alpha_pattern: the first key that is the name, a suffix of it, or a regex matching it."""
    for key, value in pattern.items():
        if hf == key or hf.endswith("." + key) or re.fullmatch(key, hf) or re.fullmatch(rf".*\.{key}", hf):
            return value
    return default


def load_adapter(model, path):
    """Read a PEFT LoRA adapter (save_adapter's or peft's save_pretrained's) onto `model`: wrap each module it names
    (or replace the adapter already there), load its modules_to_save tensors, freeze the rest as add_lora_ does.
    Returns the model. Raises ValueError, one line each, for a missing file, a peft_type other than LORA, a tensor
    name that names no module of this base, or a shape that does not fit."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_path, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    for f in (cfg_path, weights):
        if not f.is_file():
            raise ValueError(f"{path} is not a PEFT adapter folder: {f.name} is missing")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {config.get('peft_type')!r} is not supported; only 'LORA'")
    for key in ("use_dora", "fan_in_fan_out"):
        if config.get(key):
            raise ValueError(f"{cfg_path}: {key}=true is not supported by tinyformer's LoRA")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{cfg_path}: bias={config['bias']!r} is not supported; only 'none'")
    state = load_file(weights)
    head = state.get(PEFT_PREFIX + "classifier.weight")
    if head is not None and model.classifier is None:  # a classifier's adapter on its pretrained body: the head anew
        extras = config.get("tinyformer") or {}
        model.add_classifier(extras.get("label_names") or [str(i) for i in range(head.shape[0])],
                             extras.get("pooling", "auto"))
    modules = {_unwrapped(n): m for n, m in model.named_modules()}  # a wrapper's name, not its base's
    modules.update({n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)})
    ours_of = {hf: n for n, m in modules.items() if type(m) in BASES or isinstance(m, LoRALinear)
               for hf in _hf_module_names(model, n)}
    ours_of.update({hf: _unwrapped(n) for n, _ in model.named_parameters() if ".lora_" not in n
                    for hf in _hf_param_names(model, _unwrapped(n))})
    pairs, extra = {}, {}
    for key, t in state.items():
        name = key.removeprefix(PEFT_PREFIX)
        m = re.fullmatch(r"(.+)\.(lora_[AB])(?:\.[^.]+)?\.weight", name)  # PEFT may keep the adapter's name inside
        if m is None:
            if ".lora_" in name:
                raise ValueError(f"{weights}: tensor {key!r} is not a LoRA A/B weight tinyformer reads")
            if name not in ours_of:
                raise ValueError(f"{weights}: tensor {key!r} names no parameter of this base model")
            extra[ours_of[name]] = t
            continue
        hf, which = m.groups()
        ours = ours_of.get(hf)
        target = modules.get(ours) if ours is not None else None
        if isinstance(target, LoRALinear):
            target = target.base
        if type(target) not in BASES:
            raise ValueError(f"{weights}: tensor {key!r} names no linear layer of this base model")
        pairs.setdefault(ours, {})[which] = (hf, t)
    for ours, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"{weights}: module {ours} has {', '.join(sorted(ab))} but not both lora_A and lora_B")
        (hf, A), (_, B) = ab["lora_A"], ab["lora_B"]
        base = modules[ours].base if isinstance(modules[ours], LoRALinear) else modules[ours]
        n_out, n_in = _shape(base)
        r = A.shape[0]
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != n_in or tuple(B.shape) != (n_out, r):
            raise ValueError(f"{weights}: {hf} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, but its base "
                             f"{ours} is ({n_out}, {n_in}): expected ({r}, {n_in}) and ({n_out}, {r})")
        alpha = _pattern_value(hf, config.get("alpha_pattern") or {}, config.get("lora_alpha", DEFAULT_ALPHA))
        lora = LoRALinear(base, r, alpha, config.get("lora_dropout", 0.0), bool(config.get("use_rslora")))
        with torch.no_grad():
            lora.lora_A.copy_(A)
            lora.lora_B.copy_(B)
        _set(model, ours, lora)
    params = {_unwrapped(n): p for n, p in model.named_parameters()}
    for ours, t in extra.items():
        p = params.get(ours)
        if p is None or p.shape != t.shape:
            raise ValueError(f"{weights}: tensor for {ours} has shape {tuple(t.shape)}, the base's is "
                             f"{None if p is None else tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(t)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name or name in extra)
    model.lora_train = sorted(set(getattr(model, "lora_train", ())) |
                              {n.rpartition(".")[0] for n in extra})
    return model
