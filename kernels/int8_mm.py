"""W8A8 int8 matmul in Triton: int8 x int8 -> exact int32 accumulation, scaled in a fused epilogue.

`int8_matmul(a, b, a_scale, b_scale, bias=None, out_dtype=torch.float32)` (contract in docs/API.md; reference
`tinyformer.kernels.reference.int8_matmul`): (a @ b.T) * a_scale[:, None] * b_scale[None, :] (+ bias), a int8 (M, K)
activations (e.g. from `quantize_per_token`), b int8 (N, K) weight (the nn.Linear layout), per-row / per-output-channel
float32 scales. `int8_matmul_int32(a, b)` returns the raw int32 accumulator of the same kernel (epilogue off).

Dispatch: CUDA tensors, and CPU tensors under TRITON_INTERPRET=1 set before import -> the Triton kernel; other CPU
tensors -> torch._int_mm (`cpu.int8_matmul_cpu`, exact, bit-equal to the reference); elsewhere the reference.

References:
- Dettmers et al. 2022, "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale" (absmax int8 with
  per-row activation and per-column weight scales, int32 accumulation).
- Xiao et al. 2023, "SmoothQuant" (W8A8 with dynamic per-token activation scales and per-channel weight scales).
- The Triton matrix multiplication tutorial (grouped program ordering, pointer-arithmetic tiles, a masked K loop).

Layout: @triton.jit kernel -> launcher (configs from `matmul.matmul_configs`) -> public functions and `plan`.
Legend: M rows of activations (tokens), N output features, K input features.
"""
from __future__ import annotations  # kernel annotations stay strings: the module imports without triton

import torch

from .cpu import INT_MM_MAX_K, int8_matmul_cpu, int8_matmul_int32_cpu
from .device import arch_of, backend_of, cdiv, tl, triton
from .matmul import DECODE_MAX_M, ab_tiles, launch, m_bucket, matmul_configs
from .reference import _need, check_int8_matmul_args, check_out_dtype
from .reference import int8_matmul as int8_matmul_reference, int8_matmul_int32 as int8_matmul_int32_reference

__all__ = ["int8_matmul", "int8_matmul_int32", "plan"]


# ======================================================================================================================
# Kernel
# ======================================================================================================================
@triton.jit
def _int8_matmul_kernel(a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr,
                        M, N, K,
                        stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
                        M_KEY,  # power-of-two bucket of M: unused here, it keys the autotuner
                        HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C tile (BLOCK_M, BLOCK_N) = A (M, K) int8 @ B (N, K)^T int8 in int32; EPILOGUE: * a_scale[m] * b_scale[n]
    (+ bias[n]) in fp32, stored in C's dtype; else the int32 accumulator is stored."""
    offs_m, offs_n, rm, rn, a_ptrs, b_ptrs = ab_tiles(a_ptr, b_ptr, M, N, stride_am, stride_ak, stride_bn, stride_bk,
                                                      BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0  # the K tail is masked with 0, which adds nothing to an integer dot
        a = tl.load(a_ptrs, mask=k_mask[None, :], other=0)
        b = tl.load(b_ptrs, mask=k_mask[:, None], other=0)
        # int8 x int8 -> int32: exact (|acc| <= K * 2**14 < 2**31 for K < 131072). out_dtype is named: triton 3.6
        # rejects the int32 accumulator without it
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn  # M*N can pass 2^31
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if EPILOGUE:
        a_s = tl.load(a_scale_ptr + rm)  # (BLOCK_M,) float32
        b_s = tl.load(b_scale_ptr + rn)  # (BLOCK_N,) float32
        out = acc.to(tl.float32) * a_s[:, None] * b_s[None, :]  # the reference's order of operations
        if HAS_BIAS:
            out += tl.load(bias_ptr + rn).to(tl.float32)[None, :]
        tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=c_mask)
    else:
        tl.store(c_ptrs, acc, mask=c_mask)


# ======================================================================================================================
# Launcher
# ======================================================================================================================
def _kind(M: int) -> str:
    return "w8a8_decode" if M <= DECODE_MAX_M else "w8a8"


def _launch_int8_matmul(a, b, a_scale, b_scale, bias, out_dtype, epilogue: bool):
    M, K = a.shape
    N = b.shape[0]
    cands = matmul_configs(_kind(M), arch_of(a.device))
    # interpreter: fp32 -> bf16 stores truncate there, so bf16 is stored as fp32 and rounded by torch
    store_dtype = torch.int32 if not epilogue else (
        torch.float32 if out_dtype == torch.bfloat16 and a.device.type == "cpu" else out_dtype)
    c = torch.empty((M, N), device=a.device, dtype=store_dtype)
    if M == 0 or N == 0:
        return c.to(out_dtype) if epilogue else c
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    a_scale = a_scale if epilogue else c  # dummy pointers when unused
    b_scale = b_scale if epilogue else c
    launch(_int8_matmul_kernel, grid, cands, ("N", "K", "HAS_BIAS", "EPILOGUE", "M_KEY"),
           a, b, c, a_scale, b_scale, bias if bias is not None else c,
           M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1), m_bucket(M),
           HAS_BIAS=bias is not None, EPILOGUE=epilogue)
    return c if not epilogue else c.to(out_dtype)


# ======================================================================================================================
# Public API
# ======================================================================================================================
def int8_matmul(a, b, a_scale, b_scale, bias=None, out_dtype=torch.float32):
    """(a @ b.T) * a_scale[:, None] * b_scale[None, :] (+ bias) with exact int32 accumulation (API.md).
    a int8 (M, K), b int8 (N, K), a_scale float32 (M,), b_scale float32 (N,), bias (N,) any float dtype."""
    check_int8_matmul_args(a, b, a_scale, b_scale, bias)
    check_out_dtype(out_dtype)
    if bias is not None:
        _need(bias.is_floating_point(), lambda: f"bias must be a float tensor, got {bias.dtype}", TypeError)
    if backend_of(a, "tinyformer.kernels.int8_matmul") == "triton":
        return _launch_int8_matmul(a, b, a_scale, b_scale, bias, out_dtype, epilogue=True)
    if a.device.type == "cpu":
        return int8_matmul_cpu(a, b, a_scale, b_scale, bias, out_dtype)
    return int8_matmul_reference(a, b, a_scale, b_scale, bias, out_dtype)


def int8_matmul_int32(a, b):
    """The exact int32 accumulator a @ b.T of int8 a (M, K) and b (N, K) (the kernel with its epilogue off)."""
    rows = lambda t: t.shape[0] if isinstance(t, torch.Tensor) and t.dim() >= 1 else 0  # noqa: E731
    dev = a.device if isinstance(a, torch.Tensor) else "cpu"
    M, N, K = check_int8_matmul_args(a, b, torch.ones(rows(a), device=dev), torch.ones(rows(b), device=dev))
    _need(K < INT_MM_MAX_K, lambda: f"K={K} could overflow the int32 accumulator (K must be < {INT_MM_MAX_K})")
    if backend_of(a, "tinyformer.kernels.int8_matmul") == "triton":
        return _launch_int8_matmul(a, b, None, None, None, None, epilogue=False)
    if a.device.type == "cpu":
        return int8_matmul_int32_cpu(a, b)
    return int8_matmul_int32_reference(a, b).to(torch.int32)


def plan(M: int, N: int, K: int, device="cpu") -> dict:
    """Which path an int8_matmul call of this shape takes (for benchmarks and debugging): backend, kind, config."""
    device = torch.device(device)
    if backend_of(torch.empty(0, device=device), "tinyformer.kernels.int8_matmul") != "triton":
        return dict(backend="torch", kind="cpu", config=None, splits=1)
    return dict(backend="triton", kind=_kind(M), config=matmul_configs(_kind(M), arch_of(device))[0], splits=1)
