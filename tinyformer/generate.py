"""Autoregressive generation with a KV cache: greedy, temperature, top-k and nucleus (top-p) sampling, EOS stops,
left-padded batches; beam search for the encoder-decoder.

References: Holtzman et al. 2019, "The Curious Case of Neural Text Degeneration" (top-p); Fan et al. 2018 (top-k);
Wu et al. 2016, GNMT (beam search with length normalisation); nanoGPT's `generate` (sliding context window once the
sequence is longer than the model's context).
"""
from __future__ import annotations

import contextlib
import math
import weakref
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyformer import ops
from tinyformer.kernels import int4_mm, int8_mm
from tinyformer.model import Linear, _one_buffer
from tinyformer.qlinear import Int4Linear, Int8Linear, LowRankLinear, QuantLinear


def _check_args(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a 2-D LongTensor (batch, time)")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty: give at least one prompt token")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    V = model.config.vocab_size
    if eos_token_id is not None and not (0 <= eos_token_id < V):
        raise ValueError(f"eos_token_id {eos_token_id} is outside the vocabulary 0..{V - 1}")


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> next token ids (B,). temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1): the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)  # (B, V)
        probs = sorted_logits.softmax(-1)
        # drop a token once the tokens ranked above it already hold top_p of the mass (the first always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, input_ids, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, eos_token_id: Optional[int] = None, attention_mask=None, generator=None,
             on_token=None):
    """Decoder-only generation: returns prompt + new tokens (B, T + n). With a left-padded batch pass
    `attention_mask` (B, T), 1 = real token. Rows that hit EOS are filled with EOS until every row is done.
    `on_token(ids (B,))` is called with each new token as it is chosen (for streaming).
    Past the model's context (max_seq_len), the model sees the last max_seq_len tokens, as nanoGPT does."""
    _check_args(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id)
    was_training = model.training
    model.eval()
    B, T0 = input_ids.shape
    ctx = model.config.max_seq_len
    if T0 > ctx:  # keep the prompt's tail, as nanoGPT does
        input_ids = input_ids[:, -ctx:]
    mask = None
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (B, T0):
            raise ValueError(f"attention_mask must have shape {(B, T0)}, got {tuple(attention_mask.shape)}")
        mask = attention_mask.to(device=input_ids.device, dtype=torch.long)[:, -input_ids.shape[1]:]
    out = [input_ids]
    full = input_ids
    cache = model.new_cache(B, min(ctx, input_ids.shape[1] + max_new_tokens))  # no bigger than needed
    logits = model(input_ids, attention_mask=mask, cache=cache, last_only=True)[:, -1]  # (B, V)
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    fast = B == 1 and mask is None and max_new_tokens > 1 and numpy_decodes(model)  # > 1: a decode step will run
    numpy_step = NumpyDecodeStep(model, cache) if fast else None  # batch-1 fp32/bf16 on CPU: decode steps on numpy
    with _one_torch_thread(fast and numpy_step.sgemv):  # numpy's sgemv has both cores
        for step in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            if eos_token_id is not None:
                nxt = nxt.masked_fill(done, eos_token_id)
                done |= nxt == eos_token_id
            out.append(nxt[:, None])
            if on_token is not None:
                on_token(nxt)
            full = torch.cat((full, nxt[:, None]), dim=1)
            if mask is not None:
                mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            if cache.length < cache.max_len and numpy_step is not None:
                logits = numpy_step(int(nxt))  # (1, V)
            elif cache.length < cache.max_len:  # the new token fits in the cache: one cheap step
                logits = model(nxt[:, None], attention_mask=mask, cache=cache)[:, -1]
            else:  # the context is full: slide the window and recompute it (no cache), like nanoGPT
                window = full[:, -ctx:]
                window_mask = mask[:, -ctx:] if mask is not None else None
                logits = model(window, attention_mask=window_mask, last_only=True)[:, -1]
    model.train(was_training)
    result = torch.cat(out, dim=1)
    if result.shape[1] < input_ids.shape[1] + max_new_tokens and eos_token_id is not None:  # all rows stopped early
        pad = result.new_full((B, input_ids.shape[1] + max_new_tokens - result.shape[1]), eos_token_id)
        result = torch.cat((result, pad), dim=1)
    return result


@contextlib.contextmanager
def _one_torch_thread(enabled: bool):
    """Torch on one thread within (restored after): around `NumpyDecodeStep` for an fp32 model, whose products run on
    numpy's BLAS (OpenBLAS sgemv, its own 2 threads) over the (in, out)-contiguous weights `TransformerBase.pack_`
    lays out. Over SmolLM2-135M's 30 layers of weights numpy streamed 27 GB/s on 2 cores where torch's F.linear
    streamed 14-17 GB/s (either layout). The one thread is not optional: OpenBLAS's and torch's OpenMP threads both
    spin while they wait, and with both pools at 2 threads on 2 cores SmolLM2's decode fell from 21 to 3.9 tokens/s."""
    threads = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def numpy_decodes(model) -> bool:
    """Whether `NumpyDecodeStep` serves this model: a decoder-only model (no token types, no embedding norm) on CPU
    with the torch backend, its float weights all fp32 or all bf16; quantized linears (torch's int8/int4 kernels) are
    fine."""
    from tinyformer.model import DecoderLM
    p, stack = next(model.parameters()), getattr(model, "decoder", None)
    dtypes = (torch.float32, torch.bfloat16)
    return (isinstance(model, DecoderLM) and stack.wtt is None and stack.embed_norm is None
            and p.device.type == "cpu" and p.dtype in dtypes and ops.get_backend(p.device) == "torch"
            and all(q.dtype == p.dtype for q in model.parameters()))


_PACKED: dict = {}  # id(Parameter) -> (weak reference to it, what it was packed from, oneDNN-packed bf16 weight)


def _f32(t):
    """A float32 numpy array of `t`: a view when it already is float32, else a copy."""
    return t.detach().float().numpy()


def _onednn_weight(weight, owner):
    """oneDNN's prepacked (blocked) layout of a bf16 weight (N, K), cached per Parameter `owner` while it lives and its
    storage, layout and version stay the same. F.linear's bf16 GEMV reorders the weight on every call (~6 GB/s on 2
    cores for SmolLM2's matrices); the prepacked one streams at 18-28 GB/s. The cost: a second copy of the bf16
    weights while the model lives, and ~0.3-0.7 s to pack SmolLM2-135M once."""
    key, sig = id(owner), (weight.data_ptr(), tuple(weight.shape), weight.stride(), owner._version)
    hit = _PACKED.get(key)
    if hit is None or hit[0]() is not owner or hit[1] != sig:
        alive = weakref.ref(owner, lambda _, key=key: _PACKED.pop(key, None))  # dropped with the Parameter
        hit = _PACKED[key] = (alive, sig, torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1))
    return hit[2]


def _zero_padded(f, n: int, k_pad: int):
    """f over x (n,) written into the first n entries of a zero buffer (k_pad,) kept for every call."""
    xp = np.zeros(k_pad, np.float32)

    def padded(x):
        xp[:n] = x
        return f(xp)
    return padded


def _quantized_row(m):
    """x (K,) -> (N,) for an `Int4Linear` / `Int8Linear` straight on torch's CPU kernel (the one its forward reaches
    through ops -> kernels, with the same bf16 rounding and bias), or None where that kernel does not apply. The
    forward's argument checks and dispatch cost 45-65 us a call, 3-5x the kernel's own time on SmolLM2's shapes."""
    if type(m) is Int4Linear:
        return _int4_row(int4_mm._prepacked(m.weight_packed, m.scales, m.zeros, m.group_size), [m])
    return _int8_row(m.weight, m.scale, [m]) if type(m) is Int8Linear else None


def _int8_row(w, scale, mods):
    """x (K,) -> (sum of N,) on torch's packed int8 CPU kernel over the codes `w` (N, K) and scales (N,) of the
    modules (stacked along N when there are several), their biases added; None where the kernel does not apply."""
    if (not int8_mm._have("_weight_int8pack_mm") or w.shape[1] % int8_mm.INT8PACK_K_MULTIPLE
            or not w.is_contiguous() or w.data_ptr() % 64):  # the cases int8_weight_only_matmul_cpu avoids
        return None
    kernel, scale = torch.ops.aten._weight_int8pack_mm, scale.to(torch.bfloat16)
    return _plus_biases(_bf16_row(lambda xb: kernel(xb, w, scale), w.shape[1]), mods)


def _bf16_row(kernel, k: int):
    """x (K,) float32 numpy -> kernel(x as a (1, K) bf16 tensor) (1, N) -> (N,) float32 numpy, through one bf16 row
    kept for every call (16 us a call on a 384x128 int8 weight, against 24 us converting a new tensor each time)."""
    xb = torch.empty(1, k, dtype=torch.bfloat16)
    row = xb[0]

    def f(x):
        row.copy_(torch.from_numpy(x))
        return kernel(xb).float().numpy()[0]
    return f


def _plus_biases(f, mods):
    """f, then the modules' biases (concatenated along N; zeros for a module without one) added, if any."""
    if all(m.bias is None for m in mods):
        return f
    b = torch.cat([m.bias.float() if m.bias is not None else torch.zeros(m.n_out) for m in mods]).numpy()  # (sum N,)
    return lambda x: f(x) + b


def _int4_row(p, mods):
    """x (K,) -> (sum of N,) on torch's int4 CPU kernel over `p` (an `Int4PackedCPU` of the modules' weights, stacked
    along N when there are several), the modules' biases added; None where the kernel does not apply."""
    if not p.fast:
        return None
    kernel, packed, G, sz = torch.ops.aten._weight_int4pack_mm_for_cpu, p.packed, p.group_size, p.scale_and_zero
    f = _bf16_row(lambda xb: kernel(xb, packed, G, sz), p.K)  # p.K: the padded K of whole groups
    m = mods[0]
    if m.k_pad != m.n_in:  # a ragged last group: x padded with zeros to whole groups, as Int4Linear.matmul
        f = _zero_padded(f, m.n_in, m.k_pad)
    return _plus_biases(f, mods)


_FUSED = int8_mm.WeightCache()  # the stacked (int4: and repacked) weights of `_fused_row`, per first module's codes


def _fused_row(mods):
    """x (K,) -> (sum of N,) for Int8Linears or Int4Linears that read the same input (q/k/v; gate/up): their codes,
    scales (and zeros) stacked along N (int4: and repacked) once, cached while the modules' tensors live and stay
    unchanged, so a step calls torch's kernel once instead of once each. SmolLM2-135M int4 g32 on a 2-core AVX2
    EPYC: 210 -> 120 kernel calls a token, the block products 20.1 -> 13.3 ms a token (the kernel dequantizes ~10 G
    weights/s there: ~11 ms of it); the baby Shakespeare model in int8 (a kernel call costs ~20 us there, its own
    work a few): 24 -> 16 calls a token. Memory: a second copy of those weights. None where the modules are not all
    Int8Linear or all Int4Linear, differ in input size or group size, or the kernel does not apply."""
    m0, kind = mods[0], type(mods[0])
    if len(mods) < 2 or kind not in (Int8Linear, Int4Linear) or any(type(m) is not kind for m in mods):
        return None
    if kind is Int8Linear:
        if any(m.n_in != m0.n_in for m in mods):
            return None
        w, scale = _FUSED.get(tuple(t for m in mods for t in (m.weight, m.scale)), None,
                              lambda: (torch.cat([m.weight for m in mods]), torch.cat([m.scale for m in mods])))
        return _int8_row(w, scale, mods)  # (sum N, K) codes, (sum N,) scales
    if any((m.n_in, m.k_pad, m.group_size) != (m0.n_in, m0.k_pad, m0.group_size) for m in mods):
        return None
    p = _FUSED.get(tuple(t for m in mods for t in (m.weight_packed, m.scales, m.zeros)), m0.group_size,
                   lambda: int4_mm.Int4PackedCPU(*(torch.cat([getattr(m, n) for m in mods])  # (sum N, ...)
                                                   for n in ("weight_packed", "scales", "zeros")), m0.group_size))
    return _int4_row(p, mods)


class NumpyDecodeStep:
    """One decode step of a batch-1 fp32 or bf16 `DecoderLM` on numpy: the math of model.py's Stack/Block/Attention/
    FeedForward for a single new position, on numpy views of the model's own weights and KV cache (no copies).

    Why: at batch 1 a decode step is ~120 matrix-vector products plus ~60 small ops per layer, each on a vector of a
    few hundred floats. On 2 CPU cores torch spends 3-15 us of dispatch on each small op and 10 us in F.linear's GEMV
    for every 1 us of numpy's; for SmolLM2-135M the small ops alone took ~10 ms a token through the modules, which is
    as long as streaming a third of the weights. Here each layer is ~40 numpy calls, and the products are
    - fp32 model: OpenBLAS's sgemv on the (in, out)-contiguous weights `TransformerBase.pack_` lays out (unpacked
      weights work too, slower); `generate` keeps torch on one thread meanwhile (`_one_torch_thread`);
    - bf16 model: oneDNN's bf16 GEMV on torch's threads (below), or aten's where oneDNN has no bf16 (AVX2 CPUs);
    - `Int8Linear` / `Int4Linear`: torch's packed CPU kernels, called straight (`_quantized_row`; q/k/v and gate/up
      in one call, `_fused_row`); the float weights of such a model (its head) go through F.linear,
      as torch's kernels need torch's threads;
    - a factored `LowRankLinear`: its two thin linears, one after the other, as above;
    - any other linear: its own forward on a torch view.
    Tests check it against the modules' forward. The cache's `length` advances as in `DecoderLM.forward`.

    bf16 models: the weights stay bf16 and every product is oneDNN's bf16 GEMV on a prepacked copy of the weight
    (`_onednn_weight`; the activation is rounded to bf16 going in, fp32 accumulation), on torch's threads (on a CPU
    without oneDNN bf16, `ops.onednn_bf16()` False, aten's bf16 F.linear on the weight itself: 9-13 GB/s on SmolLM2's
    shapes on a 2-core AVX2 EPYC, as fast as its fp32 F.linear in GB/s, so half the time a product); the
    residual stream, norms, rotary and attention run in fp32 (as llama.cpp runs its F16/BF16 models), so the logits
    differ from the modules' all-bf16 forward by bf16 rounding. numpy has no bf16: the step keeps its own fp32 copy of
    the KV cache (the cache's tensors are not updated past the prefill; `length` is)."""

    def __init__(self, model, cache):
        stack, cfg = model.decoder, model.config
        self.cache, self.cfg, self.dtype = cache, cfg, model.wte.dtype
        # numpy's sgemv (OpenBLAS threads; torch must then keep to one) for an all-float fp32 model; with quantized
        # linears torch's int8/int4 kernels need torch's threads, so its F.linear does the fp32 products too
        self.sgemv = self.dtype == torch.float32 and not any(isinstance(m, QuantLinear) for m in model.modules())
        self.wte = model.wte.detach()  # (V, C): rows taken per token
        head = model.lm_head if model.lm_head is not None else model.wte
        self.head = (self._linear(head) if isinstance(head, nn.Module)  # quantized (Int8Linear)
                     else self._linear_of(head, [None], head))  # (C,) -> (V,)
        self.wpe = _f32(stack.wpe) if stack.wpe is not None else None
        self.pe = _f32(stack.pe) if cfg.pos == "sinusoidal" else None
        if cfg.pos == "rope":
            self.cos, self.sin = _f32(stack.rope_cos), _f32(stack.rope_sin)  # (P, Dh/2)
        self.final_norm = self._norm(stack.final_norm) if stack.final_norm is not None else None
        self.layers = []
        for i, b in enumerate(stack.blocks):
            a, f = b.attn, b.mlp
            proj = [a.wq, a.wk, a.wv]
            w = _one_buffer([m.weight for m in proj]) if all(type(m) is Linear for m in proj) else None
            qkv = (self._linear_of(w, [m.bias for m in proj], a.wq.weight) if w is not None
                   else _fused_row(proj) or self._concat([self._linear(m) for m in proj]))
            if f.w3 is not None:
                w = (_one_buffer([f.w1.weight, f.w3.weight]) if type(f.w1) is Linear and type(f.w3) is Linear
                     else None)
                up = (self._linear_of(w, [f.w1.bias, f.w3.bias], f.w1.weight) if w is not None
                      else _fused_row([f.w1, f.w3]) or self._concat([self._linear(f.w1), self._linear(f.w3)]))
            else:
                up = self._linear(f.w1)
            self.layers.append(dict(
                pre=b.pre, norm1=self._norm(b.norm1), norm2=self._norm(b.norm2), qkv=qkv, wo=self._linear(a.wo),
                up=up, down=self._linear(f.w2), act=f.act, H=a.n_head, Hkv=a.n_kv_head, D=a.head_dim, rope=a.rope,
                K=_f32(cache.k[i][0]), V=_f32(cache.v[i][0])))  # (Hkv, max_len, Dh): views of an fp32 cache

    # -- the pieces, each a function of one row (numpy) -----------------------------------------------------------
    @staticmethod
    def _norm(norm):
        w = _f32(norm.weight)
        b = _f32(norm.bias) if norm.bias is not None else None
        eps = norm.eps
        if norm.kind == "rmsnorm":
            return lambda x: x * (w / math.sqrt(float(x @ x) / x.size + eps))
        def layer_norm(x):
            x = x - x.mean()
            y = x * (w / math.sqrt(float(x @ x) / x.size + eps))  # biased variance, as LayerNorm defines it
            return y + b if b is not None else y
        return layer_norm

    def _linear_of(self, weight, biases, owner):
        """x (K,) @ weight (N, K)^T + bias: numpy's sgemv on an fp32 weight (a transposed view of an (in, out)-
        contiguous tensor or not), oneDNN's bf16 GEMV on a prepacked copy of a bf16 one (owner: the Parameter) or,
        where oneDNN has no bf16, aten's on the weight itself."""
        b = None if biases[0] is None else torch.cat([t.detach() for t in biases])  # (N,)
        if weight.dtype == torch.bfloat16 and not ops.onednn_bf16():  # aten's bf16 GEMV (fp32 accumulation)
            w = weight.detach()
            return lambda x: F.linear(torch.from_numpy(x)[None].bfloat16(), w, b)[0].float().numpy()
        if weight.dtype == torch.bfloat16:
            packed, linear = _onednn_weight(weight, owner), torch.ops.mkldnn._linear_pointwise
            return lambda x: linear(torch.from_numpy(x)[None].bfloat16(), packed, b, "none", [], "")[0].float().numpy()
        if not self.sgemv:
            w = weight.detach()
            return lambda x: F.linear(torch.from_numpy(x), w, b).numpy()
        wt = weight.detach().T.numpy()  # (K, N)
        b = b.numpy() if b is not None else None
        return (lambda x: x @ wt) if b is None else (lambda x: x @ wt + b)

    def _linear(self, m):
        if type(m) is Linear:
            return self._linear_of(m.weight, [m.bias], m.weight)
        if type(m) is LowRankLinear:  # b(a(x))
            a, b = self._linear(m.a), self._linear(m.b)
            return lambda x: b(a(x))
        f = _quantized_row(m)
        if f is not None:
            return f
        dtype = self.dtype  # any other linear: its own forward on a torch view, (K,) -> (1, K) -> (K,)
        return lambda x: m(torch.from_numpy(x)[None].to(dtype)).float().numpy()[0]

    @staticmethod
    def _concat(fs):
        return lambda x: np.concatenate([f(x) for f in fs])

    # -- the step ----------------------------------------------------------------------------------------------------
    def __call__(self, token: int) -> torch.Tensor:
        """The logits (1, V) after appending `token` at position cache.length."""
        cache, cfg = self.cache, self.cfg
        pos = cache.length
        if pos >= cache.max_len or pos >= cfg.max_seq_len:
            raise ValueError(f"position {pos} is beyond the cache ({cache.max_len}) or max_seq_len={cfg.max_seq_len}")
        x, cos, sin = self.wte[token].to(torch.float32, copy=True).numpy(), None, None  # (C,): a copy, x += below
        if self.wpe is not None:
            x += self.wpe[pos]
        elif self.pe is not None:
            x = x * math.sqrt(cfg.d_model) + self.pe[pos]
        else:
            cos, sin = self.cos[pos], self.sin[pos]  # (Dh/2,)
        for L in self.layers:
            x = self._sublayer(x, L, L["norm1"], lambda h: self._attention(h, L, pos, cos, sin))
            x = self._sublayer(x, L, L["norm2"], lambda h: self._feed_forward(h, L))
        if self.final_norm is not None:
            x = self.final_norm(x)
        cache.length += 1
        return torch.from_numpy(self.head(x))[None]  # (C,) -> (1, V)

    @staticmethod
    def _sublayer(x, L, norm, f):
        return x + f(norm(x)) if L["pre"] else norm(x + f(x))

    @staticmethod
    def _attention(h, L, pos, cos, sin):
        H, Hkv, D = L["H"], L["Hkv"], L["D"]
        qkv = L["qkv"](h)  # (H*Dh + 2*Hkv*Dh,)
        qk = qkv[:(H + Hkv) * D].reshape(H + Hkv, D)  # q heads then k heads: rotated together
        if L["rope"]:
            x1, x2 = qk[:, :D // 2], qk[:, D // 2:]  # (H+Hkv, Dh/2) each
            qk = np.concatenate((x1 * cos - x2 * sin, x2 * cos + x1 * sin), axis=1)  # (H+Hkv, Dh)
        K, V = L["K"], L["V"]  # (Hkv, max_len, Dh)
        K[:, pos] = qk[H:]
        V[:, pos] = qkv[(H + Hkv) * D:].reshape(Hkv, D)  # (Hkv*Dh,) -> (Hkv, Dh)
        q = qk[:H].reshape(Hkv, H // Hkv, D)  # (Hkv, G, Dh): the G query heads that share each k/v head
        s = q @ K[:, :pos + 1].transpose(0, 2, 1)  # (Hkv, G, Dh) @ (Hkv, Dh, S) -> (Hkv, G, S)
        s *= D ** -0.5
        s -= s.max(-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(-1, keepdims=True)
        y = s @ V[:, :pos + 1]  # (Hkv, G, S) @ (Hkv, S, Dh) -> (Hkv, G, Dh)
        return L["wo"](y.reshape(H * D))  # heads concatenated in q's order -> (C,)

    @staticmethod
    def _feed_forward(h, L):
        a = L["up"](h)  # (F,), or (2F,) = gate then up for SwiGLU
        act = L["act"]
        if act == "swiglu":
            gate, up = a[:a.size // 2], a[a.size // 2:]  # views (np.split costs ~9 us a call, 0.6 ms a token)
            a = gate * (0.5 + 0.5 * np.tanh(0.5 * gate)) * up  # silu(gate) * up; sigmoid via tanh: no overflow
        elif act == "relu":
            a = np.maximum(a, 0.0)
        else:  # numpy has no erf: torch's GELU on a view
            a = F.gelu(torch.from_numpy(a), approximate="tanh" if act == "gelu_tanh" else "none").numpy()
        return L["down"](a)


@torch.no_grad()
def generate_seq2seq(model, input_ids, max_new_tokens: int, temperature: float = 1.0, top_k=None, top_p=None,
                     eos_token_id=None, attention_mask=None, generator=None):
    """Encoder-decoder sampling/greedy: returns the decoder sequence (B, 1 + n), starting with
    config.decoder_start_token_id."""
    _check_args(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id)
    max_new_tokens = min(max_new_tokens, model.config.max_seq_len - 1)
    was_training = model.training
    model.eval()
    B = input_ids.shape[0]
    memory = model.encode(input_ids, attention_mask)  # (B, S, C)
    cache = model.new_cache(B, max_new_tokens + 1)
    tok = input_ids.new_full((B, 1), model.config.decoder_start_token_id)
    out = [tok]
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        logits = model.decode(tok, memory, attention_mask, cache)[:, -1]  # (B, V)
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            nxt = nxt.masked_fill(done, eos_token_id)
            done |= nxt == eos_token_id
        tok = nxt[:, None]
        out.append(tok)
        if bool(done.all()):
            break
    model.train(was_training)
    return torch.cat(out, dim=1)


@torch.no_grad()
def beam_search(model, input_ids, max_new_tokens: int, num_beams: int, eos_token_id: Optional[int] = None,
                attention_mask=None, length_penalty: float = 1.0):
    """Encoder-decoder beam search. Each beam's score is its summed log-probability; a finished beam (it emitted EOS)
    keeps its score and stays finished. The best beam maximises score / length ** length_penalty (GNMT-style
    normalisation by the number of generated tokens). Returns (B, 1 + n), EOS-padded after a beam ends."""
    _check_args(model, input_ids, max_new_tokens, 1.0, None, None, eos_token_id)
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be a positive int, got {num_beams!r}")
    max_new_tokens = min(max_new_tokens, model.config.max_seq_len - 1)
    was_training = model.training
    model.eval()
    B, K, V = input_ids.shape[0], num_beams, model.config.vocab_size
    dev = input_ids.device
    memory = model.encode(input_ids, attention_mask)  # (B, S, C)
    memory = memory.repeat_interleave(K, dim=0)  # (B*K, S, C)
    mask = attention_mask.repeat_interleave(K, dim=0) if attention_mask is not None else None  # (B*K, S)
    cache = model.new_cache(B * K, max_new_tokens + 1)
    seqs = input_ids.new_full((B * K, 1), model.config.decoder_start_token_id)  # (B*K, 1)
    scores = torch.full((B, K), float("-inf"), device=dev)
    scores[:, 0] = 0.0  # all beams start identical: only the first may expand at step one
    lengths = torch.zeros(B, K, device=dev)
    done = torch.zeros(B, K, dtype=torch.bool, device=dev)
    for _ in range(max_new_tokens):
        logp = model.decode(seqs[:, -1:], memory, mask, cache)[:, -1].float().log_softmax(-1)  # (B*K, V)
        logp = logp.view(B, K, V)
        if eos_token_id is not None:  # finished beams may only "emit" EOS again, at no cost
            finished = torch.full_like(logp, float("-inf"))
            finished[..., eos_token_id] = 0.0
            logp = torch.where(done[..., None], finished, logp)
        cand = (scores[..., None] + logp).view(B, K * V)  # (B, K*V)
        scores, flat = cand.topk(K, dim=-1)  # (B, K)
        beam, tok = flat // V, flat % V  # (B, K) each
        rows = (beam + torch.arange(B, device=dev)[:, None] * K).view(-1)  # (B*K,): source row of each new beam
        cache.reorder(rows)
        seqs = torch.cat((seqs[rows], tok.view(-1, 1)), dim=1)
        prev_done = done.gather(1, beam)
        lengths = lengths.gather(1, beam) + (~prev_done).float()
        done = prev_done | (tok == eos_token_id) if eos_token_id is not None else prev_done
        if bool(done.all()):
            break
    best = (scores / lengths.clamp(min=1) ** length_penalty).argmax(-1)  # (B,)
    model.train(was_training)
    return seqs.view(B, K, -1)[torch.arange(B, device=dev), best]  # (B, 1 + n)


def apply_chat_template(model, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Render `messages` ([{"role": "user", "content": "..."}, ...]) with the model's Jinja chat template, the way
    Hugging Face tokenizers do (sandboxed Jinja, trim_blocks + lstrip_blocks, bos/eos token strings defined)."""
    if not getattr(model, "chat_template", None):
        raise ValueError("this model has no chat template")
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    tok = model.tokenizer
    special = {f"{k}_token": tok.id_to_token(i) if tok is not None and i is not None else ""
               for k, i in (("bos", model.bos_token_id), ("eos", model.eos_token_id))}
    return env.from_string(model.chat_template).render(messages=messages,
                                                       add_generation_prompt=add_generation_prompt, **special)
