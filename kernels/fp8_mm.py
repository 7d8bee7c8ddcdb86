"""FP8 (e4m3) matmul in Triton: e4m3 x e4m3 on the tensor cores with fp32 accumulation, per-row and per-column
scales applied in a fused epilogue.

`fp8_matmul(a, b, a_scale, b_scale, bias=None, out_dtype=torch.bfloat16)` (reference
`tinyformer.kernels.reference.fp8_matmul`): (a @ b.T) * a_scale[:, None] * b_scale[None, :] (+ bias), a
float8_e4m3fn (M, K) activations quantized per row (`reference.quantize_fp8`), b float8_e4m3fn (N, K) weight (the
nn.Linear layout, K contiguous: the K-major B operand that Hopper's fp8 wgmma takes), float32 scales. On sm_90 the
dot compiles to QGMMA (wgmma), on sm_89 (Ada) to QMMA (mma.sync) (the AOT report shows both).

Dispatch: CUDA tensors on sm_89+, and CPU tensors under TRITON_INTERPRET=1 set before import -> the Triton kernel;
everything else (older GPUs, plain CPU) -> the reference, which upcasts to fp32.

References:
- Micikevicius et al. 2022, "FP8 Formats for Deep Learning" (e4m3: 4 exponent bits, 3 mantissa bits, max 448).
- The Triton matrix multiplication tutorial (grouped ordering, pointer-arithmetic tiles, masked K loop) and its fp8
  path; torch._scaled_mm (the same scaled product, the benchmark anchor on the GPU).

Layout: @triton.jit kernel -> launcher (configs from `matmul.matmul_configs("fp8")`: on sm_89 the sm80 table's fp8
rows, which exist for Ada alone, sm_80 and sm_86 having no fp8 tensor cores) -> public function and `plan`.
Legend: M rows of activations (tokens), N output features, K input features.
"""
from __future__ import annotations  # kernel annotations stay strings: the module imports without triton

import torch

from .device import arch_of, backend_of, cdiv, tl, triton
from .matmul import ab_tiles, launch, m_bucket, matmul_configs
from .reference import _need, check_int8_matmul_args, check_out_dtype, fp8_matmul as fp8_matmul_reference

__all__ = ["fp8_matmul", "plan"]

MIN_ARCH = 89  # the Triton path: e4m3 tensor cores, Ada's mma.sync (the sm80 table's fp8 rows) and Hopper's wgmma


# ======================================================================================================================
# Kernel
# ======================================================================================================================
@triton.jit
def _fp8_matmul_kernel(a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr,
                       M, N, K,
                       stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
                       M_KEY,  # power-of-two bucket of M: unused here, it keys the autotuner
                       HAS_BIAS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C tile (BLOCK_M, BLOCK_N) = (A (M, K) e4m3 @ B (N, K)^T e4m3) in fp32 * a_scale[m] * b_scale[n] (+ bias[n]),
    stored in C's dtype."""
    offs_m, offs_n, rm, rn, a_ptrs, b_ptrs = ab_tiles(a_ptr, b_ptr, M, N, stride_am, stride_ak, stride_bn, stride_bk,
                                                      BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)  # B^T tile: K-major
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0  # the K tail is masked with 0, which adds nothing
        a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None], other=0.0)
        acc = tl.dot(a, b, acc)  # e4m3 x e4m3 products are exact in fp32
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    out = acc * tl.load(a_scale_ptr + rm)[:, None] * tl.load(b_scale_ptr + rn)[None, :]  # the reference's order
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn  # M*N can pass 2^31
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


# ======================================================================================================================
# Launcher
# ======================================================================================================================
def _launch_fp8(a, b, a_scale, b_scale, bias, out_dtype):
    M, K = a.shape
    N = b.shape[0]
    # interpreter: fp32 -> bf16 stores truncate there, so bf16 is stored as fp32 and rounded by torch
    store = torch.float32 if out_dtype == torch.bfloat16 and a.device.type == "cpu" else out_dtype
    c = torch.empty((M, N), device=a.device, dtype=store)
    if M == 0 or N == 0:
        return c.to(out_dtype)
    cands = matmul_configs("fp8", arch_of(a.device))
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    launch(_fp8_matmul_kernel, grid, cands, ("N", "K", "HAS_BIAS", "M_KEY"),
           a, b, c, a_scale, b_scale, bias if bias is not None else a_scale,
           M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1), m_bucket(M),
           HAS_BIAS=bias is not None)
    return c.to(out_dtype)


def _triton_runs(a) -> bool:
    if backend_of(a, "tinyformer.kernels.fp8_matmul") != "triton":
        return False
    return a.device.type == "cpu" or arch_of(a.device) >= MIN_ARCH


# ======================================================================================================================
# Public API
# ======================================================================================================================
def fp8_matmul(a, b, a_scale, b_scale, bias=None, out_dtype=torch.bfloat16):
    """(a @ b.T) * a_scale[:, None] * b_scale[None, :] (+ bias) in out_dtype with fp32 accumulation. a
    float8_e4m3fn (M, K), b float8_e4m3fn (N, K), a_scale float32 (M,), b_scale float32 (N,), bias (N,) float."""
    check_int8_matmul_args(a, b, a_scale, b_scale, bias, dtype=torch.float8_e4m3fn)
    check_out_dtype(out_dtype)
    if bias is not None:
        _need(bias.is_floating_point(), lambda: f"bias must be a float tensor, got {bias.dtype}", TypeError)
    if _triton_runs(a):
        return _launch_fp8(a, b, a_scale, b_scale, bias, out_dtype)
    return fp8_matmul_reference(a, b, a_scale, b_scale, bias, out_dtype)


def plan(M: int, N: int, K: int, device="cpu") -> dict:
    """Which path an fp8_matmul call of this shape takes: backend, kind, config."""
    device = torch.device(device)
    if not _triton_runs(torch.empty(0, device=device)):
        return dict(backend="torch", kind="reference", config=None, splits=1)
    return dict(backend="triton", kind="fp8", config=matmul_configs("fp8", arch_of(device))[0], splits=1)
