"""Fused RMSNorm forward and backward in Triton, for training.

`rms_norm(x, weight, eps=1e-6)` (reference `tinyformer.kernels.reference.rms_norm`, the rule of `ops.rms_norm`):
y = (x / sqrt(mean(x^2) + eps)) rounded to x's dtype, times weight, over the last dim; the statistic in fp32.
Differentiable in x and weight.

Forward: one program per block of ROWS rows; each row is read once, its 1 / rms kept (M,) fp32 for the backward.
Backward: dx = rstd * (dy w - xhat * mean(dy w * xhat)) with xhat = x * rstd; dw = sum over rows of dy * n (n the
normalized row in x's dtype), reduced in registers per program over its rows and written as one fp32 partial per
program, summed by torch in a fixed order (deterministic, no atomics).

Dispatch: CUDA tensors, and CPU tensors under TRITON_INTERPRET=1 set before import -> the Triton kernels; others ->
the reference.

References: Zhang & Sennrich 2019, "Root Mean Square Layer Normalization"; Liger-Kernel (linkedin/Liger-Kernel,
src/liger_kernel/ops/rms_norm.py): the row-wise forward and the per-program partial sums of dW in the backward.

Layout: @triton.jit kernels -> launchers -> autograd.Function -> public function.
Legend: M rows (all leading dims flattened), D the normalized dim, P backward programs.
"""
from __future__ import annotations  # kernel annotations stay strings: the module imports without triton

import torch

from .device import backend_of, cdiv, cuda_index, num_sms, tl, triton
from .reference import _need, rms_norm as rms_norm_reference

__all__ = ["rms_norm"]


# ======================================================================================================================
# Kernels
# ======================================================================================================================
@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, M, D, stride_xm, stride_ym, eps,
                         ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows [pid * ROWS, ..): y = round(x * rstd) * w, rstd = 1 / sqrt(mean(x^2) + eps) stored (M,) fp32. The
    products are formed in fp32 and rounded once at the store, which is torch's rounding of the same dtype product."""
    offs = tl.arange(0, BLOCK_D)
    d_ok = offs < D
    w = tl.load(w_ptr + offs, mask=d_ok, other=0.0).to(tl.float32)
    for i in range(0, ROWS):
        row = tl.program_id(0) * ROWS + i
        if row < M:
            x = tl.load(x_ptr + row.to(tl.int64) * stride_xm + offs, mask=d_ok, other=0.0).to(tl.float32)
            rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / D + eps)
            n = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)  # the normalized row in x's dtype
            tl.store(y_ptr + row.to(tl.int64) * stride_ym + offs, (n * w).to(y_ptr.dtype.element_ty), mask=d_ok)
            tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, M, D,
                         stride_dym, stride_xm, stride_dxm, rows_per_program,
                         BLOCK_D: tl.constexpr):
    """Rows [pid * rows_per_program, ..): dx per row, and this program's partial dw (D,) fp32 at dw + pid * D."""
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK_D)
    d_ok = offs < D
    w = tl.load(w_ptr + offs, mask=d_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    row_end = tl.minimum(pid * rows_per_program + rows_per_program, M)
    for row in range(pid * rows_per_program, row_end):
        r = tl.cast(row, tl.int64)  # 64-bit offsets: M*D can pass 2^31
        x = tl.load(x_ptr + r * stride_xm + offs, mask=d_ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + r * stride_dym + offs, mask=d_ok, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        xhat = x * rstd
        dyw = dy * w
        dx = rstd * (dyw - xhat * (tl.sum(dyw * xhat, axis=0) / D))
        tl.store(dx_ptr + r * stride_dxm + offs, dx.to(dx_ptr.dtype.element_ty), mask=d_ok)
        dw += dy * xhat.to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(dw_ptr + pid.to(tl.int64) * D + offs, dw, mask=d_ok)


# ======================================================================================================================
# Launchers
# ======================================================================================================================
FWD_ROWS = 4  # rows per forward program: several rows amortize the weight load
INTERPRET_BWD_PROGRAMS = 2  # under the interpreter 2 partials exercise the dw sum


def _block_d(D: int) -> int:
    return triton.next_power_of_2(D)


def _warps(block_d: int) -> int:
    return min(16, max(1, block_d // 256))  # ~8 elements a thread per pass


def _store_dtype(dtype, device):
    """The interpreter's fp32 -> bf16 stores truncate: store fp32 there and let torch round."""
    return torch.float32 if dtype == torch.bfloat16 and device.type == "cpu" else dtype


def _fwd(x2, weight, eps):
    M, D = x2.shape
    y = torch.empty((M, D), device=x2.device, dtype=_store_dtype(x2.dtype, x2.device))
    rstd = torch.empty((M,), device=x2.device, dtype=torch.float32)
    bd = _block_d(D)
    _rms_norm_fwd_kernel[(cdiv(M, FWD_ROWS),)](x2, weight, y, rstd, M, D, x2.stride(0), y.stride(0), eps,
                                               ROWS=FWD_ROWS, BLOCK_D=bd, num_warps=_warps(bd))
    return y.to(x2.dtype), rstd


def _bwd(dy, x2, weight, rstd):
    M, D = x2.shape
    P = min(M, 2 * num_sms(cuda_index(x2.device)) if x2.device.type == "cuda" else INTERPRET_BWD_PROGRAMS)
    per = cdiv(M, P)
    P = cdiv(M, per)
    dx = torch.empty((M, D), device=x2.device, dtype=_store_dtype(x2.dtype, x2.device))
    dw = torch.empty((P, D), device=x2.device, dtype=torch.float32)  # (P, D) partials
    bd = _block_d(D)
    _rms_norm_bwd_kernel[(P,)](dy, x2, weight, rstd, dx, dw, M, D, dy.stride(0), x2.stride(0), dx.stride(0), per,
                               BLOCK_D=bd, num_warps=_warps(bd))
    return dx.to(x2.dtype), dw.sum(0).to(weight.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (..., D) -> (M, D)
        y, rstd = _fwd(x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = _bwd(dy.reshape(x2.shape).contiguous(), x2, weight, rstd)
        return dx.view(dy.shape), dw, None


# ======================================================================================================================
# Public API
# ======================================================================================================================
def rms_norm(x, weight, eps: float = 1e-6):
    """x (..., D) float, weight (D,) in x's dtype -> (..., D) in x's dtype, differentiable in x and weight."""
    _need(isinstance(x, torch.Tensor) and x.dtype in (torch.float32, torch.float16, torch.bfloat16),
          lambda: f"x must be a float32/float16/bfloat16 tensor, got {getattr(x, 'dtype', type(x))}", TypeError)
    _need(isinstance(weight, torch.Tensor) and weight.shape == x.shape[-1:],
          lambda: f"weight must have shape (D,) = ({x.shape[-1]},), got {tuple(getattr(weight, 'shape', ()))}")
    _need(weight.dtype == x.dtype, lambda: f"weight must have x's dtype {x.dtype}, got {weight.dtype}", TypeError)
    if backend_of(x, "tinyformer.kernels.rms_norm") != "triton" or x.numel() == 0 or x.shape[-1] > 65536:
        return rms_norm_reference(x, weight, eps)
    return _RMSNorm.apply(x, weight, float(eps))
