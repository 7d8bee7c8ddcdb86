"""Fused linear + cross-entropy in Triton, for training: the loss of the logits h @ W^T without materializing all of
them.

`linear_cross_entropy(h, weight, target, ignore_index=-100)` (reference
`tinyformer.kernels.reference.linear_cross_entropy`): the mean cross-entropy over the non-ignored targets of the
logits h (N, C) @ weight (V, C)^T. Differentiable in h and weight.

How: the rows are taken in chunks; per chunk the logits (rows, V) are one matmul in h's dtype (cuBLAS), then
`_ce_kernel` reads each row twice (online max and sum of exponentials, then softmax - onehot) and writes the gradient
of the loss with respect to the logits over the logits themselves, in place; two more matmuls turn it into the
chunk's dh and its share of dW. The forward thus computes the gradients (kept for the backward, which scales them by
the incoming gradient), and the peak extra memory is one chunk of logits, not N x V fp32 (at V = 49152 the full fp32
logits of 8k tokens are 1.6 GB).

Dispatch: CUDA tensors, and CPU tensors under TRITON_INTERPRET=1 set before import -> the Triton kernel; others ->
the reference. `linear_cross_entropy_rows` is the same chunk loop with each chunk's rows done by torch ops instead of
`_ce_kernel` (the CPU training path of `ops.linear_cross_entropy`: chunks of `CPU_CHUNK_ROWS`, so that the head's
weight streams a few times a step, not once per handful of rows).

References: Liger-Kernel (linkedin/Liger-Kernel, src/liger_kernel/ops/fused_linear_cross_entropy.py and
cross_entropy.py): chunking over rows, the in-place gradient of the logits, the gradients computed in the forward;
Milakov & Gimelshein 2018, "Online normalizer calculation for softmax".

Layout: @triton.jit kernel -> chunk loop -> autograd.Function -> public function.
Legend: N rows (tokens), C hidden size, V vocabulary, R rows per chunk.
"""
from __future__ import annotations  # kernel annotations stay strings: the module imports without triton

import functools

import torch

from .device import backend_of, cdiv, tl, triton
from .reference import _need, linear_cross_entropy as linear_cross_entropy_reference

__all__ = ["linear_cross_entropy", "linear_cross_entropy_rows"]

BLOCK_V = 1024  # vocabulary entries per step of a row's two passes
INTERPRET_BLOCK_V = 128


# ======================================================================================================================
# Kernel
# ======================================================================================================================
@triton.jit
def _ce_kernel(logits_ptr, target_ptr, loss_ptr, V, stride_lr, ignore_index, inv_n,
               BLOCK_V: tl.constexpr):
    """One row of a chunk: loss = logsumexp(z) - z[target] (0 for an ignored target), then the row of logits is
    overwritten by (softmax(z) - onehot(target)) * inv_n (0 for an ignored target), in the logits' dtype."""
    row = tl.program_id(0).to(tl.int64)  # 64-bit offsets: R*V can pass 2^31
    base = logits_ptr + row * stride_lr
    t = tl.load(target_ptr + row)
    offs = tl.arange(0, BLOCK_V)
    m = tl.full((BLOCK_V,), -1e30, tl.float32)  # per-lane running max and sum (finite: masked lanes add exp = 0)
    s = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        ok = v0 + offs < V
        z = tl.where(ok, tl.load(base + v0 + offs, mask=ok, other=0.0).to(tl.float32), -1e30)
        m_new = tl.maximum(m, z)
        s = s * tl.exp(m - m_new) + tl.exp(z - m_new)
        m = m_new
    m_row = tl.max(m, axis=0)
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), axis=0))
    valid = t != ignore_index
    z_t = tl.load(base + tl.where(valid, t, 0)).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - z_t, 0.0))
    scale = tl.where(valid, inv_n, 0.0)
    for v0 in range(0, V, BLOCK_V):
        ok = v0 + offs < V
        z = tl.load(base + v0 + offs, mask=ok, other=0.0).to(tl.float32)
        grad = (tl.exp(z - lse) - tl.where(v0 + offs == t, 1.0, 0.0)) * scale
        tl.store(base + v0 + offs, grad.to(logits_ptr.dtype.element_ty), mask=ok)


# ======================================================================================================================
# Chunk loop
# ======================================================================================================================
def chunk_rows(N: int, C: int, V: int) -> int:
    """Rows per chunk: about N / (V / C), a power of two, so a chunk of logits (R, V) is about as large as h (N, C)
    (Liger's rule)."""
    return max(1, min(N, triton.next_power_of_2(cdiv(N, max(1, cdiv(V, C))))))


def _kernel_rows(logits, target, loss, ignore_index: int, inv_n: float):
    """A chunk's rows by `_ce_kernel`: loss (R,) written, logits (R, V) overwritten by d mean loss / d logits."""
    block_v = INTERPRET_BLOCK_V if logits.device.type == "cpu" else BLOCK_V
    _ce_kernel[(logits.shape[0],)](logits, target, loss, logits.shape[1], logits.stride(0), ignore_index, inv_n,
                                   BLOCK_V=block_v, num_warps=8)


def _torch_rows(logits, target, loss, ignore_index: int, inv_n: float, scratch=None):
    """`_kernel_rows`' work in torch ops, in fp32: loss = logsumexp(z) - z[target], then the logits overwritten by
    (softmax(z) - onehot(target)) * inv_n; 0 for an ignored target. Lower-precision logits are widened into `scratch`
    (fp32, at least the chunk's rows), one buffer for every chunk of a call: a fresh 50 MB tensor a chunk costs its
    page faults each time, and the passes below work in place."""
    z = logits if logits.dtype == torch.float32 else scratch[:logits.shape[0]].copy_(logits)  # (R, V) fp32
    valid = target != ignore_index
    safe = torch.where(valid, target, 0)[:, None]  # (R, 1)
    z_target = z.gather(1, safe)[:, 0]  # (R,)
    m = z.amax(-1, keepdim=True)  # (R, 1)
    p = z.sub_(m).exp_()  # exp(z - max), in place of z
    total = p.sum(-1, keepdim=True)  # (R, 1)
    loss.copy_(torch.where(valid, m[:, 0] + total[:, 0].log() - z_target, 0.0))
    scale = torch.where(valid, inv_n, 0.0)[:, None]  # (R, 1)
    p.mul_(scale / total).scatter_add_(1, safe, -scale)  # (softmax - onehot) * inv_n
    if z is not logits:
        logits.copy_(z)


def _loss_and_grads(h, weight, target, ignore_index: int, rows: int, need_grad: bool, rows_fn=_kernel_rows):
    """The mean loss (fp32 scalar) and, if need_grad, dh (N, C) and, if weight requires grad, dW (V, C) of the mean
    loss (a frozen head, as under LoRA, skips dW's products)."""
    N = h.shape[0]
    n_valid = int((target != ignore_index).sum())
    inv_n = 1.0 / max(n_valid, 1)
    loss = torch.zeros((N,), device=h.device, dtype=torch.float32)
    dh = torch.empty_like(h) if need_grad else None
    dw = torch.zeros_like(weight, dtype=torch.float32) if need_grad and weight.requires_grad else None
    # each chunk's dW product lands in one buffer of the weight's dtype, then is summed into fp32: a fresh (V, C)
    # tensor a chunk (and its fp32 copy) pays page faults every time
    part = torch.empty_like(weight) if dw is not None and weight.dtype != torch.float32 else None
    for r0 in range(0, N, rows):
        hc = h[r0:r0 + rows]  # (R, C)
        logits = hc @ weight.T  # (R, V) in h's dtype
        rows_fn(logits, target[r0:r0 + rows], loss[r0:r0 + rows], ignore_index, inv_n)
        if need_grad:  # logits now holds d loss / d logits
            torch.matmul(logits, weight, out=dh[r0:r0 + rows])  # (R, C)
            if part is not None:
                dw += torch.matmul(logits.T, hc, out=part)  # (V, C), widened to fp32 by the in-place add
            elif dw is not None:
                dw.addmm_(logits.T, hc)  # (V, C)
    return loss.sum() * inv_n, dh, (dw.to(weight.dtype) if dw is not None else None)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, target, ignore_index, rows, rows_fn):
        loss, dh, dw = _loss_and_grads(h, weight, target, ignore_index, rows, True, rows_fn)
        ctx.save_for_backward(dh, dw)
        return loss

    @staticmethod
    def backward(ctx, grad):
        dh, dw = ctx.saved_tensors
        return dh * grad.to(dh.dtype), None if dw is None else dw * grad.to(dw.dtype), None, None, None, None


# ======================================================================================================================
# Public API
# ======================================================================================================================
def linear_cross_entropy(h, weight, target, ignore_index: int = -100, chunk: int | None = None):
    """Mean cross-entropy of h (N, C) @ weight (V, C)^T against target (N,) int64 over the targets that are not
    ignore_index (0 if none is left); differentiable in h and weight. chunk: rows per chunk (default `chunk_rows`)."""
    _check(h, weight, target)
    if backend_of(h, "tinyformer.kernels.linear_cross_entropy") != "triton" or h.shape[0] == 0:
        return linear_cross_entropy_reference(h, weight, target, ignore_index)
    return _chunked(h, weight, target, ignore_index, chunk or chunk_rows(h.shape[0], h.shape[1], weight.shape[0]),
                    _kernel_rows)


CPU_CHUNK_ROWS = 256  # a chunk's fp32 logits at V = 49152: 50 MB, against 100 MB a 512-token window's all take


def linear_cross_entropy_rows(h, weight, target, ignore_index: int = -100, chunk: int = CPU_CHUNK_ROWS):
    """`linear_cross_entropy` with each chunk's rows done by torch ops (`_torch_rows`), on any device: the peak
    extra memory is one chunk of logits, and a frozen weight gets no dW products."""
    _check(h, weight, target)
    if h.shape[0] == 0:
        return linear_cross_entropy_reference(h, weight, target, ignore_index)
    rows_fn = _torch_rows
    if h.dtype != torch.float32:  # one fp32 chunk for the whole call
        rows_fn = functools.partial(_torch_rows, scratch=torch.empty((min(chunk, h.shape[0]), weight.shape[0]),
                                                                      device=h.device))
    return _chunked(h, weight, target, ignore_index, chunk, rows_fn)


def _chunked(h, weight, target, ignore_index, rows, rows_fn):
    """The chunk loop, through the autograd.Function where a gradient is wanted."""
    h, target = h.contiguous(), target.contiguous()
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, target, int(ignore_index), rows, rows_fn)
    return _loss_and_grads(h, weight, target, int(ignore_index), rows, False, rows_fn)[0]


def _check(h, weight, target):
    """Both entry points' argument checks: one line naming the argument."""
    _need(isinstance(h, torch.Tensor) and h.dim() == 2 and h.dtype in (torch.float32, torch.float16, torch.bfloat16),
          lambda: f"h must be a 2-D float32/float16/bfloat16 tensor (N, C), got {getattr(h, 'shape', type(h))}")
    _need(isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[1] == h.shape[1],
          lambda: f"weight must be (V, C) with C = {h.shape[1]}, got {tuple(getattr(weight, 'shape', ()))}")
    _need(weight.dtype == h.dtype, lambda: f"weight must have h's dtype {h.dtype}, got {weight.dtype}", TypeError)
    _need(isinstance(target, torch.Tensor) and target.dtype == torch.int64 and tuple(target.shape) == (h.shape[0],),
          lambda: f"target must be int64 of shape (N,) = ({h.shape[0]},), got "
                  f"{getattr(target, 'dtype', type(target))} {tuple(getattr(target, 'shape', ()))}")
