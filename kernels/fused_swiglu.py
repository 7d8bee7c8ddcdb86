"""Fused SwiGLU activation forward and backward in Triton, for training.

`swiglu(gate, up)` (reference `tinyformer.kernels.reference.swiglu`): silu(gate) * up elementwise, one read of each
input and one write, where eager torch makes silu(gate) its own tensor (a read, a write and a read more); the
backward recomputes sigmoid(gate) instead of keeping silu(gate). Differentiable in gate and up.

Dispatch: CUDA tensors, and CPU tensors under TRITON_INTERPRET=1 set before import -> the Triton kernels; others ->
the reference.

References: Shazeer 2020, "GLU Variants Improve Transformer" (SwiGLU); Liger-Kernel (linkedin/Liger-Kernel,
src/liger_kernel/ops/swiglu.py): the fused elementwise forward and the recomputing backward.

Layout: @triton.jit kernels -> launchers -> autograd.Function -> public function.
Legend: n elements of gate (and of up), any shape.
"""
from __future__ import annotations  # kernel annotations stay strings: the module imports without triton

import torch

from .device import backend_of, cdiv, tl, triton
from .reference import _need, swiglu as swiglu_reference

__all__ = ["swiglu"]

BLOCK = 1024  # elements per program: 4 warps x 32 threads x 8


# ======================================================================================================================
# Kernels
# ======================================================================================================================
@triton.jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, h_ptr, n, BLOCK: tl.constexpr):
    """h = round(silu(g)) * u, formed in fp32 and rounded at the store: the roundings of eager torch."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # 64-bit: n can pass 2^31
    ok = offs < n
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    s = (g * tl.sigmoid(g)).to(g_ptr.dtype.element_ty).to(tl.float32)
    tl.store(h_ptr + offs, (s * u).to(h_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _swiglu_bwd_kernel(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    """du = dh * silu(g); dg = dh * u * silu'(g), silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g)))."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    dh = tl.load(dh_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    tl.store(du_ptr + offs, (dh * (g * sig)).to(du_ptr.dtype.element_ty), mask=ok)
    tl.store(dg_ptr + offs, (dh * u * sig * (1.0 + g * (1.0 - sig))).to(dg_ptr.dtype.element_ty), mask=ok)


# ======================================================================================================================
# Launchers
# ======================================================================================================================
def _out(like):
    """An output like `like`; fp32 for bf16 under the interpreter, whose fp32 -> bf16 stores truncate."""
    dtype = torch.float32 if like.dtype == torch.bfloat16 and like.device.type == "cpu" else like.dtype
    return torch.empty(like.shape, device=like.device, dtype=dtype)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        h = _out(gate)
        _swiglu_fwd_kernel[(cdiv(gate.numel(), BLOCK),)](gate, up, h, gate.numel(), BLOCK=BLOCK, num_warps=4)
        ctx.save_for_backward(gate, up)
        return h.to(gate.dtype)

    @staticmethod
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        dg, du = _out(gate), _out(up)
        _swiglu_bwd_kernel[(cdiv(gate.numel(), BLOCK),)](dh.contiguous(), gate, up, dg, du, gate.numel(), BLOCK=BLOCK,
                                                          num_warps=4)
        return dg.to(gate.dtype), du.to(up.dtype)


# ======================================================================================================================
# Public API
# ======================================================================================================================
def swiglu(gate, up):
    """silu(gate) * up for float gate and up of one shape and dtype; differentiable in both."""
    _need(isinstance(gate, torch.Tensor) and gate.dtype in (torch.float32, torch.float16, torch.bfloat16),
          lambda: f"gate must be a float32/float16/bfloat16 tensor, got {getattr(gate, 'dtype', type(gate))}",
          TypeError)
    _need(isinstance(up, torch.Tensor) and up.shape == gate.shape and up.dtype == gate.dtype,
          lambda: f"up must match gate's shape {tuple(gate.shape)} and dtype {gate.dtype}, got "
                  f"{tuple(getattr(up, 'shape', ()))} {getattr(up, 'dtype', type(up))}")
    if backend_of(gate, "tinyformer.kernels.swiglu") != "triton" or gate.numel() == 0:
        return swiglu_reference(gate, up)
    return _SwiGLU.apply(gate, up)
