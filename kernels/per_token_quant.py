"""Dynamic per-token int8 quantization of activations in one fused Triton pass per row: the input side of W8A8.

`quantize_per_token(x) -> (q int8 (..., K), scale float32 (...))` (reference `tinyformer.kernels.reference.
quantize_per_token`): scale = absmax(row) / 127 (1 for an all-zero row), q = round(x / scale) with ties to even,
bit-equal to the reference (IEEE divisions, round half to even). Feeds `int8_matmul`.

Dispatch: CUDA tensors, and CPU tensors under TRITON_INTERPRET=1 set before import -> the Triton kernel; elsewhere the
reference (a few torch ops per row, already fast on CPU).

References: Xiao et al. 2023, "SmoothQuant" (dynamic per-token activation scales); Dettmers et al. 2022, "LLM.int8()"
(absmax int8).

Layout: @triton.jit kernel -> launcher (config from `matmul.matmul_configs("quant")`) -> public function.
"""
from __future__ import annotations  # kernel annotations stay strings: the module imports without triton

import torch

from .device import HAS_TRITON, arch_of, backend_of, tl, triton
from .matmul import matmul_configs
from .reference import _need, quantize_per_token as quantize_per_token_reference

__all__ = ["quantize_per_token"]


@triton.jit
def _quantize_per_token_kernel(x_ptr, q_ptr, s_ptr, K,
                               stride_xm, stride_xk, stride_qm, stride_qk,
                               BLOCK_K: tl.constexpr):
    """One program per row: pass 1 row absmax, scale = absmax / 127 (1 for a zero row); pass 2 q = rne(x / scale).
    Divisions are IEEE (div_rn) so the codes equal torch.round(x / scale) bit for bit."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row * stride_xm
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_row + (k0 + offs) * stride_xk, mask=offs < K - k0, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.math.div_rn(tl.max(amax, axis=0), 127.0)
    scale = tl.where(scale > 0, scale, 1.0)
    tl.store(s_ptr + row, scale)
    q_row = q_ptr + row * stride_qm
    for k0 in range(0, K, BLOCK_K):
        mask = offs < K - k0
        x = tl.load(x_row + (k0 + offs) * stride_xk, mask=mask, other=0.0).to(tl.float32)
        v = tl.math.div_rn(x, scale)
        # round half to even by the magic-number trick: |v| <= 127, so v + 1.5 * 2**23 lies in [2**23, 2**24) where the
        # fp32 spacing is 1 and the add itself rounds v to an integer (IEEE round-to-nearest-even, as torch.round);
        # the subtract is exact. libdevice.rint would do it on the GPU but is broken in the interpreter.
        r = (v + 12582912.0) - 12582912.0
        r = tl.minimum(tl.maximum(r, -127.0), 127.0)
        tl.store(q_row + (k0 + offs) * stride_qk, r.to(tl.int8), mask=mask)


def _launch_quantize_per_token(x2):
    M, K = x2.shape
    q = torch.empty((M, K), device=x2.device, dtype=torch.int8)
    s = torch.empty((M,), device=x2.device, dtype=torch.float32)
    if M == 0:
        return q, s
    c = matmul_configs("quant", arch_of(x2.device))[0]
    block_k = min(c.block_k, max(16, triton.next_power_of_2(K))) if HAS_TRITON else c.block_k
    _quantize_per_token_kernel[(M,)](x2, q, s, K, x2.stride(0), x2.stride(1), q.stride(0), q.stride(1),
                                     BLOCK_K=block_k, num_warps=c.num_warps)
    return q, s


def quantize_per_token(x):
    """Dynamic per-token int8 quantization of activations x (..., K) in one fused kernel: returns (q int8 (..., K),
    scale float32 (...)) with scale = absmax(row) / 127 (1 for an all-zero row) and q = round(x / scale), the rule of
    `reference.quantize_per_token`."""
    _need(isinstance(x, torch.Tensor), lambda: f"x must be a torch.Tensor, got {type(x).__name__}", TypeError)
    _need(x.dtype in (torch.float32, torch.float16, torch.bfloat16),
          lambda: f"x must be float32/float16/bfloat16, got {x.dtype}", TypeError)
    _need(x.dim() >= 1 and x.shape[-1] >= 1, lambda: f"x must be (..., K) with K >= 1, got shape {tuple(x.shape)}")
    if backend_of(x, "tinyformer.kernels.quantize_per_token") != "triton":
        return quantize_per_token_reference(x)
    x2 = x.reshape(-1, x.shape[-1])  # (..., K) -> (M, K), a view when x is contiguous
    q, s = _launch_quantize_per_token(x2)
    return q.view(x.shape), s.view(x.shape[:-1])
