"""W4A8 matmul in Triton: int4 weights times int8 (or e4m3) activations on the tensor cores, for prefill.

`w4a8_matmul(a, w_packed, a_scale, scales, zeros, group_size, bias=None, out_dtype=torch.float32)` (reference
`tinyformer.kernels.reference.w4a8_matmul`, which states the exact math): a int8 (M, K) activations quantized per
token (`quantize_per_token`: a_scale float32 (M,)) or float8_e4m3fn ones (`reference.quantize_fp8`, sm_89 and
sm_90: e4m3 tensor cores), the weight in int4_matmul's layout (API.md: w_packed uint8
(N, K // 2) with codes 0..15, scales and zeros (N, K // G)), power-of-two groups G >= 32. Returns
a_scale[m] * sum_g s[n, g] * (sum_{k in g} a q - z[n, g] * sum_{k in g} a) (+ bias) in out_dtype.

Why: int4 weight-only prefill dequantizes to fp16 and then can at best tie fp16 cuBLAS, since at M >= 512 the product
is tensor-core bound. The codes 0..15 are exact in int8, so the weight tile goes into the int8 MMA as it is (no
dequantization, no float conversion) at twice the fp16 rate, as W8A8 does; the group's scale and zero point act on
the exact int32 partial sum once per group, acc += s_g * (acc_i32 - z_g * rowsum(a)), in fp32.

Per program: an output tile (BLOCK_M, BLOCK_N). The K loop walks spans of SPAN = min(G, MAX_SPAN) columns (a span
lies in one group); within a span, SPAN // BLOCK_K tiles (unrolled) each unpack a (BLOCK_K / 2, BLOCK_N) byte tile
into (BLOCK_K, BLOCK_N) int8 codes (join + permute + reshape, as int4_mm), add dot(a, q) to an int32 accumulator and
the tile's row sums of a to an int32 vector; at the span's end the fp32 accumulator takes s * (acc_i32 - z * rows).
K is a whole number of spans, so no load carries a mask; rows and columns past M and N wrap (in-bounds loads, dropped
by the store mask). Exactness: |acc_i32| <= 127 * 15 * SPAN < 2^24, so its fp32 conversion is exact. With e4m3
activations the codes become e4m3 (0..15 are exact there too), every product a * q is exact in fp32 (4 + 4
significant bits) and the span's sums are fp32, as in the FP8 GEMM.

Dispatch: CUDA tensors (e4m3 activations: sm_89 and later), and CPU tensors under TRITON_INTERPRET=1 set before
import -> the Triton kernel; elsewhere the reference (fp64, exact sums). `ops.int4_linear(..., activations=True)` uses it for prefill (M > 16).

References:
- Lin et al. 2024, "QServe: W4A8KV4 Quantization and System Co-design for Efficient LLM Serving" and Zhang et al.
  2024, "QQQ: Quality Quattuor-Bit Quantization for Large Language Models": W4A8, group-quantized int4 weights on
  int8 tensor cores.
- Xiao et al. 2023, "SmoothQuant" (dynamic per-token int8 activations); Micikevicius et al. 2022, "FP8 Formats for
  Deep Learning" (e4m3); Frantar et al. 2022, "GPTQ" and Lin et al.
  2023, "AWQ" (asymmetric group-wise int4 weights).
- The Triton matrix multiplication tutorial (grouped ordering, pointer-arithmetic tiles).

Layout: @triton.jit kernel -> launcher (configs from `matmul.matmul_configs("w4a8")`, block_k capped at the group
size) -> public function and `plan`.
Legend: M rows of activations (tokens), N output features, K input features, G group size.
"""
from __future__ import annotations  # kernel annotations stay strings: the module imports without triton

import dataclasses
from typing import List

import torch

from .device import arch_of, backend_of, cdiv, tl, triton
from .matmul import MatmulConfig, launch, m_bucket, matmul_configs, tile_ids
from .reference import _need, check_out_dtype, check_w4a8_matmul_args, w4a8_matmul as w4a8_matmul_reference

__all__ = ["w4a8_matmul", "plan", "supports_group"]

MIN_FP8_ARCH = 89  # e4m3 activations: Ada's and Hopper's fp8 tensor cores
MAX_SPAN = 256  # columns per int32 partial: a group larger than this is flushed every MAX_SPAN columns (same result)


# ======================================================================================================================
# Kernel
# ======================================================================================================================
@triton.jit
def _w4a8_matmul_kernel(a_ptr, a_scale_ptr, w_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr,
                        M, N, K,
                        stride_am, stride_ak, stride_wn, stride_wk, stride_sn, stride_sg, stride_zn, stride_zg,
                        stride_om, stride_on,
                        M_KEY,  # power-of-two bucket of M: unused here, it keys the autotuner
                        GROUP_SIZE: tl.constexpr, SPAN: tl.constexpr, HAS_BIAS: tl.constexpr, A_FP8: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out tile (BLOCK_M, BLOCK_N) = a_scale[m] * sum over spans of s * (dot(a, q) - z * rowsum(a)) (+ bias[n]),
    stored in out's dtype. a int8 (M, K), or e4m3 with A_FP8; w uint8 (N, K / 2) packed codes; SPAN a multiple of
    BLOCK_K dividing G."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_j = tl.arange(0, BLOCK_K // 2)  # byte j of the tile holds columns 2j (low nibble) and 2j + 1 (high)
    # rows/columns past M/N wrap around (in-bounds loads, dropped by the store mask); 64-bit row offsets: M*K and
    # N*K/2 can pass 2^31
    rm = (offs_m % M).to(tl.int64)
    rn = (offs_n % N).to(tl.int64)
    a_ptrs = a_ptr + rm[:, None] * stride_am + offs_k[None, :] * stride_ak  # (BLOCK_M, BLOCK_K)
    w_ptrs = w_ptr + offs_j[:, None] * stride_wk + rn[None, :] * stride_wn  # (BLOCK_K / 2, BLOCK_N)
    s_ptrs = scales_ptr + rn * stride_sn  # (BLOCK_N,) the scales of group 0
    z_ptrs = zeros_ptr + rn * stride_zn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, SPAN):
        # sum_k a q and sum_k a over the span: int32 and exact, or fp32 with e4m3 activations
        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32 if A_FP8 else tl.int32)
        rows = tl.zeros((BLOCK_M,), dtype=tl.float32 if A_FP8 else tl.int32)
        for _ in tl.static_range(SPAN // BLOCK_K):
            a = tl.load(a_ptrs)  # (BLOCK_M, BLOCK_K) int8 or e4m3; no mask: K is a whole number of spans
            packed = tl.load(w_ptrs)  # (BLOCK_K / 2, BLOCK_N) uint8
            q = tl.join(packed & 0xF, packed >> 4)  # (BLOCK_K / 2, BLOCK_N, 2): [..., 0] = column 2j, [..., 1] = 2j + 1
            q = tl.reshape(tl.permute(q, (0, 2, 1)), (BLOCK_K, BLOCK_N))  # (BLOCK_K, BLOCK_N) codes 0..15
            if A_FP8:  # the codes are exact in e4m3 (via fp16: no integer -> fp8 conversion)
                part = tl.dot(a, q.to(tl.float16).to(tl.float8e4nv), part)
                rows += tl.sum(a.to(tl.float32), axis=1)
            else:  # and in int8
                part = tl.dot(a, q.to(tl.int8), part, out_dtype=tl.int32)
                rows += tl.sum(a.to(tl.int32), axis=1)
            a_ptrs += BLOCK_K * stride_ak
            w_ptrs += (BLOCK_K // 2) * stride_wk
        g = k0 // GROUP_SIZE
        s = tl.load(s_ptrs + g * stride_sg).to(tl.float32)  # (BLOCK_N,)
        z = tl.load(z_ptrs + g * stride_zg).to(tl.float32)
        acc += s[None, :] * (part.to(tl.float32) - z[None, :] * rows.to(tl.float32)[:, None])
    acc *= tl.load(a_scale_ptr + rm)[:, None]  # the per-token activation scale (BLOCK_M,) fp32
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on  # M*N can pass 2^31
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


# ======================================================================================================================
# Launcher
# ======================================================================================================================
def supports_group(group_size: int) -> bool:
    """The kernel's groups: powers of two >= 32 (a K tile of 32 or more then lies in one group)."""
    return isinstance(group_size, int) and group_size >= 32 and group_size & (group_size - 1) == 0


def w4a8_kind(a_dtype) -> str:
    """The configs.csv kind of the activations: "w4a8" (int8) or "w4a8_e4m3"."""
    return "w4a8_e4m3" if a_dtype == torch.float8_e4m3fn else "w4a8"


def w4a8_configs(group_size: int, arch, kind: str = "w4a8") -> List[MatmulConfig]:
    """Candidates from configs.csv (kind "w4a8" or "w4a8_e4m3"), block_k capped at the group size."""
    cands = [dataclasses.replace(c, block_k=min(c.block_k, group_size)) for c in matmul_configs(kind, arch)]
    return list(dict.fromkeys(cands))


def _launch_w4a8(a, w_packed, a_scale, scales, zeros, group_size, bias, out_dtype):
    M, K = a.shape
    N = w_packed.shape[0]
    # interpreter: fp32 -> bf16 stores truncate there, so bf16 is stored as fp32 and rounded by torch
    store = torch.float32 if out_dtype == torch.bfloat16 and a.device.type == "cpu" else out_dtype
    out = torch.empty((M, N), device=a.device, dtype=store)
    cands = w4a8_configs(group_size, arch_of(a.device), w4a8_kind(a.dtype))
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    launch(_w4a8_matmul_kernel, grid, cands, ("N", "K", "GROUP_SIZE", "HAS_BIAS", "A_FP8", "M_KEY"),
           a, a_scale, w_packed, scales, zeros, bias if bias is not None else scales, out,
           M, N, K, a.stride(0), a.stride(1), w_packed.stride(0), w_packed.stride(1),
           scales.stride(0), scales.stride(1), zeros.stride(0), zeros.stride(1), out.stride(0), out.stride(1),
           m_bucket(M), GROUP_SIZE=group_size, SPAN=min(group_size, MAX_SPAN), HAS_BIAS=bias is not None,
           A_FP8=a.dtype == torch.float8_e4m3fn)
    return out.to(out_dtype)


# ======================================================================================================================
# Public API
# ======================================================================================================================
def _triton_runs(a) -> bool:
    if backend_of(a, "tinyformer.kernels.w4a8_matmul") != "triton":
        return False
    return a.dtype == torch.int8 or a.device.type == "cpu" or arch_of(a.device) >= MIN_FP8_ARCH


def w4a8_matmul(a, w_packed, a_scale, scales, zeros, group_size, bias=None, out_dtype=torch.float32):
    """int8 activations a (M, K) with per-token scales a_scale (M,) float32 (`quantize_per_token`), or e4m3 ones
    (`reference.quantize_fp8`), times the int4 weight (w_packed (N, K // 2), scales and zeros (N, K // G),
    int4_matmul's layout), power-of-two groups >= 32: (a * a_scale[:, None]) @ dequant(w).T (+ bias) in out_dtype,
    the group sums exact in int32 (e4m3: fp32 sums of exact products; reference `w4a8_matmul`)."""
    _need(supports_group(group_size), lambda: f"group_size must be a power of two >= 32, got {group_size!r}")
    check_w4a8_matmul_args(a, w_packed, a_scale, scales, zeros, group_size, bias)
    check_out_dtype(out_dtype)
    if bias is not None:
        _need(bias.is_floating_point(), lambda: f"bias must be a float tensor, got {bias.dtype}", TypeError)
    if not _triton_runs(a) or 0 in a.shape or w_packed.shape[0] == 0:
        return w4a8_matmul_reference(a, w_packed, a_scale, scales, zeros, group_size, bias, out_dtype)
    return _launch_w4a8(a, w_packed, a_scale, scales, zeros, group_size, bias, out_dtype)


def plan(M: int, N: int, K: int, group_size: int, device="cpu", a_dtype=torch.int8) -> dict:
    """Which path a w4a8_matmul call of this shape takes (for benchmarks and debugging): backend, kind, config."""
    device = torch.device(device)
    if not _triton_runs(torch.empty(0, device=device, dtype=a_dtype)):
        return dict(backend="torch", kind="reference", config=None, splits=1)
    kind = w4a8_kind(a_dtype)
    return dict(backend="triton", kind=kind, config=w4a8_configs(group_size, arch_of(device), kind)[0], splits=1)
