"""Prepared weight layouts for inference on the CPU: each weight is laid out once for the kernel that multiplies by
it, and the layout is kept while the weight lives and stays unchanged. `tinyformer.ops` multiplies through these
whenever a CPU product runs without autograd (decoding, evaluation); training never reaches them.

- bf16 float weights (N, K): oneDNN's blocked layout (`torch.ops.mkldnn._reorder_linear_weight`), which its bf16
  GEMM reads as it is; F.linear reorders the plain layout on every call, at a fraction of the memory bandwidth.
- int8 codes (N, K) and scales (N,): contiguous 64-byte-aligned codes and bf16 scales for torch's
  `_weight_int8pack_mm` (its AVX-512 kernel segfaults on a weight that is not 64-byte aligned).
- int4 codes in the API layout (N, K/2) with scales and zeros (N, K/G): torch's int4pack layout and its bf16
  (scale, zero') pairs (`kernels.int4_mm.Int4PackedCPU`).

A layout is keyed by the weight's storage and checked against its shape, strides, dtype and in-place version on
every use, so `model.to(torch.bfloat16)`, a `load_state_dict` or an optimizer step prepares a fresh one; an entry
goes when its weight's storage does. Memory: one prepared copy per weight (for bf16 the size of the weight itself).

Each product here computes what the kernels' CPU paths compute (`tinyformer.kernels`), minus their per-call argument
checks, which ran once when the layout was prepared: at batch 1 those checks cost several times the product itself.
"""
from __future__ import annotations

import weakref

import torch

from tinyformer.kernels import int4_mm
from tinyformer.kernels.int8_mm import INT8PACK_K_MULTIPLE, onednn_bf16

MAX_ROWS = 16  # decode-sized products (a token, a few beams); larger ones take the kernels' own CPU paths

_layouts: dict = {}  # id(storage of the first source) -> (weak refs to the sources' storages, stamp, layout)


def _stamp(t: torch.Tensor) -> tuple:
    return t.data_ptr(), t._version, t.dtype, tuple(t.shape), t.stride()


def prepared(sources: tuple, make):
    """The layout `make()` builds from the tensors `sources`, built on first use and kept while they live unchanged.
    Keyed by their storages (a Parameter keeps its identity across `.to()` and `.data =`; its storage does not,
    and a freed storage's address is soon reused), checked by their in-place version, shape and strides."""
    storages = [t.untyped_storage() for t in sources]
    key = id(storages[0])
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


def _rows(x):
    return x.reshape(-1, x.shape[-1])  # (..., K) -> (M, K)


def linear(x, weight, bias=None):
    """x (..., K) @ weight (N, K)^T + bias for CPU inference, or None where no prepared layout applies (the caller
    then runs F.linear): bf16 activations and weight on a CPU whose oneDNN multiplies bf16."""
    if not (x.dtype == weight.dtype == torch.bfloat16 and onednn_bf16()):
        return None
    packed = prepared((weight,), lambda: torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1))
    y = torch.ops.mkldnn._linear_pointwise(_rows(x), packed, bias, "none", [], "")  # (M, N)
    return y.view(*x.shape[:-1], weight.shape[0])


def int8_linear(x, weight, scale, bias=None):
    """x (M, K) @ (weight (N, K) int8 * scale (N,))^T (+ bias) in x's dtype for a few rows, on torch's packed int8
    kernel in bf16 (as `kernels.int8_mm.int8_weight_only_matmul` runs it on the CPU); None where it does not apply."""
    if x.shape[0] > MAX_ROWS or weight.shape[1] % INT8PACK_K_MULTIPLE or not hasattr(torch.ops.aten,
                                                                                    "_weight_int8pack_mm"):
        return None
    rows = torch.ops.tinyformer.int8_rows if torch.compiler.is_compiling() else _int8_rows
    return _finish(rows(x, weight, scale), bias, x.dtype)


def int4_linear(x, w_packed, scales, zeros, group_size: int, bias=None):
    """x (M, K) @ dequant(int4 weight)^T (+ bias) in x's dtype for a few rows, on torch's int4pack kernel in bf16 (as
    `kernels.int4_mm.int4_matmul` runs it on the CPU); None where it does not apply."""
    if (x.shape[0] > MAX_ROWS or group_size not in int4_mm.INT4PACK_GROUP_SIZES
            or w_packed.shape[0] % int4_mm.INT4PACK_N_MULTIPLE
            or not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")):
        return None
    rows = torch.ops.tinyformer.int4_rows if torch.compiler.is_compiling() else _int4_rows
    return _finish(rows(x, w_packed, scales, zeros, group_size), bias, x.dtype)


def _finish(y, bias, dtype):
    """The kernel's bf16 output (M, N), plus the bias in fp32, in the activations' dtype (as the kernels' paths)."""
    return (y.float() + bias.float()).to(dtype) if bias is not None else y.to(dtype)


def _int8_rows(x, weight, scale):
    def make():
        w = weight.contiguous()
        return w.clone() if w.data_ptr() % 64 else w, scale.to(torch.bfloat16)
    w, s = prepared((weight, scale), make)
    return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), w, s)  # (M, N) bf16


def _int4_rows(x, w_packed, scales, zeros, group_size: int):
    p = prepared((w_packed, scales, zeros), lambda: int4_mm.Int4PackedCPU(w_packed, scales, zeros, group_size))
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16).contiguous(), p.packed, group_size,
                                                      p.scale_and_zero)  # (M, N) bf16


# torch.compile sees each quantized product as one op: the graph calls it with the module's own tensors, and the op
# multiplies through the prepared layout, which no graph could hold (it lives beside the weights, not in them)
@torch.library.custom_op("tinyformer::int8_rows", mutates_args=())
def _int8_op(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return _int8_rows(x, weight, scale)


@_int8_op.register_fake
def _(x, weight, scale):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.bfloat16)


@torch.library.custom_op("tinyformer::int4_rows", mutates_args=())
def _int4_op(x: torch.Tensor, w_packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
             group_size: int) -> torch.Tensor:
    return _int4_rows(x, w_packed, scales, zeros, group_size)


@_int4_op.register_fake
def _(x, w_packed, scales, zeros, group_size):
    return x.new_empty(x.shape[0], w_packed.shape[0], dtype=torch.bfloat16)


def clear() -> None:
    """Drop every prepared layout (they are rebuilt on next use)."""
    _layouts.clear()
