"""torch's own fast kernels for the ops, where the Triton kernels do not run (CPU tensors without the interpreter,
machines without triton): the same contracts as the public ops, computed by torch.

- `sdpa_attention`: attention on F.scaled_dot_product_attention (a flash kernel on CPU for fp32/bf16/fp16, GQA
  without repeating k/v); differentiable, and the torch path on CUDA too.
- `int8_matmul_cpu` / `int8_matmul_int32_cpu`: W8A8 on torch._int_mm (exact int32 accumulation, VNNI).
- `int8_weight_only_matmul_cpu`: torch's packed int8 kernel (`_weight_int8pack_mm`, bf16 activations), or the weight
  converted to bf16 and torch's bf16 matmul for many rows.
- `Int4PackedCPU` / `prepack_int4_cpu` / `int4_matmul_cpu`: torch's packed int4 kernel (`_weight_int4pack_mm_for_cpu`,
  bf16 activations) on a weight repacked once into torch's layout.
- `linear_bf16`: a bf16 product outside autograd on oneDNN's blocked layout of the weight.
- `rms_norm_train` / `swiglu_train`: RMSNorm and SwiGLU for training, differentiable, keeping for the backward only
  what it needs (x and 1 / rms; gate and up), where autograd through the eager ops keeps one more activation each.

Every weight a kernel needs in another layout is laid out once (`prepared`) and kept while the weight lives and
stays unchanged: `model.to(dtype)`, `load_state_dict` or an optimizer step lay it out afresh. The `*_unchecked`
forms skip the argument checks for callers whose tensors are known good (tinyformer's quantized linears, through
tinyformer.ops): at a decode step the checks cost more than the product.

The packed kernels compute in bf16 (x, scales and output rounded to bf16) and are far slower with fp32 or fp16
activations than with bf16, so those are cast to bf16 and the result back. Where a torch kernel does not apply (shapes
it refuses or crashes on), the reference runs. Each guard below names what it prevents.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Optional

import torch

from . import device
from .reference import attention_mask, check_attention_args, check_int4_matmul_args, check_int8_matmul_args
from .reference import check_int8_weight_only_args, check_out_dtype, document_mask, _need, unpack_int4
from .reference import int4_matmul as int4_matmul_reference
from .reference import int8_matmul_int32 as int8_matmul_int32_reference
from .reference import int8_weight_only_matmul as int8_weight_only_matmul_reference


# ======================================================================================================================
# attention
# ======================================================================================================================
def sdpa_attention(q, k, v, causal: bool = False, scale: Optional[float] = None, key_padding_mask=None,
                   dropout_p: float = 0.0, cu_seqlens=None):
    """The contract of `tinyformer.kernels.attention`, on torch's fused F.scaled_dot_product_attention (flash kernel
    on CPU for fp32/bf16/fp16, GQA without repeating k/v). The fast path where Triton does not run; differentiable.
    cu_seqlens (packed documents): one call with the block-diagonal mask (`document_mask`): forward + backward at
    B=4, T=512, H=9, D=64 with 4 or 16 documents a row on 2 CPU threads it took 100-234 ms against 195-538 ms for a
    call per document (faster in 7 of the 8 fp32/bf16, causal/full cases), and it needs no host copy of cu_seqlens."""
    B, Hq, Hkv, Tq, Tk, D = check_attention_args(q, k, v, key_padding_mask, kernel=False, cu_seqlens=cu_seqlens)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if cu_seqlens is not None:  # every token sees itself: no row is empty
        return sdpa(q, k, v, attn_mask=document_mask(cu_seqlens, B, Tq, causal), scale=scale, dropout_p=dropout_p,
                    enable_gqa=Hq != Hkv)
    if key_padding_mask is None and (not causal or Tq == Tk or Tq == 1):  # no explicit mask: the flash path
        # (a single bottom-right-aligned query row sees every key: a decode step needs no mask)
        causal = True if causal and Tq == Tk else False  # a plain bool: under torch.compile `Tq == Tk` is symbolic
        return sdpa(q, k, v, is_causal=causal, scale=scale, dropout_p=dropout_p, enable_gqa=Hq != Hkv)
    mask = attention_mask(Tq, Tk, causal, key_padding_mask, q.device)  # (B or 1, 1, Tq, Tk)
    seen = mask.any(-1, keepdim=True)  # (B or 1, 1, Tq, 1): rows that see at least one key
    # a row that sees nothing would be NaN (and poison gradients); let it see everything, then zero it
    out = sdpa(q, k, v, attn_mask=mask | ~seen, scale=scale, dropout_p=dropout_p, enable_gqa=Hq != Hkv)
    return out.masked_fill(~seen, 0.0)


# ======================================================================================================================
# training: the norm and the gated activation, keeping less for the backward
# ======================================================================================================================
# Autograd through the eager ops keeps, per RMSNorm, x and the normalized x in fp32 (the latter for the weight's
# gradient), and per SwiGLU gate, up and silu(gate): activations as wide as the model's, one per norm and per feed-
# forward, that full fine-tuning holds at its peak. These keep x and rstd (M,), gate and up, and recompute the rest in
# the backward (a few elementwise passes).
class _RMSNormTrain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1) fp32
        ctx.save_for_backward(x, weight, rstd)
        return (xf * rstd).to(x.dtype) * weight  # the rounding of `reference.rms_norm`

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float() * rstd  # (..., D)
        dyw = dy.float() * weight.float()
        dx = rstd * (dyw - xhat * (dyw * xhat).mean(-1, keepdim=True))
        dw = (dy * xhat.to(x.dtype)).reshape(-1, x.shape[-1]).float().sum(0) if ctx.needs_input_grad[1] else None
        return dx.to(x.dtype), None if dw is None else dw.to(weight.dtype), None


def rms_norm_train(x, weight, eps: float = 1e-6):
    """`reference.rms_norm` for training: the same forward, bit for bit, differentiable in x and weight, keeping x and
    rstd for the backward: dx = rstd * (dy w - xhat * mean(dy w * xhat)), dw = sum over rows of dy * n (n = xhat in
    x's dtype), as the fused kernel's."""
    return _RMSNormTrain.apply(x, weight, float(eps))


class _SwiGLUTrain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return torch.nn.functional.silu(gate) * up

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        d_gate = torch.ops.aten.silu_backward(dy * up, gate)  # the ops autograd runs for the eager form, bit for bit
        return d_gate, dy * torch.nn.functional.silu(gate)


def swiglu_train(gate, up):
    """`reference.swiglu` (silu(gate) * up) for training: the same forward and the same gradients as autograd through
    it, bit for bit, keeping gate and up for the backward and recomputing silu(gate)."""
    return _SwiGLUTrain.apply(gate, up)


# ======================================================================================================================
# prepared weight layouts
# ======================================================================================================================
# Each weight is laid out once for the kernel that multiplies by it (oneDNN's blocked bf16, torch's int4 pack, an
# aligned int8 copy, a transposed int8 copy), and the layout is kept while the weight lives and stays unchanged.
_layouts: dict = {}  # ids of the sources' storages -> (weak refs to those storages, stamp, layout)


def _stamp(t: torch.Tensor) -> tuple:
    return t.data_ptr(), t._version, t.dtype, tuple(t.shape), t.stride()


_frozen: dict | None = None  # within `frozen_layouts`: ids of the sources -> layout


@contextlib.contextmanager
def frozen_layouts():
    """Within, the weights stay as they are (a decode loop: no optimizer, no load), so `prepared` finds a layout it
    has checked once by the identity of its sources alone; at a decode step the check costs as much as a product."""
    global _frozen
    outer, _frozen = _frozen, _frozen if _frozen is not None else {}
    try:
        yield
    finally:
        _frozen = outer


def prepared(sources: tuple, make, tag: str = ""):
    """The layout `make()` builds from the tensors `sources`, built on first use and kept while they live unchanged.
    `tag` names the layout, so one weight can have several (int4: the one-row kernel's and the prefill kernel's).
    Keyed by the tag and the sources' storages (a Parameter keeps its identity across `.to()` and `.data =`; its
    storage does not, and a freed storage's address is soon reused), checked by their in-place version, shape and
    strides; an entry goes when the first source's storage does, and holds no reference to the sources. Compiled
    with frozen weights (`folding`), `make` becomes part of the graph, which Inductor computes once, at compile
    time."""
    if folding():
        return make()
    if _frozen is not None:
        ids = (tag, *map(id, sources))
        hit = _frozen.get(ids)
        if hit is None:
            hit = _frozen[ids] = (sources, _prepared(sources, make, tag))  # holding the sources keeps their ids theirs
        return hit[1]
    return _prepared(sources, make, tag)


def _prepared(sources: tuple, make, tag: str):
    storages = [t.untyped_storage() for t in sources]
    key = (tag, *(id(st) for st in storages))
    stamp = tuple(_stamp(t) for t in sources)
    hit = _layouts.get(key)
    if hit is not None and hit[1] == stamp and all(r() is st for r, st in zip(hit[0], storages)):
        return hit[2]
    with torch.inference_mode(False), torch.no_grad():  # a plain tensor, usable outside inference mode too
        value = make()
    table = _layouts  # bound now: at interpreter exit the global may be gone before the callback runs
    refs = tuple(weakref.ref(st, (lambda _, k=key, d=table: d.pop(k, None)) if i == 0 else None)
                 for i, st in enumerate(storages))
    _layouts[key] = (refs, stamp, value)
    return value


def folding() -> bool:
    """Tracing for Inductor with frozen weights (`torch._inductor.config.freezing`, as `tinyformer.generate.compiled`
    compiles): the weights are constants, so Inductor folds what the graph computes from them alone into constants."""
    if not torch.compiler.is_compiling():
        return False
    from torch._inductor import config  # only when compiling: Inductor is imported by then
    return bool(config.freezing)


def _opaque() -> bool:
    """Compiling without frozen weights: the packed products run as single ops on the module's own tensors (the
    custom ops below, which run `_int8_rows` / `_int4_rows` eagerly), multiplying through the layout `prepared` keeps
    beside the weights, which a graph cannot hold."""
    return torch.compiler.is_compiling() and not folding()


def _finish(out, bias, dtype):
    """A packed kernel's bf16 output (M, N), plus the bias in fp32, in the activations' dtype."""
    return (out.float() + bias.float()).to(dtype) if bias is not None else out.to(dtype)


_OPS = {name: hasattr(torch.ops.aten, name) for name in ("_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu")}
_OPS["_int_mm"] = hasattr(torch, "_int_mm")  # which of torch's CPU kernels this torch build has, looked up once


def _have(op_name: str) -> bool:
    return _OPS[op_name]


# ======================================================================================================================
# float: oneDNN's blocked bf16
# ======================================================================================================================
def linear_bf16(x, weights: tuple, biases: tuple):
    """x (..., K) @ cat(weights)^T + cat(biases) -> (..., sum N) outside autograd, for bf16 activations and weights on
    a CPU whose oneDNN multiplies bf16, on the weights stacked once in oneDNN's blocked layout (F.linear reorders the
    plain layout on every call, at a fraction of the memory bandwidth); None where that does not apply (the caller
    runs F.linear)."""
    if not (x.dtype == torch.bfloat16 and all(w.dtype == torch.bfloat16 for w in weights) and device.onednn_bf16()):
        return None

    def make():
        w = torch.cat([w.detach() for w in weights])  # (sum N, K)
        b = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        return torch.ops.mkldnn._reorder_linear_weight(w, 1), b
    packed, b = prepared(tuple(weights) + tuple(t for t in biases if t is not None), make)
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, b, "none", [], "")  # (M, sum N)
    return out.view(*x.shape[:-1], out.shape[-1])


# ======================================================================================================================
# W8A8: torch._int_mm
# ======================================================================================================================
# torch._int_mm on CPU returns garbage in the first column for K = 1 with N > 1, and tiny K gains nothing from it:
# K < INT_MM_MIN_K takes the int64 reference. The int32 accumulator cannot overflow below INT_MM_MAX_K.
INT_MM_MIN_K = 16
INT_MM_MAX_K = 2 ** 31 // 2 ** 14
# Up to INT_MM_ROWWISE rows, torch._int_mm runs one row at a time on the (K, N) view of the (N, K) weight (its fast
# GEMV); from more rows on, a contiguous (K, N) copy, made once per weight (twice the int8 weight memory on CPU).
INT_MM_ROWWISE = 4


def int8_matmul_int32_cpu(a, b):
    """a @ b.T as int32 with torch._int_mm (exact); the int64 reference, narrowed, where it does not apply."""
    M, K = a.shape
    if not (_have("_int_mm") and INT_MM_MIN_K <= K < INT_MM_MAX_K and M > 0 and b.shape[0] > 0):
        return int8_matmul_int32_reference(a, b).to(torch.int32)
    if M <= INT_MM_ROWWISE:  # b (N, K) -> (K, N) column-major view: torch's fast GEMV, no copy of the weight
        return torch.cat([torch._int_mm(a[i:i + 1], b.T) for i in range(M)])  # (M, N)
    bt = prepared((b,), lambda: b.T.contiguous())  # (K, N) row-major, made once per weight
    return torch._int_mm(a, bt)


def int8_matmul_cpu(a, b, a_scale, b_scale, bias=None, out_dtype=torch.float32):
    """The W8A8 CPU fast path: torch._int_mm accumulation, then the reference's epilogue (same order of operations,
    so the result equals `reference.int8_matmul` bit for bit)."""
    check_int8_matmul_args(a, b, a_scale, b_scale, bias)
    check_out_dtype(out_dtype)
    acc = int8_matmul_int32_cpu(a, b).to(torch.float32)  # (M, N)
    out = acc * a_scale[:, None] * b_scale[None, :]
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(out_dtype)


# ======================================================================================================================
# int8 weight-only: torch's packed int8 kernel
# ======================================================================================================================
# torch.ops.aten._weight_int8pack_mm with bf16 activations segfaults for K not a multiple of 16: only multiples of 32
# are sent to it.
INT8PACK_K_MULTIPLE = 32
# From this many rows on, the packed kernel (a GEMV at heart) is slower than the weight converted to bf16 (exact for
# int8 codes) and torch's bf16 matmul.
WO_DEQUANT_MIN_M = 128


def int8_weight_only_matmul_cpu(x, w, w_scale, bias=None):
    """The W8A16 CPU fast path: torch's `_weight_int8pack_mm` (AVX512-BF16) with bf16 activations and bf16 scales;
    from M = WO_DEQUANT_MIN_M rows on, the weight converted to bf16 and torch's bf16 matmul (fp32 on CPUs without
    oneDNN bf16, `device.onednn_bf16`). fp32/fp16 activations are cast to bf16 and the result back, so the result has
    bf16 accuracy (relative error ~2**-8). K not a multiple of INT8PACK_K_MULTIPLE takes the reference."""
    check_int8_weight_only_args(x, w, w_scale, bias)
    return int8_weight_only_unchecked(x, w, w_scale, bias)


def int8_weight_only_unchecked(x, w, w_scale, bias=None):
    """`int8_weight_only_matmul_cpu` for a caller whose tensors are valid already (a quantized linear's own buffers):
    at a decode step the argument checks cost more than the product."""
    M, K = x.shape
    if not (_have("_weight_int8pack_mm") and K % INT8PACK_K_MULTIPLE == 0 and M > 0 and w.shape[0] > 0):
        return int8_weight_only_matmul_reference(x, w, w_scale, bias)
    if M >= WO_DEQUANT_MIN_M:  # int8 -> bf16 is exact
        dtype = _gemm_dtype()
        return _finish((x.to(dtype) @ w.to(dtype).T).float() * w_scale.float(), bias, x.dtype)
    return _finish(_int8_rows(x, [w], [w_scale]), bias, x.dtype)


def _int8_rows(x, weights, scales):
    """torch's packed int8 kernel on the weights' prepared copy (M, sum N) bf16: stacked, contiguous, 64-byte aligned
    (the AVX-512 kernel segfaults on weights that are not), scales in bf16. Compiled without frozen weights, one
    opaque op (`_opaque`)."""
    if _opaque():
        return torch.ops.tinyformer.int8_rows(x, weights, scales)

    def make():
        w = torch.cat(weights) if len(weights) > 1 else weights[0].contiguous()  # (sum N, K)
        aligned = torch.compiler.is_compiling() or w.data_ptr() % 64 == 0  # Inductor's constants are aligned
        return w if aligned else w.clone(), torch.cat(scales).to(torch.bfloat16)
    w, s = prepared(tuple(weights) + tuple(scales), make)
    return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), w, s)  # (M, sum N) bf16


# ======================================================================================================================
# int4 weight-only: torch's packed int4 kernel, on a weight repacked once
# ======================================================================================================================
INT4PACK_GROUP_SIZES = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu accepts (it raises on others)
INT4PACK_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu raises "expect N to be dividable by 16" otherwise


def _stand_in(t: torch.Tensor) -> torch.Tensor:
    """A zero-memory tensor with t's shape, dtype and device (a broadcast view of one element): lets the validator
    check later calls against a weight without keeping the weight alive."""
    return torch.empty((1,) * t.dim(), dtype=t.dtype, device=t.device).expand(t.shape)


class Int4PackedCPU:
    """An int4 weight (API.md layout) repacked once for torch's CPU kernel; `.matmul(x, bias=None)` equals
    `int4_matmul(x, ...)` within bf16 rounding (the kernel computes in bf16: x, scales and zero' are rounded to
    bf16). `.fast` says whether torch's kernel applies; where it does not, `.matmul` runs the reference (and the
    object keeps the original tensors for it).

    Torch's rule is w = (q - 8) * scale + zero' with scale_and_zero (K / G, N, 2); ours is w = (q - zero) * scale,
    so zero' = (8 - zero) * scale. Memory: the packed copy is the size of w_packed (K / 2 bytes per row) plus
    4 bytes per group and row for the bf16 (scale, zero') pairs."""

    def __init__(self, w_packed, scales, zeros, group_size: int):
        N, K2 = w_packed.shape if isinstance(w_packed, torch.Tensor) and w_packed.dim() == 2 else (0, 0)
        dummy = torch.empty((0, 2 * K2), dtype=torch.float32,
                            device=w_packed.device if isinstance(w_packed, torch.Tensor) else "cpu")
        check_int4_matmul_args(dummy, w_packed, scales, zeros, group_size)  # ValueError/TypeError, before any work
        _need(w_packed.device.type == "cpu", lambda: f"w_packed must be a CPU tensor, got {w_packed.device}")
        self.N, self.K, self.group_size = N, 2 * K2, group_size
        self.fast = (_have("_weight_int4pack_mm_for_cpu") and group_size in INT4PACK_GROUP_SIZES
                     and N % INT4PACK_N_MULTIPLE == 0 and N > 0 and self.K > 0)
        if self.fast:
            self.packed, self.scale_and_zero = _int4pack(w_packed, scales, zeros)
            self._args = (_stand_in(w_packed), _stand_in(scales), _stand_in(zeros))  # shapes/dtypes for validation
        else:
            self._args = (w_packed, scales, zeros)  # the reference needs the real tensors

    def matmul(self, x, bias=None):
        """x (M, K) float @ w.T (+ bias), in x's dtype. Computed in bf16 on the fast path: fp32/fp16 activations
        are cast (into this op they are far slower than bf16)."""
        check_int4_matmul_args(x, *self._args, self.group_size, bias)
        if not self.fast or x.shape[0] == 0:
            return int4_matmul_reference(x, *self._args, self.group_size, bias)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16).contiguous(), self.packed,
                                                         self.group_size, self.scale_and_zero)  # (M, N) bf16
        if bias is not None:
            out = out.float() + bias.float()
        return out.to(x.dtype)

    __call__ = matmul


def _int4pack(w_packed, scales, zeros):
    """An int4 weight in torch's CPU layout: its codes repacked, and (K / G, N, 2) bf16 (scale, zero') pairs."""
    q = unpack_int4(w_packed).to(torch.int32)  # (N, K) codes 0..15
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)  # (N, K / 2) uint8, torch's order
    s = scales.to(torch.float32)
    zp = (8.0 - zeros.to(torch.float32)) * s  # (N, K / G): zero' so that (q - 8) * s + zero' = (q - zero) * s
    return packed, torch.stack((s, zp), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # (K / G, N, 2)


def prepack_int4_cpu(w_packed, scales, zeros, group_size: int) -> Int4PackedCPU:
    """Repack an int4 weight once for the CPU fast path; call `.matmul(x, bias=None)` on the result per step."""
    return Int4PackedCPU(w_packed, scales, zeros, group_size)


def _int4_layout(packed: list, scales: list, zeros: list):
    """The int4 weights `packed` (with their scales and zeros) stacked along N in torch's layout (`_int4pack`), made
    once (`prepared`)."""
    def make():
        return _int4pack(*(t[0] if len(t) == 1 else torch.cat(t) for t in (packed, scales, zeros)))  # (sum N, ...)
    return prepared(tuple(packed) + tuple(scales) + tuple(zeros), make, tag="int4_cpu")


def _int4pack_applies(w_packed, group_size) -> bool:
    return (_have("_weight_int4pack_mm_for_cpu") and group_size in INT4PACK_GROUP_SIZES
            and w_packed.shape[0] % INT4PACK_N_MULTIPLE == 0 and w_packed.shape[0] > 0 and w_packed.shape[1] > 0)


def int4_matmul_cpu(x, w_packed, scales, zeros, group_size, bias=None):
    """The CPU fast path of int4_matmul (torch's packed int4 kernel, bf16 accuracy), repacking each weight once."""
    check_int4_matmul_args(x, w_packed, scales, zeros, group_size, bias)
    return int4_matmul_unchecked(x, w_packed, scales, zeros, group_size, bias)


def int4_matmul_unchecked(x, w_packed, scales, zeros, group_size, bias=None):
    """`int4_matmul_cpu` for a caller whose tensors are valid already (a quantized linear's own buffers): at a decode
    step the argument checks cost more than the product. From WO_DEQUANT_MIN_M rows (a prompt, a training batch) the
    weight is dequantized and multiplied by the float GEMM instead: at 256 rows of 576 x 1536 that took 1.0 ms
    against torch's int4 kernel's 2.7 ms (at 16 rows, 3.1 against 0.2)."""
    if x.shape[0] >= WO_DEQUANT_MIN_M and not torch.compiler.is_compiling():  # (compiled: folded, a float copy)
        w = dequantized_int4(w_packed, scales, zeros, group_size, _gemm_dtype())  # (N, K)
        return _finish(x.to(w.dtype) @ w.T, bias, x.dtype)
    if not _int4pack_applies(w_packed, group_size) or x.shape[0] == 0:
        return int4_matmul_reference(x, w_packed, scales, zeros, group_size, bias)
    return _finish(_int4_rows(x, [w_packed], [scales], [zeros], group_size), bias, x.dtype)


def _gemm_dtype(like=None):
    """bf16 where oneDNN multiplies bf16 (AMX / AVX512-BF16) and `like` (when given) is bf16, else fp32 (aten's bf16
    matmul is a GEMV a row without oneDNN)."""
    bf16 = device.onednn_bf16() and (like is None or like.dtype == torch.bfloat16)
    return torch.bfloat16 if bf16 else torch.float32


def dequantized_int4(w_packed, scales, zeros, group_size: int, dtype=torch.float32):
    """The int4 weight (N, K) in `dtype`, (code - zero) * scale per group computed in `dtype` (the codes are exact in
    bf16; its scale rounds as in torch's int4 kernel), for products that dequantize at every call rather than keep a
    float copy (QLoRA's base). The codes are written straight into the output and scaled in place: three passes over
    the weight rather than six, since at QLoRA's shapes the dequantization costs as much as the GEMM after it."""
    N = w_packed.shape[0]
    w = torch.empty((N, w_packed.shape[1], 2), dtype=dtype, device=w_packed.device)  # (N, K/2, 2): codes 2j, 2j + 1
    w[..., 0] = w_packed & 0xF
    w[..., 1] = w_packed >> 4
    g = w.view(N, -1, group_size)  # (N, K/G, G)
    g.sub_(zeros.to(dtype)[..., None]).mul_(scales.to(dtype)[..., None])
    return w.view(N, -1)  # (N, K)


def int4_input_grad(dy, w_packed, scales, zeros, group_size: int):
    """dx = dy (M, N) @ dequant(w) (N, K) for a frozen int4 weight (QLoRA), the float GEMM in bf16 where oneDNN has
    it and dy is bf16, else fp32; in dy's dtype."""
    dtype = _gemm_dtype(like=dy)
    return (dy.to(dtype) @ dequantized_int4(w_packed, scales, zeros, group_size, dtype)).to(dy.dtype)


def int8_input_grad(dy, w, w_scale):
    """dx = dy (M, N) @ (w * scale) (N, K) for a frozen int8 weight, as `int4_input_grad`."""
    dtype = _gemm_dtype(like=dy)
    return (dy.to(dtype) @ (w.to(dtype) * w_scale.to(dtype)[:, None])).to(dy.dtype)


def _int4_rows(x, packed, scales, zeros, group_size: int):
    """torch's packed int4 kernel on the weights' prepared layout (M, sum N) bf16. Compiled without frozen weights,
    one opaque op (`_opaque`)."""
    if _opaque():
        return torch.ops.tinyformer.int4_rows(x, packed, scales, zeros, group_size)
    w, scale_and_zero = _int4_layout(packed, scales, zeros)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16).contiguous(), w, group_size,
                                                      scale_and_zero)  # (M, sum N) bf16


# ======================================================================================================================
# stacked products: several weights that multiply one input, as one product
# ======================================================================================================================
# At a decode step a product is a GEMV, and each kernel call costs a fixed overhead besides streaming its weight: the
# projections that read one input (q/k/v, gate/up) run as one call over a stacked copy of their weights, laid out once
# (replacing the per-weight layouts for bf16 and int4; a second copy of the codes for int8).
def stacked_int8_weight_only(x, weights: tuple, scales: tuple, biases: tuple):
    """x (M, K) @ cat(int8 weights * scales)^T (+ biases) in x's dtype on torch's packed int8 kernel; None where it
    does not apply (K not a multiple of INT8PACK_K_MULTIPLE, too many rows)."""
    if (x.shape[0] >= WO_DEQUANT_MIN_M or x.shape[1] % INT8PACK_K_MULTIPLE or x.shape[0] == 0
            or not _have("_weight_int8pack_mm")):
        return None
    return _finish(_int8_rows(x, list(weights), list(scales)), _stacked_bias(biases, weights), x.dtype)


def stacked_int4(x, packed: tuple, scales: tuple, zeros: tuple, group_size: int, biases: tuple):
    """x (M, K) @ cat(dequant(int4 weights))^T (+ biases) in x's dtype on torch's packed int4 kernel; None where it
    does not apply."""
    if x.shape[0] == 0 or not all(_int4pack_applies(w, group_size) for w in packed):
        return None
    out = _int4_rows(x, list(packed), list(scales), list(zeros), group_size)
    return _finish(out, _stacked_bias(biases, packed), x.dtype)


def _stacked_bias(biases: tuple, weights: tuple):
    """The biases concatenated along N, zeros for a weight without one; None when none has one."""
    if all(b is None for b in biases):
        return None
    return torch.cat([b.float() if b is not None else torch.zeros(w.shape[0]) for b, w in zip(biases, weights)])


# ======================================================================================================================
# the packed products as single ops for torch.compile
# ======================================================================================================================
# For graphs compiled without frozen weights (`_opaque`).
@torch.library.custom_op("tinyformer::int8_rows", mutates_args=())
def _int8_rows_op(x: torch.Tensor, weights: list[torch.Tensor], scales: list[torch.Tensor]) -> torch.Tensor:
    return _int8_rows(x, weights, scales)


@_int8_rows_op.register_fake
def _(x, weights, scales):
    return x.new_empty(x.shape[0], sum(w.shape[0] for w in weights), dtype=torch.bfloat16)


@torch.library.custom_op("tinyformer::int4_rows", mutates_args=())
def _int4_rows_op(x: torch.Tensor, packed: list[torch.Tensor], scales: list[torch.Tensor],
                  zeros: list[torch.Tensor], group_size: int) -> torch.Tensor:
    return _int4_rows(x, packed, scales, zeros, group_size)


@_int4_rows_op.register_fake
def _(x, packed, scales, zeros, group_size):
    return x.new_empty(x.shape[0], sum(w.shape[0] for w in packed), dtype=torch.bfloat16)
