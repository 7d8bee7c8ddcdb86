"""Fused rotary position embedding (RoPE) forward and backward in Triton, for training.

`rope(x, cos, sin)` (reference `tinyformer.kernels.reference.rope`): x (B, H, T, Dh) with its pairs (x[i],
x[i + Dh/2]) rotated by the angles in cos, sin (B or 1, 1, T, Dh) fp32: x * cos + rotate_half(x) * sin, computed in
fp32 and rounded once to x's dtype. One read of x and one write, where eager torch makes four temporaries. The
backward is the inverse rotation of dy: dx = dy * cos + rotate_half^T(dy * sin), the same kernel with BACKWARD set.
Differentiable in x (the tables are constants).

Dispatch: CUDA tensors, and CPU tensors under TRITON_INTERPRET=1 set before import -> the Triton kernels; others ->
the reference.

References: Su et al. 2021, "RoFormer" (rotary embedding), in Hugging Face's "rotate half" layout; Liger-Kernel
(linkedin/Liger-Kernel, src/liger_kernel/ops/rope.py): one program per (batch, head) tile, backward by the inverse
rotation.

Layout: @triton.jit kernel -> launcher -> autograd.Function -> public function.
Legend: B batch, H heads, T positions, Dh head dim (even), half = Dh / 2.
"""
from __future__ import annotations  # kernel annotations stay strings: the module imports without triton

import torch

from .device import backend_of, cdiv, tl, triton
from .reference import _need, rope as rope_reference

__all__ = ["rope"]

BLOCK_T = 16  # positions per program


# ======================================================================================================================
# Kernel
# ======================================================================================================================
@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, H, T,
                 stride_xb, stride_xh, stride_xt, stride_cb, stride_ct, stride_yb, stride_yh, stride_yt,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, BACKWARD: tl.constexpr):
    """Grid (cdiv(T, BLOCK_T), B * H). Forward: y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2; backward (x = dy, y = dx):
    y1 = x1 c1 + x2 s2, y2 = x2 c2 - x1 s1. Halves 1 and 2 are columns [0, HALF) and [HALF, 2 HALF)."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # 64-bit offsets: B*H*T*Dh can pass 2^31
    h = (pid_bh % H).to(tl.int64)
    offs_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_H)
    mask = (offs_t < T)[:, None] & (offs_d < HALF)[None, :]
    x_base = x_ptr + b * stride_xb + h * stride_xh + offs_t[:, None] * stride_xt + offs_d[None, :]
    c_base = b * stride_cb + offs_t[:, None] * stride_ct + offs_d[None, :]
    x1 = tl.load(x_base, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_T, BLOCK_H)
    x2 = tl.load(x_base + HALF, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + c_base, mask=mask, other=0.0)
    c2 = tl.load(cos_ptr + c_base + HALF, mask=mask, other=0.0)
    s1 = tl.load(sin_ptr + c_base, mask=mask, other=0.0)
    s2 = tl.load(sin_ptr + c_base + HALF, mask=mask, other=0.0)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    y_base = y_ptr + b * stride_yb + h * stride_yh + offs_t[:, None] * stride_yt + offs_d[None, :]
    tl.store(y_base, y1.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_base + HALF, y2.to(y_ptr.dtype.element_ty), mask=mask)


# ======================================================================================================================
# Launcher
# ======================================================================================================================
def _rotate(x, cos, sin, backward: bool):
    """The kernel over x (B, H, T, Dh) (any strides with a unit last one) -> a contiguous (B, H, T, Dh)."""
    B, H, T, Dh = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    # interpreter: its fp32 -> bf16 stores truncate, so bf16 is stored as fp32 and rounded by torch
    dtype = torch.float32 if x.dtype == torch.bfloat16 and x.device.type == "cpu" else x.dtype
    y = torch.empty((B, H, T, Dh), device=x.device, dtype=dtype)
    cos, sin = cos.expand(cos.shape[0], 1, T, Dh), sin.expand(sin.shape[0], 1, T, Dh)
    _rope_kernel[(cdiv(T, BLOCK_T), B * H)](
        x, cos, sin, y, H, T, x.stride(0), x.stride(1), x.stride(2),
        cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(2), y.stride(0), y.stride(1), y.stride(2),
        HALF=Dh // 2, BLOCK_H=triton.next_power_of_2(Dh // 2), BLOCK_T=BLOCK_T, BACKWARD=backward, num_warps=4)
    return y.to(x.dtype)


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rotate(dy, cos, sin, backward=True), None, None


# ======================================================================================================================
# Public API
# ======================================================================================================================
def rope(x, cos, sin):
    """x (B, H, T, Dh) float, cos and sin (B or 1, 1, T, Dh) float32 -> (B, H, T, Dh) in x's dtype; differentiable
    in x."""
    _need(isinstance(x, torch.Tensor) and x.dtype in (torch.float32, torch.float16, torch.bfloat16),
          lambda: f"x must be a float32/float16/bfloat16 tensor, got {getattr(x, 'dtype', type(x))}", TypeError)
    _need(x.dim() == 4 and x.shape[-1] % 2 == 0,
          lambda: f"x must be (B, H, T, Dh) with Dh even, got shape {tuple(x.shape)}")
    B, _, T, Dh = x.shape
    for name, t in (("cos", cos), ("sin", sin)):
        _need(isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[0] in (1, B)
              and tuple(t.shape[1:]) == (1, T, Dh),
              lambda: f"{name} must be (B or 1, 1, T, Dh) = ({B} or 1, 1, {T}, {Dh}), got "
                      f"{tuple(getattr(t, 'shape', ()))}")
        _need(t.dtype == torch.float32, lambda: f"{name} must be float32, got {t.dtype}", TypeError)
    if backend_of(x, "tinyformer.kernels.rope") != "triton" or x.numel() == 0:
        return rope_reference(x, cos, sin)
    cos, sin = cos.contiguous(), sin.contiguous()
    return _Rope.apply(x, cos, sin)
