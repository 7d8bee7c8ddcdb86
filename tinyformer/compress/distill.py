"""Knowledge distillation: train a smaller student to imitate a teacher (`distill`), over pure loss primitives.

What the student learns from, each term optional and weighted:
- logits (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network"): the soft loss
  T^2 * KL(softmax(t / T) || softmax(s / T)), mixed with the hard-label cross-entropy as
  `alpha * soft + (1 - alpha) * hard`, so **alpha weights the teacher's (soft) side**: alpha=1 is pure distillation,
  alpha=0 is ordinary training on the labels. The T^2 keeps the soft gradients' size independent of T (their
  gradient wrt the student logits is (softmax(s/T) - softmax(t/T)) * T / N).
- hidden states (Jiao et al. 2020, TinyBERT, eq. 8): MSE between the output of student block i and of teacher block
  `layer_map[i]`, through a learned projection W_h (C_s -> C_t) when the widths differ. The default map is TinyBERT's
  uniform g(m) = m * N / M (1-based), so the last student block learns from the last teacher block.
- attention maps (TinyBERT eq. 7 uses MSE; Wang et al. 2020, MiniLM, the KL of the attention distributions): the
  self-attention probabilities of mapped blocks. The model's attention runs through SDPA/Triton, which never forms
  the (T, S) matrix, so `Capture` recomputes it from the block's own q and k (a forward hook on each Attention module
  re-applies wq/wk, rotary positions and the masks); the fast path is unchanged.
- sequence level (Kim & Rush 2016, "Sequence-Level Knowledge Distillation"), encoder-decoder only: the teacher's
  greedy or beam outputs on the source replace the reference targets, and the student is trained on them with
  teacher forcing (`teacher_targets`; `distill(..., sequence_level=True)`).

Students: `student_from_teacher` builds the teacher's architecture with half the blocks and copies the embeddings,
blocks 0, 2, 4, ... and the final norm/head (DistilBERT, Sanh et al. 2019, section 3), or initialises it from scratch.

Legend: B batch, T length (query), S key length, C width, H heads, V vocab, K classes, N scored positions.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyformer.config import ModelConfig
from tinyformer.model import Attention, Linear, apply_rope, build

__all__ = ["kd_loss", "hard_loss", "hidden_loss", "attention_probs", "attention_loss", "uniform_layer_map",
           "every_other_layer", "student_from_teacher", "teacher_targets", "Capture", "MeanPoolHead", "distill"]


# ----------------------------------------------------------------------------------------------------------------------
# pure loss primitives
def kd_loss(student_logits, teacher_logits, temperature: float = 2.0, mask=None):
    """T^2 * mean over positions of KL(softmax(t / T) || softmax(s / T)).

    logits (..., V) of the same shape (a position is every index but the last dim); mask (...) bool selects the
    positions that count (None: all). Computed in float32. Zero when the student's logits equal the teacher's."""
    if not isinstance(temperature, (int, float)) or temperature <= 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    V = student_logits.shape[-1]
    log_q = F.log_softmax(student_logits.float().reshape(-1, V) / temperature, dim=-1)  # (N, V)
    log_p = F.log_softmax(teacher_logits.float().reshape(-1, V) / temperature, dim=-1)  # (N, V)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (N,)
    if mask is not None:
        kl = kl[_check_mask(mask, student_logits.shape[:-1]).reshape(-1)]
    if kl.numel() == 0:
        return student_logits.sum() * 0.0
    return kl.mean() * temperature ** 2


def hard_loss(logits, labels, ignore_index: int = -100):
    """Cross-entropy of logits (..., V) against integer labels (...); labels == ignore_index do not count."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must have the shape of logits without the last dim "
                         f"{tuple(logits.shape[:-1])}")
    if (labels != ignore_index).sum() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index)


def hidden_loss(student_hidden, teacher_hidden, proj: Optional[Callable] = None, mask=None):
    """MSE(proj(h_s), h_t), averaged over the positions selected by mask (B, T) bool and the teacher's features.

    student_hidden (B, T, C_s), teacher_hidden (B, T, C_t); proj maps C_s -> C_t (needed when the widths differ)."""
    h = proj(student_hidden) if proj is not None else student_hidden
    if h.shape != teacher_hidden.shape:
        raise ValueError(f"student hidden states {tuple(h.shape)} (after proj) and teacher hidden states "
                         f"{tuple(teacher_hidden.shape)} differ: pass a projection when the widths differ")
    sq = (h.float() - teacher_hidden.float()).pow(2).mean(-1)  # (B, T)
    if mask is not None:
        sq = sq[_check_mask(mask, sq.shape)]
    return sq.mean() if sq.numel() else h.sum() * 0.0


def attention_probs(q, k, causal: bool = False, key_padding_mask=None, scale: Optional[float] = None):
    """softmax(q k^T * scale + mask): the attention probabilities (B, H, T, S) that SDPA never materialises.

    q (B, H, T, Dh), k (B, Hkv, S, Dh) with H % Hkv == 0 (each key head serves H / Hkv query heads, GQA); scale
    defaults to Dh^-0.5; causal lets query i see keys j <= i + (S - T); key_padding_mask (B, S) bool, True = attend.
    Masked entries get probability exactly 0 (a finite fill, so the logs of the KL stay finite)."""
    B, H, T, Dh = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != Dh or H % Hkv:
        raise ValueError(f"k {tuple(k.shape)} does not fit q {tuple(q.shape)}: expected (B, Hkv, S, Dh) with "
                         f"H % Hkv == 0")
    k = k.repeat_interleave(H // Hkv, dim=1)  # (B, H, S, Dh)
    scale = Dh ** -0.5 if scale is None else scale
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale  # (B, H, T, S)
    allowed = torch.ones(T, S, dtype=torch.bool, device=q.device)
    if causal:
        allowed = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)  # (T, S) bottom-right aligned
    allowed = allowed[None, None]  # (1, 1, T, S)
    if key_padding_mask is not None:
        allowed = allowed & _check_mask(key_padding_mask, (B, S))[:, None, None, :]  # (B, 1, T, S)
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    return scores.softmax(-1)


def attention_loss(student_probs, teacher_probs, kind: str = "kl", mask=None):
    """Distance between attention probabilities (B, H, T, S), averaged over batch, heads and the query positions
    selected by mask (B, T) bool. kind="kl": sum_s p_t log(p_t / p_s) (MiniLM); "mse": mean squared difference of
    the probabilities (TinyBERT on probabilities). When the head counts differ both sides are averaged over heads."""
    if kind not in ("kl", "mse"):
        raise ValueError(f"kind must be 'kl' or 'mse', got {kind!r}")
    s, t = student_probs.float(), teacher_probs.float()
    if s.shape[1] != t.shape[1]:
        s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)  # (B, 1, T, S)
    if s.shape != t.shape:
        raise ValueError(f"student attention {tuple(s.shape)} and teacher attention {tuple(t.shape)} differ")
    if kind == "kl":
        tiny = torch.finfo(torch.float32).tiny
        d = torch.where(t > 0, t * (t.clamp_min(tiny).log() - s.clamp_min(tiny).log()), 0.0).sum(-1)  # (B, H, T)
    else:
        d = (s - t).pow(2).mean(-1)  # (B, H, T)
    if mask is not None:
        m = _check_mask(mask, (d.shape[0], d.shape[2]))
        d = d.transpose(1, 2)[m]  # (B, T, H) -> (n, H)
    return d.mean() if d.numel() else s.sum() * 0.0


def _check_mask(mask, shape):
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(shape):
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a (bool) tensor of shape {tuple(shape)}, got {got}")
    return mask.to(torch.bool)


# ----------------------------------------------------------------------------------------------------------------------
# layer maps and students
def uniform_layer_map(n_student: int, n_teacher: int) -> list[int]:
    """Teacher block (0-based) that each student block learns from: ceil((i + 1) * N / M) - 1, TinyBERT's
    g(m) = m * N / M in 0-based form. 2 of 4 -> [1, 3]; 3 of 6 -> [1, 3, 5] (the output of student block i, which
    holds teacher blocks 0, 2, .., 2i, stands for teacher blocks 0..2i+1)."""
    for name, v in (("n_student", n_student), ("n_teacher", n_teacher)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    return [-(-(i + 1) * n_teacher // n_student) - 1 for i in range(n_student)]


def every_other_layer(n_layer: int) -> list[int]:
    """Blocks 0, 2, 4, ...: n_layer // 2 of them (DistilBERT)."""
    if n_layer < 2:
        raise ValueError(f"a teacher with {n_layer} block(s) cannot give a student half as deep")
    return list(range(0, 2 * (n_layer // 2), 2))


def _stack_names(model) -> list[str]:
    return [n for n in ("encoder", "decoder") if getattr(model, n, None) is not None]


def _stack_depths(model) -> dict[str, int]:
    return {n: len(getattr(model, n).blocks) for n in _stack_names(model)}


def student_from_teacher(teacher, layers=None, decoder_layers=None, init: str = "teacher"):
    """A student with the teacher's architecture and fewer blocks.

    layers: the teacher's blocks to keep (the encoder's for encoder-decoder), increasing; default every other one
    (0, 2, 4, ...: n_layer // 2 of them). decoder_layers: the same for an encoder-decoder's decoder.
    init="teacher" copies token/position/type embeddings, the embedding norm, the kept blocks, the final norm and the
    output head (DistilBERT); init="scratch" builds the same shape with a fresh initialisation. The tokenizer and
    special-token ids come along. The teacher must be a float model (quantize after distilling)."""
    if init not in ("teacher", "scratch"):
        raise ValueError(f"init must be 'teacher' or 'scratch', got {init!r}")
    cfg: ModelConfig = getattr(teacher, "config", None)
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"teacher must be a tinyformer model, got {type(teacher).__name__}")
    names = _stack_names(teacher)
    depths = _stack_depths(teacher)
    keep = {}
    for name in names:
        chosen = decoder_layers if (name == "decoder" and cfg.arch == "encoder-decoder") else layers
        arg = "decoder_layers" if (name == "decoder" and cfg.arch == "encoder-decoder") else "layers"
        chosen = every_other_layer(depths[name]) if chosen is None else list(chosen)
        if not chosen or any(not isinstance(i, int) or not 0 <= i < depths[name] for i in chosen) or \
                any(a >= b for a, b in zip(chosen, chosen[1:])):
            raise ValueError(f"{arg} must be increasing block indices in 0..{depths[name] - 1}, got {chosen}")
        keep[name] = chosen
    fields = {"n_layer": len(keep[names[0]])}
    if cfg.arch == "encoder-decoder":
        fields["n_decoder_layer"] = len(keep["decoder"])
    scfg = ModelConfig.from_dict({**cfg.to_dict(), **fields})
    ref = next(teacher.parameters())
    student = build(scfg, init=init == "scratch").to(device=ref.device, dtype=ref.dtype)
    if init == "teacher":
        state = {}
        for key, value in teacher.state_dict().items():
            parts = key.split(".")
            if len(parts) > 2 and parts[0] in keep and parts[1] == "blocks":
                j = int(parts[2])
                if j not in keep[parts[0]]:
                    continue
                key = ".".join([parts[0], "blocks", str(keep[parts[0]].index(j))] + parts[3:])
            state[key] = value.detach().clone()
        expected = set(student.state_dict())
        if set(state) != expected:
            raise TypeError("student_from_teacher needs a float teacher built by tinyformer (a quantized or "
                            f"factored one has other tensors: {sorted(set(state) ^ expected)[:4]})")
        student.load_state_dict(state, strict=True)
    for attr in ("tokenizer", "chat_template", "bos_token_id", "eos_token_id"):
        setattr(student, attr, getattr(teacher, attr, None))
    return student.train(teacher.training)


@torch.no_grad()
def teacher_targets(teacher, input_ids, attention_mask=None, max_new_tokens: Optional[int] = None,
                    num_beams: int = 1, eos_token_id: Optional[int] = None):
    """Sequence-level distillation data (Kim & Rush 2016): the teacher's greedy (num_beams=1) or beam output on the
    source ids (B, S), as teacher-forcing pairs decoder_input_ids (B, n) and labels (B, n).

    The output is start token + y_1 .. y_n; decoder inputs are start + y_1..y_{n-1}, labels y_1..y_n. Labels after
    the first EOS are -100 (not scored) and the inputs there are padding (pad_token_id, else EOS)."""
    cfg = teacher.config
    if cfg.arch != "encoder-decoder":
        raise ValueError(f"sequence-level distillation needs an encoder-decoder teacher, got arch={cfg.arch!r}")
    eos = eos_token_id if eos_token_id is not None else getattr(teacher, "eos_token_id", None)
    n = max_new_tokens if max_new_tokens is not None else cfg.max_seq_len - 1
    seq = teacher.generate(input_ids, n, temperature=0.0, eos_token_id=eos, attention_mask=attention_mask,
                           num_beams=num_beams)  # (B, 1 + n)
    dec_in, labels = seq[:, :-1].clone(), seq[:, 1:].clone()  # (B, n) each
    if eos is not None:
        is_eos = (labels == eos).long()
        after = (is_eos.cumsum(1) - is_eos) > 0  # (B, n): strictly after the first EOS
        labels[after] = -100
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else eos
        dec_in[:, 1:][after[:, :-1]] = pad  # input j holds label j-1
    return dec_in, labels


# ----------------------------------------------------------------------------------------------------------------------
# capturing hidden states and attention maps
class Capture:
    """Forward hooks that record what the distillation losses compare, for every Stack of `model`:

    - `hidden[stack][i]`: the output of block i (B, T, C) (the residual stream, before the final norm of a pre-norm
      model; the post-LN output of a post-norm block);
    - `attention[stack][i]`: the self-attention probabilities of block i (B, H, T, T), recomputed from the input the
      Attention module received: q = wq(x), k = wk(x) split into heads, rotary positions, scale Dh^-0.5, the causal
      and key-padding masks (`attention_probs`). Cross-attention is not recorded.

    stack is "decoder" (DecoderLM), "encoder" (Encoder), or both (EncoderDecoder). Use as a context manager; the
    hooks are removed on exit. Calls with a KV cache (generation) are not recorded."""

    def __init__(self, model, hidden: bool = True, attention: bool = False):
        self.hidden = {n: [None] * d for n, d in _stack_depths(model).items()} if hidden else {}
        self.attention = {n: [None] * d for n, d in _stack_depths(model).items()} if attention else {}
        self.handles = []
        for name in _stack_names(model):
            for i, block in enumerate(getattr(model, name).blocks):
                if hidden:
                    self.handles.append(block.register_forward_hook(self._hidden_hook(name, i), with_kwargs=True))
                if attention:
                    self.handles.append(block.attn.register_forward_hook(self._attn_hook(name, i),
                                                                         with_kwargs=True))

    def _hidden_hook(self, name, i):
        def hook(_module, args, kwargs, output):
            # Stack calls block(x, key_padding_mask, rope, memory, memory_mask, cache)
            cache = args[5] if len(args) > 5 else kwargs.get("cache")
            if cache is None:
                self.hidden[name][i] = output
        return hook

    def _attn_hook(self, name, i):
        def hook(module: Attention, args, kwargs, _output):
            # Block calls attn(h, key_padding_mask, rope, cache=...)
            if kwargs.get("cache") is not None:
                return
            x = args[0]
            mask = args[1] if len(args) > 1 else kwargs.get("key_padding_mask")
            rope = args[2] if len(args) > 2 else kwargs.get("rope")
            self.attention[name][i] = self_attention_probs(module, x, mask, rope)
        return hook

    def clear(self):
        for d in (self.hidden, self.attention):
            for v in d.values():
                v[:] = [None] * len(v)

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def self_attention_probs(attn: Attention, x, key_padding_mask=None, rope=None):
    """The probabilities (B, H, T, T) that self-attention module `attn` forms on its input x (B, T, C)."""
    if attn.cross:
        raise ValueError("self_attention_probs takes a self-attention module, got a cross-attention one")
    q = attn._heads(attn.wq(x), attn.n_head)  # (B, T, H*Dh) -> (B, H, T, Dh)
    k = attn._heads(attn.wk(x), attn.n_kv_head)  # (B, T, Hkv*Dh) -> (B, Hkv, T, Dh)
    if attn.rope:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    return attention_probs(q, k, causal=attn.causal, key_padding_mask=key_padding_mask)


# ----------------------------------------------------------------------------------------------------------------------
# a classification head for encoders
class MeanPoolHead(nn.Module):
    """Class logits (B, K) from encoder hidden states (B, T, C): the mean over the real tokens (Sentence-BERT
    pooling), then a linear layer. Called as head(hidden, attention_mask); it lives outside the model (model.save
    does not write it; save its state_dict with torch/safetensors)."""

    def __init__(self, d_model: int, n_classes: int):
        super().__init__()
        self.proj = Linear(d_model, n_classes, bias=True)
        self.proj.reset_parameters()

    @staticmethod
    def pool(hidden, attention_mask=None):
        if attention_mask is None:
            return hidden.mean(1)  # (B, C)
        m = attention_mask.to(hidden.dtype)[..., None]  # (B, T, 1)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, C)

    def forward(self, hidden, attention_mask=None):
        return self.proj(self.pool(hidden, attention_mask))  # (B, K)


# ----------------------------------------------------------------------------------------------------------------------
# batches
def _batches(data, batch_size: int, generator):
    """Yield raw batches from a LongTensor (random rows), a zero-argument callable, or an iterable."""
    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.is_floating_point() or data.dtype == torch.bool:
            raise ValueError(f"data as a tensor must be integer token ids (N, T), got {data.dtype} "
                             f"{tuple(data.shape)}")
        while True:
            idx = torch.randint(data.shape[0], (min(batch_size, data.shape[0]),), generator=generator)
            yield data[idx]  # (B, T)
    elif callable(data):
        while True:
            yield data()
    else:
        try:
            it = iter(data)
        except TypeError:
            raise TypeError(f"data must be a LongTensor (N, T), a callable returning a batch, or an iterable of "
                            f"batches, got {type(data).__name__}") from None
        yield from it


def _unpack(batch, arch: str, pad_id) -> dict:
    """One batch as {input_ids, attention_mask, labels, decoder_input_ids} (absent entries None)."""
    keys = {"decoder": ("input_ids", "labels"),
            "encoder": ("input_ids", "attention_mask", "labels"),
            "encoder-decoder": ("input_ids", "attention_mask", "decoder_input_ids", "labels")}[arch]
    out = dict.fromkeys(("input_ids", "attention_mask", "labels", "decoder_input_ids"))
    if isinstance(batch, dict):
        unknown = set(batch) - set(out)
        if unknown:
            raise ValueError(f"batch has unknown keys {sorted(unknown)}; expected some of {sorted(out)}")
        out.update(batch)
    elif isinstance(batch, torch.Tensor):
        if arch == "decoder":  # (B, T+1): inputs and next-token labels
            out.update(input_ids=batch[:, :-1], labels=batch[:, 1:])
        else:
            out["input_ids"] = batch
    elif isinstance(batch, (tuple, list)):
        if len(batch) > len(keys):
            raise ValueError(f"a {arch} batch tuple holds at most {keys}, got {len(batch)} items")
        out.update(zip(keys, batch))
    else:
        raise TypeError(f"a batch must be a tensor, tuple or dict, got {type(batch).__name__}")
    ids = out["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
        raise ValueError("a batch needs integer input_ids of shape (B, T)")
    if arch == "encoder-decoder" and out["labels"] is not None and pad_id is not None:
        out["labels"] = out["labels"].masked_fill(out["labels"] == pad_id, -100)  # padded targets do not count
    return out


# ----------------------------------------------------------------------------------------------------------------------
# the verb
def distill(teacher, student, data, steps: int, temperature: float = 2.0, alpha: float = 0.5, *,
            hidden_weight: float = 0.0, attention_weight: float = 0.0, attention_kind: str = "kl",
            layer_map=None, teacher_head: Optional[nn.Module] = None, student_head: Optional[nn.Module] = None,
            sequence_level: bool = False, num_beams: int = 1, max_new_tokens: Optional[int] = None,
            eos_token_id: Optional[int] = None, batch_size: int = 16, learning_rate: float = 5e-4,
            min_lr: Optional[float] = None, warmup_steps: Optional[int] = None, weight_decay: float = 0.01,
            beta2: float = 0.99, grad_clip: float = 1.0, seed: int = 0, log: Optional[Callable] = None,
            log_interval: int = 10):
    """Train `student` (in place; returned) for `steps` AdamW steps to imitate `teacher` (frozen, run in eval mode).

    loss = alpha * soft + (1 - alpha) * hard + hidden_weight * hidden + attention_weight * attention, where soft is
    `kd_loss` at `temperature` on the logits, hard the cross-entropy on the batch's labels, hidden the mean over
    mapped blocks of `hidden_loss` and attention the mean of `attention_loss(kind=attention_kind)`. A term whose
    inputs the batch or models do not have is left out (no labels: no hard term; an encoder without heads: no
    logits). alpha=0 with no other weights is plain training (the teacher is not even run).

    data: a LongTensor of token ids (N, L) — each step draws `batch_size` random rows (seeded by `seed`), a batch in
    the tensor form below — or a zero-argument callable returning one batch, or an iterable of batches (it must
    last `steps` batches). A batch is, by the student's arch:
      decoder          (B, T+1) ids (inputs [:, :-1], next-token labels [:, 1:]), or (input_ids, labels) with -100 =
                       not scored (what TokenData.get_batch returns);
      encoder          (B, T) ids, or (input_ids, attention_mask), or (input_ids, attention_mask, labels) with class
                       labels (B,) for the heads;
      encoder-decoder  (src, src_mask, decoder_input_ids, labels) (what PairData.get_batch returns; pad labels do not
                       count), or just (src, src_mask) with sequence_level=True;
    or a dict with keys input_ids / attention_mask / labels / decoder_input_ids.

    layer_map: student block i -> teacher block layer_map[i]; a list (applied to every stack) or a dict
    {"encoder": [...], "decoder": [...]}; default `uniform_layer_map`. When the widths differ, a learned projection
    per mapped block (trained with the student, then dropped) maps student states to the teacher's width.
    teacher_head / student_head (encoders): modules called as head(hidden, attention_mask) -> logits (B, K), e.g.
    `MeanPoolHead`; the student head is trained along with the student (pass a copy of the teacher's head).
    sequence_level (encoder-decoder): targets are the teacher's own outputs (`teacher_targets`, with num_beams,
    max_new_tokens, eos_token_id) generated for each batch; for a fixed set, call `teacher_targets` once and pass
    the pairs as data instead.
    Optimisation: tinyformer.train's AdamW groups and schedule (linear warmup over warmup_steps, default 5% of steps,
    cosine from learning_rate to min_lr, default learning_rate / 10), gradient clipping at grad_clip (0: off).
    log(row) is called every log_interval steps (and at the last) with step, lr and each loss term."""
    from tinyformer.train import TrainConfig, lr_at, make_optimizer

    for name, m in (("teacher", teacher), ("student", student)):
        if not isinstance(getattr(m, "config", None), ModelConfig):
            raise TypeError(f"{name} must be a tinyformer model, got {type(m).__name__}")
    arch = student.config.arch
    if teacher.config.arch != arch:
        raise ValueError(f"teacher arch {teacher.config.arch!r} and student arch {arch!r} differ")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if not isinstance(temperature, (int, float)) or temperature <= 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (the weight of the soft, teacher side), got {alpha!r}")
    for name, v in (("hidden_weight", hidden_weight), ("attention_weight", attention_weight)):
        if not isinstance(v, (int, float)) or v < 0:
            raise ValueError(f"{name} must be a number >= 0, got {v!r}")
    if attention_kind not in ("kl", "mse"):
        raise ValueError(f"attention_kind must be 'kl' or 'mse', got {attention_kind!r}")
    if (teacher_head is None) != (student_head is None):
        raise ValueError("pass both teacher_head and student_head, or neither")
    if student_head is not None and student_head is teacher_head:
        raise ValueError("student_head must be its own module (a copy of teacher_head), not the teacher's")
    if teacher_head is not None and arch != "encoder":
        raise ValueError(f"teacher_head/student_head are for encoders; a {arch} model has its own logits")
    if sequence_level and arch != "encoder-decoder":
        raise ValueError(f"sequence_level=True needs encoder-decoder models, got arch={arch!r}")
    if arch != "encoder" and teacher.config.vocab_size != student.config.vocab_size and alpha > 0:
        raise ValueError(f"logit distillation needs one vocabulary: teacher {teacher.config.vocab_size}, student "
                         f"{student.config.vocab_size}")
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")

    t_depths, s_depths = _stack_depths(teacher), _stack_depths(student)
    maps = {}
    if hidden_weight > 0 or attention_weight > 0:
        for name, n_s in s_depths.items():
            given = layer_map.get(name) if isinstance(layer_map, dict) else layer_map
            lm = uniform_layer_map(n_s, t_depths[name]) if given is None else list(given)
            if len(lm) != n_s or any(not isinstance(j, int) or not 0 <= j < t_depths[name] for j in lm):
                raise ValueError(f"layer_map for the {name}: expected {n_s} teacher block indices in "
                                 f"0..{t_depths[name] - 1}, got {lm}")
            maps[name] = lm
    device = next(student.parameters()).device
    d_s, d_t = student.config.d_model, teacher.config.d_model
    projections = nn.ModuleDict()
    if hidden_weight > 0 and d_s != d_t:
        for name, lm in maps.items():
            for i in range(len(lm)):
                p = Linear(d_s, d_t, bias=False)
                p.reset_parameters()
                projections[f"{name}_{i}"] = p
        projections.to(device)

    trainable = nn.ModuleList([student, projections] + ([student_head] if student_head is not None else []))
    min_lr = learning_rate / 10 if min_lr is None else min_lr
    warmup = max(1, steps // 20) if warmup_steps is None else warmup_steps
    cfg = TrainConfig(learning_rate=learning_rate, min_lr=min_lr, warmup_iters=warmup, lr_decay_iters=steps,
                      max_iters=steps, weight_decay=weight_decay, beta2=beta2, grad_clip=grad_clip, progress=False)
    optimizer = make_optimizer(trainable, cfg)
    need_teacher = alpha > 0 or hidden_weight > 0 or attention_weight > 0 or sequence_level
    t_cap = Capture(teacher, hidden=hidden_weight > 0, attention=attention_weight > 0) if need_teacher else None
    s_cap = Capture(student, hidden=hidden_weight > 0, attention=attention_weight > 0)
    generator = torch.Generator().manual_seed(seed)
    batches = _batches(data, batch_size, generator)
    pad_id = student.config.pad_token_id
    teacher_was_training, student_was_training = teacher.training, student.training
    teacher.eval()
    student.train()
    if teacher_head is not None:
        teacher_head.eval()
        student_head.train()
    try:
        for step in range(steps):
            try:
                raw = next(batches)
            except StopIteration:
                raise ValueError(f"data ran out after {step} batches; distill needs {steps}") from None
            b = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                 for k, v in _unpack(raw, arch, pad_id).items()}
            if sequence_level:
                b["decoder_input_ids"], b["labels"] = teacher_targets(
                    teacher, b["input_ids"], b["attention_mask"], max_new_tokens, num_beams, eos_token_id)
            if arch == "encoder-decoder" and b["decoder_input_ids"] is None:
                raise ValueError("an encoder-decoder batch needs decoder_input_ids (or sequence_level=True)")
            lr = lr_at(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t_logits = None
            if need_teacher:
                with torch.no_grad():
                    t_cap.clear()
                    t_logits = _run(teacher, b, teacher_head)
            s_cap.clear()
            s_logits = _run(student, b, student_head)
            terms = {}
            labels = b["labels"]
            token_level = arch != "encoder"
            pos_mask = (labels != -100) if (labels is not None and token_level) else None
            if arch == "encoder" and b["attention_mask"] is not None and s_logits is not None and \
                    s_logits.dim() == 3:
                pos_mask = b["attention_mask"].bool()
            if alpha > 0 and s_logits is not None and t_logits is not None:
                terms["soft"] = (alpha, kd_loss(s_logits, t_logits, temperature, pos_mask))
            if alpha < 1 and s_logits is not None and labels is not None:
                terms["hard"] = (1 - alpha, hard_loss(s_logits, labels))
            if hidden_weight > 0 or attention_weight > 0:
                h_terms, a_terms = [], []
                for name, lm in maps.items():
                    mask = _stack_mask(arch, name, b)
                    for i, j in enumerate(lm):
                        if hidden_weight > 0:
                            proj = projections[f"{name}_{i}"] if len(projections) else None
                            h_terms.append(hidden_loss(s_cap.hidden[name][i], t_cap.hidden[name][j], proj, mask))
                        if attention_weight > 0:
                            a_terms.append(attention_loss(s_cap.attention[name][i], t_cap.attention[name][j],
                                                          attention_kind, mask))
                if h_terms:
                    terms["hidden"] = (hidden_weight, torch.stack(h_terms).mean())
                if a_terms:
                    terms["attention"] = (attention_weight, torch.stack(a_terms).mean())
            if not terms:
                raise ValueError("nothing to learn from: the batch has no labels and the models give no logits, "
                                 "and hidden_weight = attention_weight = 0")
            loss = sum(w * v for w, v in terms.values())
            loss.backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable.parameters(), grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if log is not None and (step % log_interval == 0 or step == steps - 1):
                log({"step": step, "lr": lr, "loss": float(loss.detach()),
                     **{k: float(v.detach()) for k, (_, v) in terms.items()}})
    finally:
        for cap in (t_cap, s_cap):
            if cap is not None:
                cap.remove()
        teacher.train(teacher_was_training)
        student.train(student_was_training)
    return student


def _run(model, b, head):
    """Logits of one batch: (B, T, V) for decoders and encoder-decoders, head logits (B, K) or None for encoders."""
    arch = model.config.arch
    if arch == "decoder":
        return model(b["input_ids"])
    if arch == "encoder":
        hidden = model(b["input_ids"], attention_mask=b["attention_mask"])  # (B, T, C)
        return head(hidden, b["attention_mask"]) if head is not None else None
    return model(b["input_ids"], b["decoder_input_ids"], attention_mask=b["attention_mask"])


def _stack_mask(arch, stack, b):
    """(B, T) bool of the positions whose hidden states/attention rows count in `stack`, or None (all)."""
    if stack == "encoder":
        return b["attention_mask"].bool() if b["attention_mask"] is not None else None
    if arch == "encoder-decoder":
        return b["labels"] != -100 if b["labels"] is not None else None
    return None

