"""tinyformer's models, written directly on tensors: decoder (GPT/Llama), encoder (BERT) and encoder-decoder.

Every parameter is a plain nn.Parameter and every op is spelled out; attention, matmuls and norms go through
`tinyformer.ops` (reference math, torch's fused ops, or Triton kernels). No nn.Linear, nn.LayerNorm,
nn.MultiheadAttention or nn.Transformer.

References:
- Vaswani et al. 2017, "Attention Is All You Need" (encoder-decoder, post-norm, sinusoidal positions).
- Radford et al. 2019, GPT-2 (pre-norm, learned positions, init std 0.02 with residual projections scaled by
  1/sqrt(2 * n_layer)); karpathy/nanoGPT model.py.
- Devlin et al. 2018, BERT (post-norm encoder, token types, embedding LayerNorm).
- Touvron et al. 2023, Llama (RMSNorm, SwiGLU, rotary positions); Su et al. 2021, RoFormer (RoPE, in the
  "rotate half" layout that Hugging Face Llama checkpoints use); Shazeer 2020, GLU variants.
- Ainslie et al. 2023, GQA (grouped-query attention); Shazeer 2019 (multi-query attention).

Legend: B batch, T query length, S key/memory length, C = d_model, H query heads, Hkv key/value heads,
Dh head dim, V vocab, F = d_ff.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyformer import ops
from tinyformer.config import ModelConfig


# ----------------------------------------------------------------------------------------------------------------------
# building blocks
class Linear(nn.Module):
    """y = x W^T + b with W (out, in): the layer that compression swaps for quantized or low-rank versions."""

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
    """LayerNorm (weight, optional bias) or RMSNorm (weight only)."""

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


def rope_tables(n_pos: int, head_dim: int, theta: float, device=None):
    """cos, sin tables (n_pos, Dh/2) for rotary positions: angle[p, i] = p * theta^(-2i / Dh)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)  # (Dh/2,)
    angles = torch.arange(n_pos, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]  # (P, Dh/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (x[i], x[i + Dh/2]) of x (B, H, T, Dh) by the angles in cos/sin (B, 1, T, Dh/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, H, T, Dh/2) each
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def sinusoidal_table(n_pos: int, d: int, device=None):
    """pe[p, 2i] = sin(p / 10000^(2i/d)), pe[p, 2i+1] = cos(p / 10000^(2i/d))  (Vaswani et al. 2017, 3.5)."""
    inv_freq = 10000.0 ** (-torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)  # (ceil(d/2),)
    angles = torch.arange(n_pos, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]  # (P, d/2)
    pe = torch.zeros(n_pos, d, device=device)
    pe[:, 0::2] = angles.sin()
    pe[:, 1::2] = angles.cos()[:, : d // 2]
    return pe  # (P, d)


class KVCache:
    """Preallocated keys and values of every self-attention layer, plus the cross-attention keys/values of the
    encoder memory (computed once). `length` counts the positions written so far."""

    def __init__(self, n_layer: int, batch: int, n_kv_head, max_len: int, head_dim: int, dtype, device):
        # n_kv_head: one int, or one per layer (structured pruning leaves layers with different head counts)
        heads = list(n_kv_head) if isinstance(n_kv_head, (list, tuple)) else [n_kv_head] * n_layer
        self.k = [torch.zeros(batch, h, max_len, head_dim, dtype=dtype, device=device) for h in heads[:n_layer]]
        self.v = [torch.zeros(batch, h, max_len, head_dim, dtype=dtype, device=device) for h in heads[:n_layer]]
        self.cross: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.max_len, self.length = max_len, 0

    def update(self, layer: int, k, v):
        """Write k, v (B, Hkv, T, Dh) at positions length..length+T; return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; writing up to {end}")
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, Hkv, end, Dh)

    def reorder(self, index, cross: bool = True):
        """Row i becomes row index[i] (beam search; index has one entry per row): the positions written so far are
        gathered along the batch dim, in place. cross=False leaves the cross-attention keys/values as they are, which
        is right when every row of `index` has the same encoder memory as the row it replaces (beams of one source, as
        beam_search's are)."""
        for t in self.k + self.v:
            t[:, :, :self.length] = t[index, :, :self.length]  # (B, Hkv, length, Dh)
        if cross:
            self.cross = {i: (k.index_select(0, index), v.index_select(0, index)) for i, (k, v) in self.cross.items()}


def _decode_layout(p: nn.Parameter) -> nn.Parameter:
    """p itself when it is laid out as `pack_` wants for its dtype, else the same values so: a transposed view of a
    contiguous (in, out) tensor (fp32) or a contiguous (out, in) one (low precision, `_rows_layout`)."""
    if _rows_layout(p.dtype):
        return p if p.is_contiguous() else nn.Parameter(p.detach().contiguous(), requires_grad=p.requires_grad)
    return p if p.stride(0) == 1 else nn.Parameter(p.detach().T.contiguous().T, requires_grad=p.requires_grad)


def _pack_shared(linears) -> None:
    """Give float Linears that read the same input (q/k/v; gate/up) one shared buffer, so `_one_buffer` can multiply
    by all of them at once: fp32 weights become transposed views of the column slices of an (in, sum of outs) tensor
    (the layout numpy's BLAS streams fastest), low-precision ones row slices of a (sum of outs, in) tensor (torch's
    own layout, which its bf16 kernels need: see `TransformerBase.pack_`)."""
    if any(type(m) is not Linear for m in linears):  # quantized or factored: nothing to share
        return
    ws = [m.weight for m in linears]
    rows = _rows_layout(ws[0].dtype)
    if _one_buffer(ws, rows) is not None or len({(w.shape[1], w.dtype, w.device) for w in ws}) != 1:
        return
    buf = torch.cat([w.detach() for w in ws])  # (sum N, K)
    buf = buf if rows else buf.T.contiguous()  # or (K, sum N)
    start = 0
    for m, w in zip(linears, ws):
        n = w.shape[0]
        view = buf[start:start + n] if rows else buf[:, start:start + n].T  # (N, K)
        m.weight = nn.Parameter(view, requires_grad=w.requires_grad)
        start += n


def _rows_layout(dtype) -> bool:
    """Whether `pack_` keeps weights of this dtype (out, in)-contiguous (low precision) or lays them out (in, out)."""
    return dtype != torch.float32


def _one_buffer(ws, rows=None):
    """The (sum N, K) weight that the (N_i, K) weights `ws` form when they are consecutive row slices of one
    (sum N, K) tensor (rows=True) or consecutive column slices of one (K, sum N) tensor (rows=False; None: either),
    as `_pack_shared` builds them, else None. Pure stride/pointer arithmetic: no copy. None under torch.compile,
    which cannot trace data_ptr (its failure there made Dynamo skip the whole forward: every layer a graph of its
    own); the callers then multiply by each weight, and Inductor fuses what it can."""
    if torch.compiler.is_compiling():
        return None
    if rows is None:
        got = _one_buffer(ws, True)
        return got if got is not None else _one_buffer(ws, False)
    total, w0 = sum(w.shape[0] for w in ws), ws[0]
    K = w0.shape[1]
    strides = (K, 1) if rows else (1, total)
    offset = 0  # elements from the first weight's start: offset rows (times K) or offset columns
    for w in ws:
        if (w.dim() != 2 or w.stride() != strides or w.dtype != w0.dtype or w.shape[1] != K
                or w.data_ptr() != w0.data_ptr() + offset * (K if rows else 1) * w0.element_size()):
            return None
        offset += w.shape[0]
    return w0.detach().as_strided((total, K), strides)


class Attention(nn.Module):
    """Multi-head attention with H query heads and Hkv key/value heads (GQA/MQA when Hkv < H): self-attention
    (optionally causal, optionally rotary) or cross-attention to an encoder memory."""

    def __init__(self, cfg: ModelConfig, causal: bool, cross: bool, resid_std: float):
        super().__init__()
        H, Hkv, Dh, C = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_model
        self.n_head, self.n_kv_head, self.head_dim = H, Hkv, Dh
        self.causal, self.cross, self.dropout = causal, cross, cfg.dropout
        self.rope = cfg.pos == "rope" and not cross
        self.fuse = True  # one product for q/k/v; calibration turns this off so hooks on wq/wk/wv see inputs
        self.wq = Linear(C, H * Dh, cfg.bias, cfg.init_std)
        self.wk = Linear(C, Hkv * Dh, cfg.bias, cfg.init_std)
        self.wv = Linear(C, Hkv * Dh, cfg.bias, cfg.init_std)
        self.wo = Linear(H * Dh, C, cfg.bias, resid_std)

    def _heads(self, x, n_head):
        B, T, _ = x.shape
        return x.reshape(B, T, n_head, self.head_dim).transpose(1, 2)  # (B, T, h*Dh) -> (B, h, T, Dh)

    def _qkv(self, x):
        """q (B, H, T, Dh), k and v (B, Hkv, T, Dh) of x. When all three are float Linears they run as one matmul
        against the concatenated weights: fewer, wider GEMMs (a baby-GPT training step went from 1.00x to 1.09x
        nanoGPT's speed in an interleaved A/B on 2 CPU cores)."""
        proj = (self.wq, self.wk, self.wv)
        w = None
        if self.fuse and all(type(m) is Linear for m in proj):
            if torch.is_grad_enabled():
                w = torch.cat([m.weight for m in proj])  # (H*Dh + 2*Hkv*Dh, C)
            else:  # inference: one product only when no copy is needed (weights laid out by pack_)
                w = _one_buffer([m.weight for m in proj])  # (H*Dh + 2*Hkv*Dh, C) or None
        if w is not None:
            b = torch.cat([m.bias for m in proj]) if self.wq.bias is not None else None
            sizes = [m.weight.shape[0] for m in proj]
            q, k, v = ops.linear(x, w, b).split(sizes, dim=-1)  # (B, T, H*Dh), (B, T, Hkv*Dh) x 2
        else:  # quantized or factored projections, or inference on unpacked weights
            q, k, v = (m(x) for m in proj)
        return self._heads(q, self.n_head), self._heads(k, self.n_kv_head), self._heads(v, self.n_kv_head)

    def forward(self, x, key_padding_mask=None, rope=None, memory=None, cache: Optional[KVCache] = None,
                layer: int = 0):
        B, T, _ = x.shape
        if self.cross:
            q = self._heads(self.wq(x), self.n_head)  # (B, H, T, Dh)
            if cache is not None and layer in cache.cross:
                k, v = cache.cross[layer]
            else:
                k = self._heads(self.wk(memory), self.n_kv_head)  # (B, Hkv, S, Dh)
                v = self._heads(self.wv(memory), self.n_kv_head)  # (B, Hkv, S, Dh)
                if cache is not None:
                    cache.cross[layer] = (k, v)
        else:
            q, k, v = self._qkv(x)  # (B, H, T, Dh), (B, Hkv, T, Dh) x 2
            if self.rope:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            if cache is not None:
                k, v = cache.update(layer, k, v)  # (B, Hkv, S, Dh): the whole prefix
        y = ops.attention(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask,
                          dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, Dh)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, H*Dh)
        y = self.wo(y)
        return F.dropout(y, self.dropout, self.training) if self.training and self.dropout else y


def activation(name: str, x):
    """GELU (erf), GELU's tanh approximation, or ReLU, elementwise."""
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    return F.relu(x)


class FeedForward(nn.Module):
    """w2(act(w1 x)) for GELU/ReLU; w2(silu(w1 x) * w3 x) for SwiGLU (w1 = gate, w3 = up, w2 = down)."""

    def __init__(self, cfg: ModelConfig, resid_std: float):
        super().__init__()
        self.act, self.dropout = cfg.act, cfg.dropout
        self.fuse = True  # one product for gate/up (packed, inference); calibration turns this off (hooks on w1/w3)
        self.w1 = Linear(cfg.d_model, cfg.d_ff, cfg.bias, cfg.init_std)
        self.w3 = Linear(cfg.d_model, cfg.d_ff, cfg.bias, cfg.init_std) if cfg.act == "swiglu" else None
        self.w2 = Linear(cfg.d_ff, cfg.d_model, cfg.bias, resid_std)

    def forward(self, x):
        if self.act == "swiglu":
            w13 = None
            if self.fuse and not torch.is_grad_enabled() and type(self.w1) is Linear and type(self.w3) is Linear:
                w13 = _one_buffer([self.w1.weight, self.w3.weight])  # (2F, C), laid out by pack_, or None
            if w13 is not None:  # gate and up in one product
                b = torch.cat([self.w1.bias, self.w3.bias]) if self.w1.bias is not None else None
                gate, up = ops.linear(x, w13, b).chunk(2, dim=-1)  # (B, T, 2F) -> (B, T, F) x 2
            else:
                gate, up = self.w1(x), self.w3(x)  # (B, T, F) each
            h = F.silu(gate) * up
        else:
            h = activation(self.act, self.w1(x))  # (B, T, F)
        h = self.w2(h)  # (B, T, C)
        return F.dropout(h, self.dropout, self.training) if self.training and self.dropout else h


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

    def forward(self, x, key_padding_mask=None, rope=None, memory=None, memory_mask=None, cache=None, layer=0):
        x = self._residual(x, self.norm1, lambda h: self.attn(h, key_padding_mask, rope, cache=cache, layer=layer))
        if self.cross_attn is not None:
            x = self._residual(x, self.norm_cross,
                               lambda h: self.cross_attn(h, memory_mask, memory=memory, cache=cache, layer=layer))
        return self._residual(x, self.norm2, self.mlp)


class Stack(nn.Module):
    """Positions (+ token types) added to token embeddings, the blocks, and the final norm (pre-norm only)."""

    def __init__(self, cfg: ModelConfig, n_layer: int, causal: bool, cross: bool):
        super().__init__()
        self.cfg, self.causal = cfg, causal
        self.wpe = nn.Parameter(torch.empty(cfg.max_seq_len, cfg.d_model)) if cfg.pos == "learned" else None
        self.wtt = nn.Parameter(torch.empty(cfg.type_vocab_size, cfg.d_model)) if cfg.type_vocab_size else None
        self.embed_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.bias) if cfg.embed_norm else None
        self.blocks = nn.ModuleList(Block(cfg, causal, cross, n_layer) for _ in range(n_layer))
        self.final_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.bias) if cfg.norm_position == "pre" else None
        self.init_buffers()

    def init_buffers(self):
        """(Re)compute the position tables, which are derived, not saved (also after loading on the meta device)."""
        device = self.blocks[0].norm1.weight.device
        device = None if device.type == "meta" else device
        cfg = self.cfg
        if cfg.pos == "rope":
            cos, sin = rope_tables(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta, device)
            self.register_buffer("rope_cos", cos, persistent=False)  # (P, Dh/2)
            self.register_buffer("rope_sin", sin, persistent=False)  # (P, Dh/2)
        elif cfg.pos == "sinusoidal":
            self.register_buffer("pe", sinusoidal_table(cfg.max_seq_len, cfg.d_model, device), persistent=False)

    def forward(self, tok_emb, position_ids, key_padding_mask=None, token_type_ids=None, memory=None,
                memory_mask=None, cache=None):
        """tok_emb (B, T, C), position_ids (B or 1, T) -> hidden states (B, T, C)."""
        cfg = self.cfg
        if not torch.compiler.is_compiling() and int(position_ids.max()) >= cfg.max_seq_len:  # (see embed_tokens)
            raise ValueError(f"position {int(position_ids.max())} is beyond max_seq_len={cfg.max_seq_len}")
        x, rope = tok_emb, None
        if cfg.pos == "learned":
            x = x + self.wpe[position_ids]  # (B, T, C)
        elif cfg.pos == "sinusoidal":  # token embeddings scaled by sqrt(C) so they are not drowned (Vaswani 3.4)
            x = x * math.sqrt(cfg.d_model) + self.pe[position_ids]
        else:
            rope = (self.rope_cos[position_ids][:, None], self.rope_sin[position_ids][:, None])  # (B, 1, T, Dh/2)
        if self.wtt is not None:
            types = token_type_ids if token_type_ids is not None else torch.zeros_like(position_ids)
            x = x + self.wtt[types]
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        if self.training and cfg.dropout:
            x = F.dropout(x, cfg.dropout, self.training)
        for i, block in enumerate(self.blocks):
            x = block(x, key_padding_mask, rope, memory, memory_mask, cache, i)
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


class TransformerBase(nn.Module):
    """What the three models share: config, token embeddings, output head, init, save, parameter count."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tokenizer = None  # a `tokenizers.Tokenizer` when the model has one (saved as tokenizer.json)
        self.chat_template = None  # a Jinja chat template string (from a pretrained model), saved in config.json
        self.bos_token_id = self.eos_token_id = None
        self.wte = nn.Parameter(torch.empty(cfg.vocab_size, cfg.d_model))  # (V, C)
        head = cfg.arch != "encoder" and not cfg.tie_embeddings
        self.lm_head = nn.Parameter(torch.empty(cfg.vocab_size, cfg.d_model)) if head else None  # (V, C)

    def reset_parameters(self):
        """GPT-2 initialisation: N(0, 0.02) for matrices and embeddings, residual projections N(0, 0.02/sqrt(2L)),
        zero biases, unit norm weights."""
        for m in self.modules():
            if isinstance(m, (Linear, Norm)):
                m.reset_parameters()
            if isinstance(m, Stack):
                for p in (m.wpe, m.wtt):
                    if p is not None:
                        nn.init.normal_(p, 0.0, self.config.init_std)
        for p in (self.wte, self.lm_head):
            if isinstance(p, nn.Parameter):  # a quantized head (a module) keeps its codes
                nn.init.normal_(p, 0.0, self.config.init_std)

    def init_buffers(self):
        for m in self.modules():
            if isinstance(m, Stack):
                m.init_buffers()

    @torch.no_grad()
    def pack_(self):
        """Lay the float weights out for fast batch-1 decoding on CPU (same values, other strides), in place.

        A decode step multiplies one row by every weight: it streams the weights from memory. Every fp32 weight
        becomes a transposed view of an (in, out)-contiguous tensor, the layout that generate's `NumpyDecodeStep`
        hands to numpy's BLAS (27 GB/s over SmolLM2's matrices on 2 cores, against 14-17 GB/s for torch's F.linear
        in either layout; for the 49152x576 output head alone torch's GEMV takes 5.1 ms on this layout, 10.4 ms on
        (out, in)). bf16 / fp16 weights keep torch's (out, in) layout: numpy has no bf16, and on a CPU without
        oneDNN bf16 (AVX2 only) aten's bf16 F.linear ran 10x slower on a transposed view (1x576 @ 576x1536: 1.5 ms
        against 0.15 ms; 128 rows: 174 ms against 15 ms). Projections that read the same input (q/k/v of
        self-attention; gate/up of SwiGLU) share one buffer, each weight a view of its column slice of an
        (in, sum of outs) tensor (fp32) or its row slice of a (sum of outs, in) one, so inference multiplies by them
        at once (fewer, wider products). Training still works on such views (autograd sees separate parameters;
        train.py turns fused AdamW off for them: its kernel assumes dense parameters).
        Parameters keep their shapes and values but are new Parameter objects: build an optimizer after this, not
        before (`tinyformer.load` calls it; call it again after casting the model, e.g. `.to(torch.bfloat16)`).
        Whatever is already laid out so is left alone."""
        for m in list(self.modules()):
            if isinstance(m, Attention) and not m.cross:
                _pack_shared([m.wq, m.wk, m.wv])
            elif isinstance(m, FeedForward) and m.w3 is not None:
                _pack_shared([m.w1, m.w3])
        for m in list(self.modules()):
            if type(m) is Linear:
                m.weight = _decode_layout(m.weight)
        for name in ("wte", "lm_head"):
            if isinstance(getattr(self, name), nn.Parameter):
                setattr(self, name, _decode_layout(getattr(self, name)))
        return self

    def logits(self, hidden):
        """hidden (B, T, C) -> logits (B, T, V) through the tied embedding, the separate head, or a quantized head
        (an `Int8Linear` that `quantize_(..., head=True)` put in lm_head's place)."""
        if isinstance(self.lm_head, nn.Module):
            return self.lm_head(hidden)
        return ops.linear(hidden, self.lm_head if self.lm_head is not None else self.wte)

    def embed_tokens(self, input_ids):
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input ids must be an integer tensor, got {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(f"input ids must be 2-D (batch, time), got shape {tuple(input_ids.shape)}")
        # the range check reads the ids back (a host sync; under torch.compile a graph break at every forward):
        # compiled code relies on the lookup's own bounds check
        if (not torch.compiler.is_compiling() and input_ids.numel()
                and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size)):
            raise ValueError(f"token ids must be in 0..{self.config.vocab_size - 1}, got "
                             f"{int(input_ids.min())}..{int(input_ids.max())}")
        if input_ids.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_seq_len={self.config.max_seq_len}")
        return self.wte[input_ids]  # (B, T, C)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count; non_embedding=True leaves out the token and position embeddings (as nanoGPT reports)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.numel()
            n -= sum(m.wpe.numel() for m in self.modules() if isinstance(m, Stack) and m.wpe is not None)
        return n

    def new_cache(self, batch: int, max_len: int, n_layer: Optional[int] = None) -> KVCache:
        cfg, p = self.config, self.wte
        n_layer = n_layer if n_layer is not None else cfg.n_layer
        stack = getattr(self, "decoder", None)  # per-layer KV heads: structured pruning may have removed some
        heads = [b.attn.n_kv_head for b in stack.blocks] if stack is not None else cfg.n_kv_head
        return KVCache(n_layer, batch, heads, max_len, cfg.head_dim, p.dtype, p.device)

    def save(self, path):
        from tinyformer.checkpoint import save_model
        save_model(self, path)


def _positions(input_ids, attention_mask, cache):
    """Position ids (B or 1, T): counting real tokens only when there is a (left-padding) mask."""
    start = cache.length if cache is not None else 0
    if attention_mask is None:
        return torch.arange(start, start + input_ids.shape[1], device=input_ids.device)[None]  # (1, T)
    pos = attention_mask.long().cumsum(-1) - 1  # (B, S): position of each real token among the real ones
    return pos[:, -input_ids.shape[1]:].clamp(min=0)  # (B, T)


class DecoderLM(TransformerBase):
    """A decoder-only language model (GPT-2, Llama): model(input_ids) -> logits (B, T, V)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.decoder = Stack(cfg, cfg.n_layer, causal=True, cross=False)

    def forward(self, input_ids, attention_mask=None, cache: Optional[KVCache] = None, last_only: bool = False):
        """input_ids (B, T). attention_mask (B, S) covers the cached positions plus these T (1 = real token), for
        left-padded batches; with a cache, the T new tokens are appended to it. last_only: logits of the last
        position only (B, 1, V), as generation needs (saves a (T-1) x V x C product at prefill)."""
        x = self.embed_tokens(input_ids)  # (B, T, C)
        S = input_ids.shape[1] + (cache.length if cache is not None else 0)
        if attention_mask is not None and tuple(attention_mask.shape) != (input_ids.shape[0], S):
            raise ValueError(f"attention_mask must be (B, cached + new) = {(input_ids.shape[0], S)}, "
                             f"got {tuple(attention_mask.shape)}")
        mask = attention_mask.to(torch.bool) if attention_mask is not None else None
        h = self.decoder(x, _positions(input_ids, mask, cache), key_padding_mask=mask, cache=cache)
        if cache is not None:
            cache.length += input_ids.shape[1]
        return self.logits(h[:, -1:] if last_only else h)  # (B, T or 1, V)

    def generate(self, input_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token_id=None,
                 attention_mask=None, generator=None, on_token=None, compile=False):
        from tinyformer.generate import generate
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

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        mask = _as_bool_mask(attention_mask, input_ids)
        x = self.embed_tokens(input_ids)  # (B, T, C)
        return self.encoder(x, _positions(input_ids, None, None), mask, token_type_ids)

    @torch.no_grad()
    def embed(self, input_ids, attention_mask=None):
        """Sentence embeddings (B, C): mean of the real tokens' hidden states, L2-normalised (Sentence-BERT)."""
        h = self(input_ids, attention_mask)  # (B, T, C)
        m = torch.ones_like(input_ids, dtype=h.dtype) if attention_mask is None else attention_mask.to(h.dtype)
        pooled = (h * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1e-9)  # (B, C)
        return F.normalize(pooled, dim=-1)


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

    def new_cache(self, batch: int, max_len: int, n_layer: Optional[int] = None) -> KVCache:
        return super().new_cache(batch, max_len, self.config.n_decoder_layer)

    def generate(self, input_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token_id=None,
                 attention_mask=None, num_beams=1, length_penalty=1.0, generator=None):
        from tinyformer.generate import beam_search, generate_seq2seq
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
