"""Autoregressive generation with a KV cache: greedy, temperature, top-k and nucleus (top-p) sampling, EOS stops,
left-padded batches; beam search for the encoder-decoder.

References: Holtzman et al. 2019, "The Curious Case of Neural Text Degeneration" (top-p); Fan et al. 2018 (top-k);
Wu et al. 2016, GNMT (beam search with length normalisation); nanoGPT's `generate` (sliding context window once the
sequence is longer than the model's context).
"""
from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyformer import ops
from tinyformer.kernels import cpu
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
             on_token=None, compile: bool = False):
    """Decoder-only generation: returns prompt + new tokens (B, T + n). With a left-padded batch pass
    `attention_mask` (B, T), 1 = real token. Rows that hit EOS are filled with EOS until every row is done.
    `on_token(ids (B,))` is called with each new token as it is chosen (for streaming).
    Past the model's context (max_seq_len), the model sees the last max_seq_len tokens, as nanoGPT does.
    compile: a batch-1 bf16 or int8/int4 model on CPU decodes through torch.compile'd steps (`CompiledDecodeStep`:
    faster, after a one-off compile of seconds); elsewhere (fp32, batches, GPUs) it changes nothing."""
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
    if fast and compile and compiles(model):
        numpy_step = CompiledDecodeStep(numpy_step, model)
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


def _quantized_row(m):
    """x (K,) -> (N,) for an `Int4Linear` / `Int8Linear` straight on torch's CPU kernel (the one its forward reaches
    through ops -> kernels, with the same bf16 rounding and bias), or None where that kernel does not apply. The
    forward's argument checks and dispatch cost 45-65 us a call, 3-5x the kernel's own time on SmolLM2's shapes."""
    return _row(_kernel_weights([m]), [m]) if type(m) in (Int4Linear, Int8Linear) else None


def _fused_row(mods):
    """x (K,) -> (sum of N,) for Int8Linears or Int4Linears that read the same input (q/k/v; gate/up), in one kernel
    call over their stacked weights (`_kernel_weights`); None where that does not apply."""
    return _row(_kernel_weights(mods), mods) if len(mods) > 1 else None


_FUSED = cpu.WeightCache()  # the stacked (int4: and repacked) weights of `_kernel_weights`, per modules' codes


def _kernel_weights(mods):
    """What torch's CPU kernel multiplies by for the Int8Linears or Int4Linears `mods` that read one input, stacked
    along N when there are several (cached while the modules' tensors live and stay unchanged, so a step calls the
    kernel once instead of once each): ("int8", codes (N, K), scales (N,) bf16) or ("int4", packed, group size,
    scale_and_zero, K, K padded to whole groups). None where the modules are not all Int8Linear or all Int4Linear,
    differ in input or group size, or the kernel does not apply.
    Stacking, SmolLM2-135M int4 g32 on a 2-core AVX2 EPYC: 210 -> 120 kernel calls a token, the block products 20.1
    -> 13.3 ms a token (the kernel dequantizes ~10 G weights/s there: ~11 ms of it); the baby Shakespeare model in
    int8 (a kernel call costs ~20 us there, its own work a few): 24 -> 16 calls a token. Memory: a second copy of
    the stacked weights."""
    m0, kind = mods[0], type(mods[0])
    if kind not in (Int8Linear, Int4Linear) or any(type(m) is not kind for m in mods):
        return None
    if kind is Int8Linear:
        if any(m.n_in != m0.n_in for m in mods):
            return None
        w, scale = ((m0.weight, m0.scale) if len(mods) == 1 else _FUSED.get(
            tuple(t for m in mods for t in (m.weight, m.scale)), None,
            lambda: (torch.cat([m.weight for m in mods]), torch.cat([m.scale for m in mods]))))  # (sum N, K), (sum N,)
        if (not cpu._have("_weight_int8pack_mm") or w.shape[1] % cpu.INT8PACK_K_MULTIPLE
                or not w.is_contiguous() or w.data_ptr() % 64):  # the cases int8_weight_only_matmul_cpu avoids
            return None
        return "int8", w, scale.to(torch.bfloat16)
    if any((m.n_in, m.k_pad, m.group_size) != (m0.n_in, m0.k_pad, m0.group_size) for m in mods):
        return None
    p = (cpu._prepacked(m0.weight_packed, m0.scales, m0.zeros, m0.group_size) if len(mods) == 1 else _FUSED.get(
        tuple(t for m in mods for t in (m.weight_packed, m.scales, m.zeros)), m0.group_size,
        lambda: cpu.Int4PackedCPU(*(torch.cat([getattr(m, n) for m in mods])  # (sum N, ...)
                                    for n in ("weight_packed", "scales", "zeros")), m0.group_size)))
    return ("int4", p.packed, p.group_size, p.scale_and_zero, m0.n_in, p.K) if p.fast else None  # p.K = m0.k_pad


def _row(kw, mods):
    """x (K,) float32 numpy -> (sum of N,) float32 numpy on torch's kernel over `kw` (`_kernel_weights`), the
    modules' biases added; None for kw None. The input goes to the kernel as a (1, K) bf16 row kept for every call
    (16 us a call on a 384x128 int8 weight, against 24 us converting a new tensor each time), zero-padded to whole
    groups for int4 (as Int4Linear.matmul)."""
    if kw is None:
        return None
    if kw[0] == "int8":
        _, w, scale = kw
        k, kernel = w.shape[1], lambda xb: torch.ops.aten._weight_int8pack_mm(xb, w, scale)
    else:
        _, packed, G, sz, n, k = kw
        kernel = lambda xb: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, G, sz)  # noqa: E731
    xb = torch.zeros(1, k, dtype=torch.bfloat16)
    row = xb[0, :mods[0].n_in]  # the padding past n_in stays zero

    def f(x):
        row.copy_(torch.from_numpy(x))
        return kernel(xb).float().numpy()[0]
    b = _biases(mods)
    if b is None:
        return f
    b = b.numpy()  # once, not per call (the numpy step's hot path)
    return lambda x: f(x) + b


def _biases(mods):
    """The modules' biases concatenated along N as fp32 (zeros for a module without one), or None if none has one."""
    if all(m.bias is None for m in mods):
        return None
    n_out = [m.weight.shape[0] if type(m) is Linear else m.n_out for m in mods]
    return torch.cat([m.bias.detach().float() if m.bias is not None else torch.zeros(n)
                      for m, n in zip(mods, n_out)])  # (sum N,)


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
    def embed(self, token: int):
        """x (C,) of `token` at position cache.length (its own copy), and the rotary cos, sin (Dh/2,) there or None."""
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
        return x, cos, sin

    def __call__(self, token: int) -> torch.Tensor:
        """The logits (1, V) after appending `token` at position cache.length."""
        cache, pos = self.cache, self.cache.length
        x, cos, sin = self.embed(token)
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


def compiles(model) -> bool:
    """Whether `CompiledDecodeStep` serves this model: `NumpyDecodeStep` does, no linear is factored, and either its
    weights are bf16 or it has Int8/Int4 linears, each one torch's kernel takes (`_kernel_weights`)."""
    if not numpy_decodes(model) or any(type(m) is LowRankLinear for m in model.modules()):
        return False
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not quantized:
        return next(model.parameters()).dtype == torch.bfloat16
    return all(_kernel_weights([m]) is not None for m in quantized)


class CompiledDecodeStep:
    """`NumpyDecodeStep`'s step for a batch-1 bf16 or int8/int4 model (`compiles`) as two torch.compile'd functions:
    a group of 1-3 blocks (called once per group: every block has the same shapes, so it compiles once) and the
    final norm + head.

    Why: on a CPU without oneDNN bf16 (AVX2), aten's bf16 GEMV streams SmolLM2's weights at 9-17 GB/s. Written as
    `(w.float() * x).sum(-1)`, a product becomes one vectorized C++ loop (Inductor) that widens each bf16 row to fp32
    as it streams it and accumulates in fp32: 23-26 GB/s on the same matrices, 2-core AVX2 EPYC. Inductor also fuses
    the rest of a block (norms, rotary, the cache write, attention, SwiGLU, residuals) into one C++ function, so three
    layers cost one compiled call (~0.1 ms of overhead) where the numpy step makes ~40 calls a layer; Int8/Int4
    linears stay torch's kernels (`_kernel_weights`), called from the compiled code. SmolLM2-135M there, against
    the numpy step in the same run: bf16 41 -> 54-56 tokens/s, int4 49 -> 57, int8 43 -> 48. The first step
    compiles (~17 s cold on 2 cores; 1-7 s once Inductor's on-disk cache holds the block), hence opt-in:
    `generate(..., compile=True)`, `tinyformer sample --compile`.

    Math: as `NumpyDecodeStep` (fp32 residual stream, norms, rotary and attention; fp32 accumulation), except that an
    activation is not rounded to bf16 going into a bf16 product. It shares that step's fp32 KV cache, and where
    Inductor cannot compile (no C++ compiler, say) it warns and hands every step to it. Not measured on a CPU with
    oneDNN bf16 (AVX512-BF16), where the numpy step's prepacked oneDNN GEMV streamed 18-28 GB/s."""

    def __init__(self, numpy_step, model):
        self.numpy_step, self.cache, self.sgemv, self.failed = numpy_step, numpy_step.cache, False, False

        def lin(ms):  # the linears that read one input -> (their products (see _t_product), biases or None)
            if all(type(m) is Linear for m in ms):
                one = _one_buffer([m.weight for m in ms], rows=True) if len(ms) > 1 else None  # laid out by pack_
                parts = (("float", one),) if one is not None else tuple(("float", m.weight.detach()) for m in ms)
            else:  # Int8/Int4: one kernel call over the stacked weights where it applies
                kw = _kernel_weights(ms)
                parts = (kw,) if kw is not None else tuple(
                    ("float", m.weight.detach()) if type(m) is Linear else _kernel_weights([m]) for m in ms)
            return parts, _biases(ms)

        def norm(n):
            return None if n is None else (n.kind, n.weight.detach().float(),
                                           None if n.bias is None else n.bias.detach().float(), n.eps)
        self.layers = []
        for b, L in zip(model.decoder.blocks, numpy_step.layers):
            a, f = b.attn, b.mlp
            self.layers.append((dict(
                pre=b.pre, norm1=norm(b.norm1), norm2=norm(b.norm2), qkv=lin([a.wq, a.wk, a.wv]), wo=lin([a.wo]),
                up=lin([f.w1] if f.w3 is None else [f.w1, f.w3]), down=lin([f.w2]), act=f.act, H=a.n_head,
                Hkv=a.n_kv_head, D=a.head_dim, rope=a.rope),
                torch.from_numpy(L["K"]), torch.from_numpy(L["V"])))  # (Hkv, max_len, Dh): the numpy step's cache
        head = model.lm_head if model.lm_head is not None else model.wte
        self.head = (norm(model.decoder.final_norm),
                     lin([head]) if isinstance(head, nn.Module) else ((("float", head.detach()),), None))  # tied wte
        n = len(self.layers)  # blocks per compiled call: 3 took 14.0-14.9 ms where 1 took 15.5-16.5 (SmolLM2's 30)
        self.group = next(g for g in (3, 2, 1) if n % g == 0)
        self.marked = False  # the cached length is marked dynamic on the first call: one compile for every length

    def __call__(self, token: int) -> torch.Tensor:
        """The logits (1, V) after appending `token` at position cache.length."""
        if self.failed:
            return self.numpy_step(token)
        pos = self.cache.length
        x, cos, sin = (torch.from_numpy(a) if a is not None else None for a in self.numpy_step.embed(token))
        try:
            blocks, head = _compiled(_blocks_step), _compiled(_head_step)
            for i in range(0, len(self.layers), self.group):
                Ls, Ks, Vs = zip(*self.layers[i:i + self.group])
                Ks = [K[:, :pos + 1] for K in Ks]  # (Hkv, S, Dh): the cached prefix and this position
                Vs = [V[:, :pos + 1] for V in Vs]
                if not self.marked:
                    for t in Ks + Vs:
                        torch._dynamo.mark_dynamic(t, 1)
                x = blocks(x, Ls, Ks, Vs, cos, sin)
            self.marked = True
            logits = head(x, *self.head)  # (V,)
        except Exception as e:  # noqa: BLE001  Inductor needs a C++ compiler, among other things
            warnings.warn(f"generate(compile=True): torch.compile failed ({type(e).__name__}: {str(e)[:200]}); "
                          f"decoding on numpy instead", RuntimeWarning, stacklevel=2)
            self.failed = True
            return self.numpy_step(token)
        self.cache.length += 1
        return logits[None]  # (V,) -> (1, V)


_COMPILED: dict = {}  # function -> its torch.compile'd form, made on first use


def _compiled(fn):
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, fullgraph=True)
    return _COMPILED[fn]


# the compiled step's math, in torch on one position (batch 1): x (C,) fp32, weights as CompiledDecodeStep holds them
def _t_norm(x, norm):
    kind, w, b, eps = norm
    if kind == "rmsnorm":
        return x * torch.rsqrt((x * x).mean() + eps) * w
    return F.layer_norm(x, x.shape, w, b, eps)


def _t_linear(x, lin):
    """x (K,) through each product of `lin` (CompiledDecodeStep's), concatenated (sum N_i,), plus the biases."""
    parts, b = lin
    ys = [_t_product(x, p) for p in parts]
    y = torch.cat(ys) if len(ys) > 1 else ys[0]
    return y + b if b is not None else y


def _t_product(x, p):
    """x (K,) fp32 @ W^T -> (N,) fp32. ("float", W (N, K)): a GEMV written as a reduction, fp32 accumulation;
    ("int8", ...) / ("int4", ...) (`_kernel_weights`): torch's kernel on x rounded to bf16 (an extern call in the
    compiled code), as the numpy step and the modules' forward call it."""
    if p[0] == "float":
        return (p[1].float() * x).sum(-1)  # (N, K) * (K,) summed over K
    xb = x.to(torch.bfloat16)[None]  # (1, K)
    if p[0] == "int8":
        return torch.ops.aten._weight_int8pack_mm(xb, p[1], p[2])[0].float()
    _, packed, G, scale_and_zero, n, k = p
    xb = F.pad(xb, (0, k - n)) if k != n else xb  # (1, K padded to whole groups)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, G, scale_and_zero)[0].float()


def _t_attention(h, L, K, V, cos, sin):
    H, Hkv, D = L["H"], L["Hkv"], L["D"]
    qkv = _t_linear(h, L["qkv"])  # (H*Dh + 2*Hkv*Dh,)
    qk = qkv[:(H + Hkv) * D].view(H + Hkv, D)  # q heads then k heads: rotated together
    if L["rope"]:
        x1, x2 = qk[:, :D // 2], qk[:, D // 2:]  # (H+Hkv, Dh/2) each
        qk = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), 1)  # (H+Hkv, Dh)
    K[:, -1] = qk[H:]  # K, V (Hkv, S, Dh): this position is the last
    V[:, -1] = qkv[(H + Hkv) * D:].view(Hkv, D)  # (Hkv*Dh,) -> (Hkv, Dh)
    q = qk[:H].view(Hkv, H // Hkv, D)  # (Hkv, G, Dh): the G query heads that share each k/v head
    # products as sums (Inductor fuses them with the softmax; bmm would be two library calls of ~20 us each)
    p = torch.softmax((q[:, :, None] * K[:, None]).sum(-1) * D ** -0.5, -1)  # (Hkv, G, 1, Dh) * (Hkv, 1, S, Dh)
    y = (p[..., None] * V[:, None]).sum(2)  # (Hkv, G, S, 1) * (Hkv, 1, S, Dh) summed over S -> (Hkv, G, Dh)
    return _t_linear(y.reshape(H * D), L["wo"])  # (Hkv, G, Dh) -> (H*Dh,) -> (C,)


def _t_feed_forward(h, L):
    a = _t_linear(h, L["up"])  # (F,), or (2F,) = gate then up for SwiGLU
    if L["act"] == "swiglu":
        n = a.shape[0] // 2
        a = F.silu(a[:n]) * a[n:]
    elif L["act"] == "relu":
        a = F.relu(a)
    else:
        a = F.gelu(a, approximate="tanh" if L["act"] == "gelu_tanh" else "none")
    return _t_linear(a, L["down"])


def _block_step(x, L, K, V, cos, sin):
    """One block for one new position: x (C,) -> (C,); writes this position's k, v as K, V's last row."""
    def sublayer(x, norm, f):
        return x + f(_t_norm(x, norm)) if L["pre"] else _t_norm(x + f(x), norm)
    x = sublayer(x, L["norm1"], lambda h: _t_attention(h, L, K, V, cos, sin))
    return sublayer(x, L["norm2"], lambda h: _t_feed_forward(h, L))


def _blocks_step(x, Ls, Ks, Vs, cos, sin):
    """`_block_step` over consecutive blocks (one compiled call for a few: its ~0.1 ms of overhead paid once)."""
    for L, K, V in zip(Ls, Ks, Vs):
        x = _block_step(x, L, K, V, cos, sin)
    return x


def _head_step(x, norm, lin):
    """The final norm (if any) and the head: x (C,) -> logits (V,)."""
    return _t_linear(_t_norm(x, norm) if norm is not None else x, lin)


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
        cache.reorder(rows, cross=False)  # rows stay within their word's K beams, which share one memory
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
