"""tinyformer's models, written directly on tensors: decoder (GPT/Llama), encoder (BERT) and encoder-decoder.

The math and nothing else, top to bottom: Linear -> Norm -> rotary tables -> Attention -> FeedForward -> Block ->
Stack -> the three models (the KV cache generation fills is `tinyformer.cache`). Every product, norm and attention
goes through `tinyformer.ops`, which picks the kernel for the device, dtype and shape; speed comes from beneath this
file (ops, weight layouts prepared in `tinyformer.kernels.cpu`, torch.compile of this forward in
`tinyformer.generate`), never from a copy of it.

References: Vaswani et al. 2017 (encoder-decoder, post-norm, sinusoidal positions); Radford et al. 2019, GPT-2
(pre-norm, learned positions, residual projections initialised at 0.02/sqrt(2 * n_layer)) and karpathy/nanoGPT
model.py; Devlin et al. 2018, BERT (token types, embedding LayerNorm); Touvron et al. 2023, Llama (RMSNorm, SwiGLU,
rotary positions in Hugging Face's "rotate half" layout; Su et al. 2021, Shazeer 2020); Ainslie et al. 2023, GQA;
Shazeer 2019, MQA.

Legend: B batch, T query length, S key/memory length, C = d_model, H query heads, Hkv key/value heads, Dh head dim,
V vocab, F = d_ff, P positions (max_seq_len).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tinyformer import ops
from tinyformer.cache import KVCache, LayerCache
from tinyformer.checkpoint import save_model
from tinyformer.config import ModelConfig
from tinyformer.generate import beam_search, generate, generate_seq2seq


class Linear(nn.Module):
    """y = x W^T + b with W (out, in): the layer that compression swaps for quantized or low-rank versions."""

    scheme = "float"  # the product it computes, as tinyformer.qlinear's layers name theirs (ops.linears reads it)

    def __init__(self, d_in: int, d_out: int, bias: bool = True, init_std: float = 0.02):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in))
        self.bias = nn.Parameter(torch.empty(d_out)) if bias else None
        self.init_std = init_std

    def reset_parameters(self):
        nn.init.normal_(self.weight, mean=0.0, std=self.init_std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x):
        return ops.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, bias={self.bias is not None}"


class Norm(nn.Module):
    """LayerNorm (weight, optional bias; Ba et al. 2016) or RMSNorm (weight only; Zhang & Sennrich 2019)."""

    def __init__(self, d: int, kind: str, eps: float, bias: bool):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.empty(d))
        self.bias = nn.Parameter(torch.empty(d)) if bias and kind == "layernorm" else None

    def reset_parameters(self):
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x):
        if self.kind == "rmsnorm":
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.layer_norm(x, self.weight, self.bias, self.eps)


def activation(name: str, x):
    """GELU (erf), GELU's tanh approximation, or ReLU, elementwise."""
    return F.relu(x) if name == "relu" else F.gelu(x, approximate="tanh" if name == "gelu_tanh" else "none")


def rope_tables(n_pos: int, head_dim: int, theta: float, device=None):
    """cos, sin tables (P, Dh) for rotary positions: angle[p, i] = angle[p, i + Dh/2] = p * theta^(-2i / Dh)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)  # (Dh/2,)
    angles = torch.arange(n_pos, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]  # (P, Dh/2)
    angles = torch.cat((angles, angles), dim=-1)  # (P, Dh): each pair (i, i + Dh/2) turns by one angle
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate the pairs (x[i], x[i + Dh/2]) of x (B, H, T, Dh) by the angles in cos, sin (B or 1, 1, T, Dh):
    x * cos + rotate_half(x) * sin, with rotate_half(x) = (-x[Dh/2:], x[:Dh/2]); in float32 whatever x's dtype."""
    return ops.rope(x, cos, sin)


def sinusoidal_table(n_pos: int, d: int, device=None):
    """pe[p, 2i] = sin(p / 10000^(2i/d)), pe[p, 2i+1] = cos(p / 10000^(2i/d))  (Vaswani et al. 2017, 3.5)."""
    inv_freq = 10000.0 ** (-torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)  # (ceil(d/2),)
    angles = torch.arange(n_pos, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]  # (P, d/2)
    pe = torch.zeros(n_pos, d, device=device)
    pe[:, 0::2] = angles.sin()
    pe[:, 1::2] = angles.cos()[:, : d // 2]
    return pe  # (P, d)


class Attention(nn.Module):
    """Multi-head attention with H query heads and Hkv key/value heads (GQA/MQA when Hkv < H): self-attention
    (optionally causal, optionally rotary) or cross-attention to an encoder memory."""

    def __init__(self, cfg: ModelConfig, causal: bool, cross: bool, resid_std: float):
        super().__init__()
        H, Hkv, Dh, C = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_model
        self.n_head, self.n_kv_head, self.head_dim = H, Hkv, Dh
        self.causal, self.cross, self.dropout = causal, cross, cfg.dropout
        self.rope = cfg.pos == "rope" and not cross
        self.wq = Linear(C, H * Dh, cfg.bias, cfg.init_std)
        self.wk = Linear(C, Hkv * Dh, cfg.bias, cfg.init_std)
        self.wv = Linear(C, Hkv * Dh, cfg.bias, cfg.init_std)
        self.wo = Linear(H * Dh, C, cfg.bias, resid_std)

    def _heads(self, x, n_head):
        B, T, _ = x.shape
        return x.view(B, T, n_head, self.head_dim).transpose(1, 2)  # (B, T, h*Dh) -> (B, h, T, Dh)

    def forward(self, x, key_padding_mask=None, rope=None, memory=None, cache: Optional[LayerCache] = None,
                cu_seqlens=None):
        """x (B, T, C) -> (B, T, C). Self-attention reads keys from x (and the cache), cross-attention from `memory`
        (B, S, C); key_padding_mask (B, S) is True where a key may be attended; cu_seqlens (n + 1,), for packed
        examples, the offsets of the documents in the B*T tokens, which attend within their own document only."""
        B, T, _ = x.shape
        if not self.cross:
            q, k, v = ops.linears(x, self.wq, self.wk, self.wv)  # (B, T, H*Dh), (B, T, Hkv*Dh) x 2
            q, k, v = self._heads(q, self.n_head), self._heads(k, self.n_kv_head), self._heads(v, self.n_kv_head)
            if self.rope:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            if cache is not None:
                k, v = cache.update(k, v)  # (B, Hkv, S, Dh): the whole prefix
        else:  # keys and values of the encoder memory (B, S, C), made once per cache
            q = self._heads(self.wq(x), self.n_head)  # (B, H, T, Dh)
            if cache is not None and cache.cross is not None:
                k, v = cache.cross
            else:
                k, v = self._heads(self.wk(memory), self.n_kv_head), self._heads(self.wv(memory), self.n_kv_head)
                if cache is not None:
                    cache.cross = (k, v)
        y = ops.attention(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask,
                          dropout_p=self.dropout if self.training else 0.0, cu_seqlens=cu_seqlens)  # (B, H, T, Dh)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, H, T, Dh) -> (B, T, H*Dh)
        return F.dropout(self.wo(y), self.dropout, self.training)


class FeedForward(nn.Module):
    """w2(act(w1 x)) for GELU/ReLU; w2(silu(w1 x) * w3 x) for SwiGLU (w1 = gate, w3 = up, w2 = down)."""

    def __init__(self, cfg: ModelConfig, resid_std: float):
        super().__init__()
        self.act, self.dropout = cfg.act, cfg.dropout
        self.w1 = Linear(cfg.d_model, cfg.d_ff, cfg.bias, cfg.init_std)
        self.w3 = Linear(cfg.d_model, cfg.d_ff, cfg.bias, cfg.init_std) if cfg.act == "swiglu" else None
        self.w2 = Linear(cfg.d_ff, cfg.d_model, cfg.bias, resid_std)

    def forward(self, x):
        if self.act == "swiglu":
            gate, up = ops.linears(x, self.w1, self.w3)  # (B, T, F) each
            h = ops.swiglu(gate, up)
        else:
            h = activation(self.act, self.w1(x))  # (B, T, F)
        return F.dropout(self.w2(h), self.dropout, self.training)  # (B, T, C)


class Block(nn.Module):
    """One transformer block: self-attention, cross-attention (encoder-decoder only), feed-forward; each sub-layer
    in a residual, with the norm before it (pre-norm) or after the residual sum (post-norm)."""

    def __init__(self, cfg: ModelConfig, causal: bool, cross: bool, n_layer: int):
        super().__init__()
        resid_std = cfg.init_std / math.sqrt(2 * n_layer)
        self.pre = cfg.norm_position == "pre"
        self.norm1 = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.bias)
        self.attn = Attention(cfg, causal=causal, cross=False, resid_std=resid_std)
        if cross:
            self.norm_cross = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.bias)
            self.cross_attn = Attention(cfg, causal=False, cross=True, resid_std=resid_std)
        else:
            self.norm_cross = self.cross_attn = None
        self.norm2 = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.bias)
        self.mlp = FeedForward(cfg, resid_std)

    def _residual(self, x, norm, f):
        return x + f(norm(x)) if self.pre else norm(x + f(x))

    def forward(self, x, key_padding_mask=None, rope=None, memory=None, memory_mask=None, cache=None,
                cu_seqlens=None):
        x = self._residual(x, self.norm1, lambda h: self.attn(h, key_padding_mask, rope, cache=cache,
                                                              cu_seqlens=cu_seqlens))
        if self.cross_attn is not None:
            x = self._residual(x, self.norm_cross,
                               lambda h: self.cross_attn(h, memory_mask, memory=memory, cache=cache))
        return self._residual(x, self.norm2, self.mlp)


class Stack(nn.Module):
    """Positions (+ token types) added to token embeddings, the blocks, and the final norm (pre-norm only)."""

    def __init__(self, cfg: ModelConfig, n_layer: int, causal: bool, cross: bool):
        super().__init__()
        self.cfg = cfg
        self.wpe = nn.Parameter(torch.empty(cfg.max_seq_len, cfg.d_model)) if cfg.pos == "learned" else None
        self.wtt = nn.Parameter(torch.empty(cfg.type_vocab_size, cfg.d_model)) if cfg.type_vocab_size else None
        self.embed_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.bias) if cfg.embed_norm else None
        self.blocks = nn.ModuleList(Block(cfg, causal, cross, n_layer) for _ in range(n_layer))
        self.final_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.bias) if cfg.norm_position == "pre" else None
        self.checkpointing = False  # True: training recomputes each block's activations in the backward instead of
        # keeping them (activation checkpointing: memory for one block's activations, a second forward's time)
        self.init_buffers()

    def init_buffers(self):
        """(Re)compute the position tables, which are derived, not saved (also after loading on the meta device)."""
        device = self.blocks[0].norm1.weight.device
        device = None if device.type == "meta" else device
        cfg = self.cfg
        if cfg.pos == "rope":
            cos, sin = rope_tables(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta, device)
            self.register_buffer("rope_cos", cos, persistent=False)  # (P, Dh)
            self.register_buffer("rope_sin", sin, persistent=False)  # (P, Dh)
        elif cfg.pos == "sinusoidal":
            self.register_buffer("pe", sinusoidal_table(cfg.max_seq_len, cfg.d_model, device), persistent=False)

    def forward(self, tok_emb, position_ids, key_padding_mask=None, token_type_ids=None, memory=None,
                memory_mask=None, cache=None, cu_seqlens=None):
        """tok_emb (B, T, C), position_ids (B or 1, T) -> hidden states (B, T, C)."""
        cfg = self.cfg
        x, rope = tok_emb, None
        if cfg.pos == "learned":
            x = x + F.embedding(position_ids, self.wpe)  # (B, T, C)
        elif cfg.pos == "sinusoidal":  # token embeddings scaled by sqrt(C) so they are not drowned (Vaswani 3.4)
            x = x * math.sqrt(cfg.d_model) + self.pe[position_ids]
        else:
            rope = (self.rope_cos[position_ids][:, None], self.rope_sin[position_ids][:, None])  # (B, 1, T, Dh)
        if self.wtt is not None:
            types = token_type_ids if token_type_ids is not None else torch.zeros_like(position_ids)
            x = x + F.embedding(types, self.wtt)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = F.dropout(x, cfg.dropout, self.training)
        recompute = self.checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            args = (x, key_padding_mask, rope, memory, memory_mask, cache.layers[i] if cache is not None else None,
                    cu_seqlens)
            x = checkpoint(block, *args, use_reentrant=False) if recompute else block(*args)
        return self.final_norm(x) if self.final_norm is not None else x


# ----------------------------------------------------------------------------------------------------------------------
# the three models
def _as_bool_mask(mask, input_ids, name="attention_mask"):
    """HF-style mask (B, T), 1/True = real token -> bool, or None."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(input_ids.shape):
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must have the shape of its input ids {tuple(input_ids.shape)}, got {got}")
    return mask.to(device=input_ids.device, dtype=torch.bool)


def _positions(input_ids, attention_mask, cache, cu_seqlens=None):
    """Position ids (B or 1, T): counting real tokens only when there is a (left-padding) mask; from 0 at each
    document's start in a packed batch (cu_seqlens)."""
    if cu_seqlens is not None:
        n = torch.arange(input_ids.numel(), device=input_ids.device)  # (B*T,) flat token index
        doc = torch.searchsorted(cu_seqlens[1:], n, right=True)  # (B*T,) the document of each token
        return (n - cu_seqlens[doc]).view(input_ids.shape)  # (B*T,) -> (B, T)
    start = cache.length if cache is not None else 0
    if attention_mask is None:
        return torch.arange(start, start + input_ids.shape[1], device=input_ids.device)[None]  # (1, T)
    pos = attention_mask.long().cumsum(-1) - 1  # (B, S): position of each real token among the real ones
    return pos[:, -input_ids.shape[1]:].clamp(min=0)  # (B, T)


def pool(hidden, mask, how: str):
    """hidden (B, T, C) -> (B, C): the mean over the real tokens (mask (B, T), True = real; None = all), the first
    token, or the last real token (right or left padding alike)."""
    if how == "first":
        return hidden[:, 0]
    if mask is None:
        return hidden.mean(1) if how == "mean" else hidden[:, -1]
    if how == "mean":
        m = mask.to(hidden.dtype)[..., None]  # (B, T, 1)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    last = (mask.long() * torch.arange(1, mask.shape[1] + 1, device=mask.device)).argmax(1)  # (B,) last real index
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, C)


class TransformerBase(nn.Module):
    """What the three models share: config, token embeddings, output head, classification head, init, save, parameter
    count."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tokenizer = None  # a `tokenizers.Tokenizer` when the model has one (saved as tokenizer.json)
        self.chat_template = None  # a Jinja chat template string (from a pretrained model), saved in config.json
        self.bos_token_id = self.eos_token_id = None
        self.wte = nn.Parameter(torch.empty(cfg.vocab_size, cfg.d_model))  # (V, C)
        head = cfg.arch != "encoder" and not cfg.tie_embeddings
        self.lm_head = nn.Parameter(torch.empty(cfg.vocab_size, cfg.d_model)) if head else None  # (V, C)
        self.classifier = Linear(cfg.d_model, cfg.num_labels, True, cfg.init_std) if cfg.num_labels else None

    def reset_parameters(self):
        """GPT-2 initialisation: N(0, 0.02) for matrices and embeddings, residual projections N(0, 0.02/sqrt(2L)),
        zero biases, unit norm weights."""
        for m in self.modules():
            if isinstance(m, (Linear, Norm)):
                m.reset_parameters()
        tables = [p for m in self.modules() if isinstance(m, Stack) for p in (m.wpe, m.wtt)] + [self.wte, self.lm_head]
        for p in tables:
            if isinstance(p, nn.Parameter):  # (a quantized head, a module, keeps its codes)
                nn.init.normal_(p, 0.0, self.config.init_std)

    def init_buffers(self):
        for m in self.modules():
            if isinstance(m, Stack):
                m.init_buffers()

    def embed_tokens(self, input_ids):
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input ids must be an integer tensor, got {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(f"input ids must be 2-D (batch, time), got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_seq_len={self.config.max_seq_len}")
        # the range check reads the ids back: a host sync, and a graph break under torch.compile, where the
        # lookup's own bounds check stands in for it
        if not torch.compiler.is_compiling() and input_ids.numel():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"token ids must be in 0..{self.config.vocab_size - 1}, got {lo}..{hi}")
        # F.embedding, not wte[input_ids]: the backward of indexing adds the rows of repeated ids in an order that
        # varies with the CPU threads, which made two runs with one seed differ; embedding's backward sums in order
        return F.embedding(input_ids, self.wte)  # (B, T, C)

    def logits(self, hidden):
        """hidden (B, T, C) -> logits (B, T, V) through the tied embedding, the separate head, or a head module
        (a quantized linear that compression put in lm_head's place)."""
        if isinstance(self.lm_head, nn.Module):
            return self.lm_head(hidden)
        return ops.linear(hidden, self.lm_head if self.lm_head is not None else self.wte)

    def add_classifier(self, label_names: list, pooling: str = "auto"):
        """A new sequence-classification head for the classes `label_names` (a pretrained body's fine-tuning):
        initialised as a Linear is, on the embeddings' device and dtype; the config records it, so it saves."""
        self.config = ModelConfig.from_dict({**self.config.to_dict(), "num_labels": len(label_names),
                                             "label_names": [str(n) for n in label_names], "pooling": pooling})
        self.classifier = Linear(self.config.d_model, len(label_names), True, self.config.init_std)
        self.classifier.reset_parameters()
        self.classifier.to(device=self.wte.device, dtype=self.wte.dtype)
        return self

    def classify(self, input_ids, attention_mask=None):
        """Class logits (B, num_labels) of input_ids (B, T): the hidden states pooled as config.pooling says (mean
        of the real tokens for an encoder, the last real token for a decoder by default), through `classifier`."""
        if self.classifier is None:
            raise ValueError("this model has no classification head (config.num_labels is 0): add_classifier first")
        mask = _as_bool_mask(attention_mask, input_ids)
        if self.config.arch == "encoder":
            hidden, how = self(input_ids, mask), "mean"  # (B, T, C)
        else:
            hidden, how = self(input_ids, mask, hidden_only=True), "last"
        return self.classifier(pool(hidden, mask, how if self.config.pooling == "auto" else self.config.pooling))

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count; non_embedding=True leaves out the token and position embeddings (as nanoGPT reports)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.numel()
            n -= sum(m.wpe.numel() for m in self.modules() if isinstance(m, Stack) and m.wpe is not None)
        return n

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty KV cache for the self-attention of this model's (decoder) blocks."""
        heads = [b.attn.n_kv_head for b in self.decoder.blocks]  # per layer: structured pruning may remove some
        return KVCache(heads, batch, max_len, self.config.head_dim, self.wte.dtype, self.wte.device)

    def save(self, path):
        """Write config.json + model.safetensors (+ tokenizer.json) to the folder `path` (tinyformer.load reads it)."""
        save_model(self, path)


class DecoderLM(TransformerBase):
    """A decoder-only language model (GPT-2, Llama): model(input_ids) -> logits (B, T, V)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.decoder = Stack(cfg, cfg.n_layer, causal=True, cross=False)

    def forward(self, input_ids, attention_mask=None, cache: Optional[KVCache] = None, last_only: bool = False,
                hidden_only: bool = False, cu_seqlens=None):
        """input_ids (B, T). attention_mask (B, S) covers the cached positions plus these T (1 = real token), for
        padded batches; with a cache, the T new tokens are appended to it. last_only: logits of the last position
        only (B, 1, V), as generation needs. hidden_only: the final hidden states (B, T, C) instead of logits, for a
        loss that applies the head itself (`ops.linear_cross_entropy`). cu_seqlens (n + 1,) int32: packed
        examples, each a document of the B*T tokens with its own positions from 0 and attention within it."""
        x = self.embed_tokens(input_ids)  # (B, T, C)
        S = input_ids.shape[1] + (cache.length if cache is not None else 0)
        if S > self.config.max_seq_len:
            raise ValueError(f"{S} positions (cached + new) exceed max_seq_len={self.config.max_seq_len}")
        if attention_mask is not None and tuple(attention_mask.shape) != (input_ids.shape[0], S):
            raise ValueError(f"attention_mask must be (B, cached + new) = {(input_ids.shape[0], S)}, "
                             f"got {tuple(attention_mask.shape)}")
        mask = attention_mask.to(torch.bool) if attention_mask is not None else None
        h = self.decoder(x, _positions(input_ids, mask, cache, cu_seqlens), key_padding_mask=mask, cache=cache,
                         cu_seqlens=cu_seqlens)
        if cache is not None:
            cache.length += input_ids.shape[1]
        if hidden_only:
            return h  # (B, T, C)
        return self.logits(h[:, -1:] if last_only else h)  # (B, T or 1, V)

    def generate(self, input_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token_id=None,
                 attention_mask=None, generator=None, on_token=None, compile=False):
        """Prompt + new tokens (B, T + n) with a KV cache; temperature 0 is greedy (tinyformer.generate)."""
        return generate(self, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id,
                        attention_mask=attention_mask, generator=generator, on_token=on_token, compile=compile)


class Encoder(TransformerBase):
    """A bidirectional encoder (BERT): model(input_ids, attention_mask) -> hidden states (B, T, C)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.encoder = Stack(cfg, cfg.n_layer, causal=False, cross=False)
        if cfg.mlm_head == "bert":  # BertLMPredictionHead: transform, then the tied embedding plus a bias
            self.mlm_dense = Linear(cfg.d_model, cfg.d_model, True, cfg.init_std)
            self.mlm_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, True)
            self.mlm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))  # (V,)

    def reset_parameters(self):
        super().reset_parameters()  # the head's dense and norm are a Linear and a Norm: reset there
        if self.config.mlm_head == "bert":
            nn.init.zeros_(self.mlm_bias)

    def logits(self, hidden):
        """hidden (B, T, C) -> masked-LM logits (B, T, V), through the head `config.mlm_head` names."""
        head = self.config.mlm_head
        if head == "none":
            raise ValueError("this encoder has no masked-LM head (its checkpoint ships none, as sentence-embedding "
                             "models do): it gives hidden states and sentence embeddings (`embed`), not token logits")
        if head == "bert":
            h = self.mlm_norm(activation(self.config.act, self.mlm_dense(hidden)))  # (B, T, C)
            return ops.linear(h, self.wte, self.mlm_bias)  # (B, T, V)
        return super().logits(hidden)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, cu_seqlens=None):
        """input_ids (B, T) -> hidden states (B, T, C); attention_mask (B, T), 1 = real token; cu_seqlens (n + 1,):
        packed examples (each attends within itself, positions from 0)."""
        mask = _as_bool_mask(attention_mask, input_ids)
        x = self.embed_tokens(input_ids)  # (B, T, C)
        return self.encoder(x, _positions(input_ids, None, None, cu_seqlens), mask, token_type_ids,
                            cu_seqlens=cu_seqlens)

    @torch.no_grad()
    def embed(self, input_ids, attention_mask=None):
        """Sentence embeddings (B, C): mean of the real tokens' hidden states, L2-normalised (Sentence-BERT)."""
        mask = _as_bool_mask(attention_mask, input_ids)
        return F.normalize(pool(self(input_ids, mask), mask, "mean"), dim=-1)  # (B, T, C) -> (B, C)


class EncoderDecoder(TransformerBase):
    """An encoder-decoder Transformer sharing one token embedding:
    model(input_ids, decoder_input_ids, attention_mask) -> logits (B, T_dec, V)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.encoder = Stack(cfg, cfg.n_layer, causal=False, cross=False)
        self.decoder = Stack(cfg, cfg.n_decoder_layer, causal=True, cross=True)

    def encode(self, input_ids, attention_mask=None):
        mask = _as_bool_mask(attention_mask, input_ids)
        return self.encoder(self.embed_tokens(input_ids), _positions(input_ids, None, None), mask)  # (B, S, C)

    def decode(self, decoder_input_ids, memory, attention_mask=None, cache: Optional[KVCache] = None):
        """decoder_input_ids (B, T), memory (B, S, C), attention_mask (B, S) of the source -> logits (B, T, V)."""
        memory_mask = attention_mask.to(torch.bool) if attention_mask is not None else None
        x = self.embed_tokens(decoder_input_ids)  # (B, T, C)
        h = self.decoder(x, _positions(decoder_input_ids, None, cache), memory=memory, memory_mask=memory_mask,
                         cache=cache)
        if cache is not None:
            cache.length += decoder_input_ids.shape[1]
        return self.logits(h)

    def forward(self, input_ids, decoder_input_ids, attention_mask=None):
        _as_bool_mask(attention_mask, input_ids)  # validates the shape
        return self.decode(decoder_input_ids, self.encode(input_ids, attention_mask), attention_mask)

    def generate(self, input_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token_id=None,
                 attention_mask=None, num_beams=1, length_penalty=1.0, generator=None):
        """The decoder sequence (B, 1 + n): sampled or greedy, or beam search with num_beams > 1."""
        if num_beams > 1:
            return beam_search(self, input_ids, max_new_tokens, num_beams, eos_token_id,
                               attention_mask=attention_mask, length_penalty=length_penalty)
        return generate_seq2seq(self, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id,
                                attention_mask=attention_mask, generator=generator)


MODELS = {"decoder": DecoderLM, "encoder": Encoder, "encoder-decoder": EncoderDecoder}


def build(config, init: bool = True, **overrides) -> TransformerBase:
    """A model from a ModelConfig, a preset name or a dict of config fields; initialised unless init=False."""
    if isinstance(config, str):
        config = ModelConfig.from_name(config, **overrides)
    elif isinstance(config, dict):
        config = ModelConfig.from_dict({**config, **overrides})
    elif overrides:
        config = ModelConfig.from_dict({**config.to_dict(), **overrides})
    if not isinstance(config, ModelConfig):
        raise TypeError(f"build() takes a ModelConfig, preset name or dict, got {type(config).__name__}")
    model = MODELS[config.arch](config)
    if init:
        model.reset_parameters()
    return model
