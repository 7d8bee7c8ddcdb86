"""int8 weight-only (W8A16) matmul in Triton: float activations times an int8 weight with per-output-channel scales.

`int8_weight_only_matmul(x, w_int8, w_scale, bias=None)` (reference `tinyformer.kernels.reference.
int8_weight_only_matmul`): x (M, K) float @ (w_int8 (N, K) * w_scale (N,)[:, None]).T (+ bias), in x's dtype. The int8
weight tile is converted in registers (exact) and fed to a float tl.dot with fp32 accumulation; the scale is applied
once per output column after the K loop. Decode shapes (M <= 16) split K over programs (fp32 partials summed
afterwards), so one token still fills the GPU. Differentiable in x (QLoRA: dx = dy @ (w_int8 * w_scale), the reference
`int8_weight_only_matmul_backward`); the weight, scales and bias are frozen.

Dispatch: CUDA tensors, and CPU tensors under TRITON_INTERPRET=1 set before import -> the Triton kernel; other CPU
tensors -> torch's packed int8 kernel (`cpu.int8_weight_only_matmul_cpu`, bf16 accuracy); elsewhere the reference.

References:
- Dettmers et al. 2022, "LLM.int8()" (absmax int8 weights with per-channel scales).
- The Triton matrix multiplication tutorial (grouped ordering, pointer-arithmetic tiles, masked K loop); split-K for
  skinny GEMMs (e.g. CUTLASS's split-K GEMM).

Layout: @triton.jit kernel -> launcher (configs from `matmul.matmul_configs`) -> public function and `plan`.
Legend: M rows of activations (tokens), N output features, K input features, S number of K splits.
"""
from __future__ import annotations  # kernel annotations stay strings: the module imports without triton

import torch

from .cpu import int8_weight_only_matmul_cpu
from .device import arch_of, backend_of, cdiv, tl, triton
from .matmul import (DECODE_MAX_M, dot_flags, finish_splits, launch, m_bucket, matmul_configs, out_buffer_dtype,
                     split_k, store_tile, tile_ids, with_input_grad)
from .reference import check_int8_weight_only_args, int8_weight_only_matmul_backward
from .reference import int8_weight_only_matmul as int8_weight_only_matmul_reference

__all__ = ["int8_weight_only_matmul", "plan"]


# ======================================================================================================================
# Kernel
# ======================================================================================================================
@triton.jit
def _int8_weight_only_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr,
                             M, N, K,
                             stride_xm, stride_xk, stride_wn, stride_wk, stride_os, stride_om, stride_on,
                             K_SPLIT, M_KEY,  # power-of-two bucket of M: unused here, it keys the autotuner
                             HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                             DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             GROUP_M: tl.constexpr):
    """out tile = x (M, K) float @ (w (N, K) int8)^T * w_scale[n] (+ bias) with fp32 accumulation. Split pid 1 takes
    K columns [pid_k * K_SPLIT, min((pid_k + 1) * K_SPLIT, K)). SPLIT_K == 1: the full epilogue, stored in out's
    dtype; SPLIT_K > 1: scaled fp32 partials at out + pid_k * stride_os, summed (+ bias) by the launcher."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # rows/columns past M/N wrap around (in-bounds loads, dropped by the store mask); 64-bit row offsets: M*K and
    # N*K can pass 2^31
    rm = (offs_m % M).to(tl.int64)
    rn = (offs_n % N).to(tl.int64)
    k_begin = pid_k * K_SPLIT
    k_end = tl.minimum(k_begin + K_SPLIT, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_begin, k_end, BLOCK_K):
        k_mask = offs_k < k_end - k  # the K tail (of the split, or of K) is masked with 0
        x = tl.load(x_ptr + rm[:, None] * stride_xm + (k + offs_k)[None, :] * stride_xk,
                    mask=k_mask[None, :], other=0.0).to(DOT_DTYPE)  # (BLOCK_M, BLOCK_K)
        w = tl.load(w_ptr + (k + offs_k)[:, None] * stride_wk + rn[None, :] * stride_wn,
                    mask=k_mask[:, None], other=0).to(DOT_DTYPE)  # (BLOCK_K, BLOCK_N); int8 -> float is exact
        acc = tl.dot(x, w, acc, input_precision=DOT_PREC)
    acc = acc * tl.load(s_ptr + rn).to(tl.float32)[None, :]
    store_tile(acc, out_ptr, bias_ptr, pid_k, offs_m, offs_n, rn, M, N, stride_os, stride_om, stride_on, HAS_BIAS,
               SPLIT_K)


# ======================================================================================================================
# Launcher
# ======================================================================================================================
def _kind(M: int) -> str:
    return "wo_decode" if M <= DECODE_MAX_M else "wo"


def _launch_weight_only(x, w, w_scale, bias):
    M, K = x.shape
    N = w.shape[0]
    if M == 0 or N == 0 or K == 0:
        return int8_weight_only_matmul_reference(x, w, w_scale, bias)
    cands = matmul_configs(_kind(M), arch_of(x.device))
    splits, k_split = split_k(M, N, K, cands[0], x.device) if M <= DECODE_MAX_M else (1, K)
    dot_dtype, dot_prec = dot_flags(x.dtype, x.device)
    buf = torch.empty((splits, M, N), device=x.device,
                      dtype=out_buffer_dtype(x.dtype, x.device, splits))  # (S, M, N): partials when S > 1
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]), splits)  # noqa: E731
    launch(_int8_weight_only_kernel, grid, cands, ("N", "K", "HAS_BIAS", "SPLIT_K", "M_KEY"),
           x, w, w_scale, bias if bias is not None else w_scale, buf,
           M, N, K, x.stride(0), x.stride(1), w.stride(0), w.stride(1), buf.stride(0), buf.stride(1), buf.stride(2),
           k_split, m_bucket(M), HAS_BIAS=bias is not None, SPLIT_K=splits, DOT_DTYPE=dot_dtype, DOT_PREC=dot_prec)
    return finish_splits(buf, bias, x.dtype)


# ======================================================================================================================
# Public API
# ======================================================================================================================
def int8_weight_only_matmul(x, w_int8, w_scale, bias=None):
    """x (M, K) float @ (w_int8 (N, K) * w_scale (N,)[:, None]).T (+ bias), in x's dtype (W8A16 weight-only);
    differentiable in x. On the CPU fast path (no interpreter) the product is computed in bf16 (see
    cpu.int8_weight_only_matmul_cpu)."""
    check_int8_weight_only_args(x, w_int8, w_scale, bias)
    if backend_of(x, "tinyformer.kernels.int8_weight_only_matmul") == "triton":
        forward = _launch_weight_only
    elif x.device.type == "cpu":
        forward = int8_weight_only_matmul_cpu
    else:
        forward = int8_weight_only_matmul_reference
    if torch.is_grad_enabled() and x.requires_grad:
        return with_input_grad(x, lambda x: forward(x, w_int8, w_scale, bias),
                               lambda dy: int8_weight_only_matmul_backward(dy, w_int8, w_scale), bias)
    return forward(x, w_int8, w_scale, bias)


def plan(M: int, N: int, K: int, device="cpu") -> dict:
    """Which path an int8_weight_only_matmul call of this shape takes: backend, kind, config, K splits."""
    device = torch.device(device)
    if backend_of(torch.empty(0, device=device), "tinyformer.kernels.int8_weight_only_matmul") != "triton":
        return dict(backend="torch", kind="cpu", config=None, splits=1)
    c = matmul_configs(_kind(M), arch_of(device))[0]
    splits = split_k(M, N, K, c, device)[0] if M <= DECODE_MAX_M else 1
    return dict(backend="triton", kind=_kind(M), config=c, splits=splits)
