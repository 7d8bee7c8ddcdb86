"""Fused LayerNorm forward and backward in Triton, for training.

`layer_norm(x, weight, bias=None, eps=1e-5)` (reference `tinyformer.kernels.reference.layer_norm`, the rule of
`ops.layer_norm` and of torch's F.layer_norm): y = (x - mean) / sqrt(var + eps) * weight + bias over the last dim,
biased variance, every step in fp32 and the output rounded once to x's dtype. Differentiable in x, weight and bias.

Forward: one program per block of ROWS rows; each row is read once, its mean and 1 / std kept (M,) fp32 for the
backward. Backward, with xhat = (x - mean) * rstd recomputed from them and g = dy * w:
dx = rstd * (g - xhat * mean(g * xhat) - mean(g)); dweight = sum over rows of dy * xhat and dbias = sum of dy, reduced
in registers per program over its rows and written as one fp32 partial per program, summed by torch in a fixed order
(deterministic, no atomics).

Dispatch: CUDA tensors, and CPU tensors under TRITON_INTERPRET=1 set before import -> the Triton kernels; others ->
the reference.

References: Ba, Kiros & Hinton 2016, "Layer Normalization"; Liger-Kernel (linkedin/Liger-Kernel,
src/liger_kernel/ops/layer_norm.py) and the Triton layer-norm tutorial (05-layer-norm.py): the row-wise forward that
keeps mean and rstd, and the backward's per-program partial sums of dweight and dbias. The launch heuristic (rows per
program, block and warps for D, the number of backward programs) is fused_rms_norm's.

Layout: @triton.jit kernels -> launchers -> autograd.Function -> public function.
Legend: M rows (all leading dims flattened), D the normalized dim, P backward programs.
"""
from __future__ import annotations  # kernel annotations stay strings: the module imports without triton

import torch

from .device import backend_of, cdiv, cuda_index, num_sms, tl, triton
from .fused_rms_norm import FWD_ROWS, INTERPRET_BWD_PROGRAMS, _block_d, _store_dtype, _warps
from .reference import _need, layer_norm as layer_norm_reference

__all__ = ["layer_norm"]


# ======================================================================================================================
# Kernels
# ======================================================================================================================
@triton.jit
def _layer_norm_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, M, D, stride_xm, stride_ym, eps,
                           HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows [pid * ROWS, ..): y = (x - mean) * rstd * w (+ b) in fp32, rounded once at the store; mean and
    rstd = 1 / sqrt(var + eps) stored (M,) fp32."""
    offs = tl.arange(0, BLOCK_D)
    d_ok = offs < D
    w = tl.load(w_ptr + offs, mask=d_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(b_ptr + offs, mask=d_ok, other=0.0).to(tl.float32)
    for i in range(0, ROWS):
        row = tl.program_id(0) * ROWS + i
        if row < M:
            r = row.to(tl.int64)  # 64-bit offsets: M*D can pass 2^31
            x = tl.load(x_ptr + r * stride_xm + offs, mask=d_ok, other=0.0).to(tl.float32)
            mean = tl.sum(x, axis=0) / D
            xc = tl.where(d_ok, x - mean, 0.0)  # the padding past D stays 0, out of the variance
            rstd = tl.math.rsqrt(tl.sum(xc * xc, axis=0) / D + eps)
            y = xc * rstd * w
            if HAS_BIAS:
                y += b
            tl.store(y_ptr + r * stride_ym + offs, y.to(y_ptr.dtype.element_ty), mask=d_ok)
            tl.store(mean_ptr + row, mean)
            tl.store(rstd_ptr + row, rstd)


@triton.jit
def _layer_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_ptr, db_ptr, M, D,
                           stride_dym, stride_xm, stride_dxm, rows_per_program,
                           HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows [pid * rows_per_program, ..): dx per row, and this program's partial dweight and dbias (D,) fp32 at
    dw + pid * D and db + pid * D."""
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK_D)
    d_ok = offs < D
    w = tl.load(w_ptr + offs, mask=d_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    db = tl.zeros((BLOCK_D,), dtype=tl.float32)
    row_end = tl.minimum(pid * rows_per_program + rows_per_program, M)
    for row in range(pid * rows_per_program, row_end):
        r = tl.cast(row, tl.int64)  # 64-bit offsets: M*D can pass 2^31
        x = tl.load(x_ptr + r * stride_xm + offs, mask=d_ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + r * stride_dym + offs, mask=d_ok, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + row)
        rstd = tl.load(rstd_ptr + row)
        xhat = tl.where(d_ok, (x - mean) * rstd, 0.0)
        g = dy * w  # 0 past D (w and dy load 0 there)
        c1 = tl.sum(g * xhat, axis=0) / D
        c2 = tl.sum(g, axis=0) / D
        dx = rstd * (g - xhat * c1 - c2)
        tl.store(dx_ptr + r * stride_dxm + offs, dx.to(dx_ptr.dtype.element_ty), mask=d_ok)
        dw += dy * xhat
        db += dy
    tl.store(dw_ptr + pid.to(tl.int64) * D + offs, dw, mask=d_ok)
    if HAS_BIAS:
        tl.store(db_ptr + pid.to(tl.int64) * D + offs, db, mask=d_ok)


# ======================================================================================================================
# Launchers
# ======================================================================================================================
def _fwd(x2, weight, bias, eps):
    M, D = x2.shape
    y = torch.empty((M, D), device=x2.device, dtype=_store_dtype(x2.dtype, x2.device))
    mean = torch.empty((M,), device=x2.device, dtype=torch.float32)
    rstd = torch.empty((M,), device=x2.device, dtype=torch.float32)
    bd = _block_d(D)
    _layer_norm_fwd_kernel[(cdiv(M, FWD_ROWS),)](x2, weight, bias if bias is not None else weight, y, mean, rstd,
                                                 M, D, x2.stride(0), y.stride(0), eps, HAS_BIAS=bias is not None,
                                                 ROWS=FWD_ROWS, BLOCK_D=bd, num_warps=_warps(bd))
    return y.to(x2.dtype), mean, rstd


def _bwd(dy, x2, weight, mean, rstd, has_bias: bool):
    M, D = x2.shape
    P = min(M, 2 * num_sms(cuda_index(x2.device)) if x2.device.type == "cuda" else INTERPRET_BWD_PROGRAMS)
    per = cdiv(M, P)
    P = cdiv(M, per)
    dx = torch.empty((M, D), device=x2.device, dtype=_store_dtype(x2.dtype, x2.device))
    dw = torch.empty((P, D), device=x2.device, dtype=torch.float32)  # (P, D) partials
    db = torch.empty((P, D), device=x2.device, dtype=torch.float32) if has_bias else dw  # (P, D) partials
    bd = _block_d(D)
    _layer_norm_bwd_kernel[(P,)](dy, x2, weight, mean, rstd, dx, dw, db, M, D,
                                 dy.stride(0), x2.stride(0), dx.stride(0), per,
                                 HAS_BIAS=has_bias, BLOCK_D=bd, num_warps=_warps(bd))
    return dx.to(x2.dtype), dw.sum(0).to(weight.dtype), db.sum(0).to(weight.dtype) if has_bias else None


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (..., D) -> (M, D)
        y, mean, rstd = _fwd(x2, weight, bias, eps)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.has_bias = bias is not None
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = _bwd(dy.reshape(x2.shape).contiguous(), x2, weight, mean, rstd, ctx.has_bias)
        return dx.view(dy.shape), dw, db, None


# ======================================================================================================================
# Public API
# ======================================================================================================================
def layer_norm(x, weight, bias=None, eps: float = 1e-5):
    """x (..., D) float, weight and bias (D,) in x's dtype (bias optional) -> (..., D) in x's dtype, differentiable
    in x, weight and bias."""
    _need(isinstance(x, torch.Tensor) and x.dtype in (torch.float32, torch.float16, torch.bfloat16),
          lambda: f"x must be a float32/float16/bfloat16 tensor, got {getattr(x, 'dtype', type(x))}", TypeError)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None and name == "bias":
            continue
        _need(isinstance(t, torch.Tensor) and t.shape == x.shape[-1:],
              lambda: f"{name} must have shape (D,) = ({x.shape[-1]},), got {tuple(getattr(t, 'shape', ()))}")
        _need(t.dtype == x.dtype, lambda: f"{name} must have x's dtype {x.dtype}, got {t.dtype}", TypeError)
        _need(t.device == x.device, lambda: f"{name} is on {t.device}, x on {x.device}")
    if backend_of(x, "tinyformer.kernels.layer_norm") != "triton" or x.numel() == 0 or x.shape[-1] > 65536:
        return layer_norm_reference(x, weight, bias, eps)
    return _LayerNorm.apply(x, weight, bias, float(eps))
