"""Weight-only int4 matmul in Triton (asymmetric, group-wise, two codes per byte).

`int4_matmul(x, w_packed, scales, zeros, group_size, bias=None)` (contract in docs/API.md; reference
`tinyformer.kernels.reference.int4_matmul`): x float (M, K) @ w.T (+ bias), in x's dtype, where
w[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G] and w_packed uint8 (N, K // 2) holds code k = 2j in the low
nibble and k = 2j + 1 in the high nibble of byte j.

How the kernel reads the weight: a K tile of BLOCK_K codes is BLOCK_K / 2 bytes per output column. The low nibbles
(`packed & 0xF`) are the even columns and the high nibbles (`packed >> 4`) the odd ones; both nibbles of a byte share
one group (G is even), so one scale/zero load serves both. Each half is dequantized, (q - zero) * scale in fp32 (the
reference's formula), then the halves are interleaved back into one (BLOCK_K, BLOCK_N) tile (join + permute +
reshape), rounded once to the dot dtype (fp16 / bf16 on the GPU; fp32 for fp32 activations, and for bf16 under the
interpreter, which computes bf16 on raw bits) and fed to ONE tl.dot with the contiguous activation tile; fp32
accumulation. The interleave keeps the activation loads contiguous: two half-depth dots against the even and odd
activation columns would need strided loads, which ptxas cannot pipeline as copies, and spill on sm_80.

Three paths, two kernels: one row (M = 1, a decode step): `_int4_gemv_kernel` on the CUDA cores, BLOCK_N outputs
per program, split-K when the outputs alone leave the GPU idle; decode (2 <= M <= 16): 16-row tensor-core tiles
and split-K (each program takes a range of whole groups; fp32 partials are summed afterwards), so a few tokens
still spread over the GPU instead of wasting a 64-row tile on a few programs; prefill (M > 16): 64/128-row tiles on
the tensor cores, the whole epilogue in the kernel. When K is a whole number of K tiles (EVEN_K: always for
power-of-two groups >= 32) the loads carry no mask: a mask along k makes ptxas emit one-byte loads of the weight.

Dispatch: CUDA tensors, and CPU tensors under TRITON_INTERPRET=1 set before import -> the Triton kernels; other CPU
tensors -> torch's packed int4 kernel on a weight repacked once (`cpu.int4_matmul_cpu`, bf16 accuracy); fp64 and
other devices -> the reference.

References:
- Frantar et al. 2022, "GPTQ" and Lin et al. 2023, "AWQ": asymmetric group-wise 4-bit weights with per-group scales
  and integer zero points, dequantized on the fly in weight-only kernels.
- The Triton matrix multiplication tutorial (grouped ordering, pointer-arithmetic tiles, masked K loop).
- Frantar et al. 2024, "MARLIN" (the batch-1 target: ~4x over fp16 is the bandwidth limit of 4-bit weights).

Layout: @triton.jit kernels -> launcher (configs from `matmul.matmul_configs`, block_k capped at the group size) ->
public function and `plan`.
Legend: M rows of activations, N output features, K input features, G group size, S number of K splits.
"""
from __future__ import annotations  # kernel annotations stay strings: the module imports without triton

import dataclasses
import math
from typing import List

import torch

from .cpu import int4_matmul_cpu
from .device import arch_of, backend_of, cdiv, tl, triton
from .matmul import (DECODE_MAX_M, MatmulConfig, dot_flags, finish_splits, launch, matmul_configs, out_buffer_dtype,
                     split_k, store_tile, tile_ids)
from .reference import _need, check_int4_matmul_args, int4_matmul as int4_matmul_reference

__all__ = ["int4_matmul", "plan"]


# ======================================================================================================================
# Kernel
# ======================================================================================================================
@triton.jit
def _int4_matmul_kernel(x_ptr, w_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr,
                        M, N, K,
                        stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_zn, stride_zg,
                        stride_os, stride_om, stride_on,
                        K_SPLIT,
                        GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
                        DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out tile (BLOCK_M, BLOCK_N) = x (M, K) @ dequant(w)^T over K columns [pid_k * K_SPLIT, min(.. + K_SPLIT, K)).
    SPLIT_K == 1: + bias, stored in out's dtype; SPLIT_K > 1: fp32 partials at out + pid_k * stride_os."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_j = tl.arange(0, BLOCK_K // 2)  # byte j of the tile holds columns 2j (low nibble) and 2j + 1 (high)
    rm = offs_m % M  # rows/columns past M/N wrap around: in-bounds loads, dropped by the store mask
    rn = offs_n % N
    k_begin = pid_k * K_SPLIT
    k_end = tl.minimum(k_begin + K_SPLIT, K)  # even: K is even and K_SPLIT a multiple of BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_begin, k_end, BLOCK_K):
        kk = k + 2 * offs_j  # (BLOCK_K / 2,) even columns; kk + 1 < k_end whenever kk < k_end
        k_mask = kk < k_end
        x_ptrs = x_ptr + rm[:, None] * stride_xm + (k + offs_k)[None, :] * stride_xk  # (BLOCK_M, BLOCK_K)
        w_ptrs = w_ptr + (k // 2 + offs_j)[:, None] * stride_wk + rn[None, :] * stride_wn  # (BLOCK_K / 2, BLOCK_N)
        if EVEN_K:  # every tile is whole: no mask, so the loads vectorize (a mask along k made them byte loads)
            x = tl.load(x_ptrs).to(DOT_DTYPE)
            packed = tl.load(w_ptrs)
        else:
            x = tl.load(x_ptrs, mask=(offs_k < k_end - k)[None, :], other=0.0).to(DOT_DTYPE)
            packed = tl.load(w_ptrs, mask=k_mask[:, None], other=0)  # uint8
        lo = (packed & 0xF).to(tl.float32)  # codes of columns 2j
        hi = (packed >> 4).to(tl.float32)  # codes of columns 2j + 1
        if GROUP_SIZE % BLOCK_K == 0:  # the whole tile lies in group k // G: one scale and zero per column
            g = k // GROUP_SIZE
            s = tl.load(scales_ptr + rn * stride_sn + g * stride_sg).to(tl.float32)[None, :]  # (1, BLOCK_N)
            z = tl.load(zeros_ptr + rn * stride_zn + g * stride_zg).to(tl.float32)[None, :]
        else:  # groups smaller than the tile (or not dividing it): gather per (column pair, n)
            g = kk // GROUP_SIZE  # (BLOCK_K / 2,): 2j and 2j + 1 share a group since G is even
            s = tl.load(scales_ptr + rn[None, :] * stride_sn + g[:, None] * stride_sg,
                        mask=k_mask[:, None], other=0.0).to(tl.float32)  # (BLOCK_K / 2, BLOCK_N)
            z = tl.load(zeros_ptr + rn[None, :] * stride_zn + g[:, None] * stride_zg,
                        mask=k_mask[:, None], other=0.0).to(tl.float32)
        # (q - zero) * scale in fp32, the reference's formula, rounded once to the dot dtype; masked rows meet x = 0
        w = tl.join((lo - z) * s, (hi - z) * s)  # (BLOCK_K / 2, BLOCK_N, 2): [..., 0] = column 2j, [..., 1] = 2j + 1
        w = tl.reshape(tl.permute(w, (0, 2, 1)), (BLOCK_K, BLOCK_N)).to(DOT_DTYPE)  # (BLOCK_K, BLOCK_N) = w^T tile
        acc = tl.dot(x, w, acc, input_precision=DOT_PREC)
    store_tile(acc, out_ptr, bias_ptr, pid_k, offs_m, offs_n, rn, M, N, stride_os, stride_om, stride_on, HAS_BIAS,
               SPLIT_K)


@triton.jit
def _int4_gemv_kernel(x_ptr, w_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr,
                      N, K, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_zn, stride_zg, stride_os,
                      K_SPLIT,
                      GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One activation row (M = 1): out[n] = sum_k x[k] * w[n, k] over K columns [pid_k * K_SPLIT, ..) for BLOCK_N
    outputs, on the CUDA cores (a 16-row tensor-core tile would be 15/16 padding). The packed bytes are read as a
    (BLOCK_N, BLOCK_K / 2) tile along each weight row (contiguous), the even and odd activation columns as two
    vectors, so no interleave is needed: products accumulate elementwise in fp32 and are summed over k once, after
    the loop. SPLIT_K == 1: + bias, stored in out's dtype; SPLIT_K > 1: fp32 partials at out + pid_k * stride_os."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = offs_n % N  # columns past N wrap around: in-bounds loads, dropped by the store mask
    offs_j = tl.arange(0, BLOCK_K // 2)  # byte j of the tile holds columns 2j (low nibble) and 2j + 1 (high)
    k_begin = pid_k * K_SPLIT
    k_end = tl.minimum(k_begin + K_SPLIT, K)
    acc = tl.zeros((BLOCK_N, BLOCK_K // 2), dtype=tl.float32)
    for k in range(k_begin, k_end, BLOCK_K):
        kk = k + 2 * offs_j  # (BLOCK_K / 2,) even columns
        k_mask = kk < k_end
        w_ptrs = w_ptr + rn[:, None] * stride_wn + (k // 2 + offs_j)[None, :] * stride_wk  # (BLOCK_N, BLOCK_K / 2)
        if EVEN_K:  # whole tiles: unmasked, vectorized loads
            xe = tl.load(x_ptr + kk * stride_xk).to(tl.float32)[None, :]  # (1, BLOCK_K / 2)
            xo = tl.load(x_ptr + (kk + 1) * stride_xk).to(tl.float32)[None, :]
            packed = tl.load(w_ptrs)  # uint8
        else:
            xe = tl.load(x_ptr + kk * stride_xk, mask=k_mask, other=0.0).to(tl.float32)[None, :]
            xo = tl.load(x_ptr + (kk + 1) * stride_xk, mask=k_mask, other=0.0).to(tl.float32)[None, :]
            packed = tl.load(w_ptrs, mask=k_mask[None, :], other=0)
        lo = (packed & 0xF).to(tl.float32)
        hi = (packed >> 4).to(tl.float32)
        if GROUP_SIZE % BLOCK_K == 0:  # the whole tile lies in group k // G: one scale and zero per row
            g = k // GROUP_SIZE
            s = tl.load(scales_ptr + rn * stride_sn + g * stride_sg).to(tl.float32)[:, None]  # (BLOCK_N, 1)
            z = tl.load(zeros_ptr + rn * stride_zn + g * stride_zg).to(tl.float32)[:, None]
        else:  # groups smaller than the tile (or not dividing it): gather per (n, column pair)
            g = kk // GROUP_SIZE  # 2j and 2j + 1 share a group since G is even
            s = tl.load(scales_ptr + rn[:, None] * stride_sn + g[None, :] * stride_sg,
                        mask=k_mask[None, :], other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_K / 2)
            z = tl.load(zeros_ptr + rn[:, None] * stride_zn + g[None, :] * stride_zg,
                        mask=k_mask[None, :], other=0.0).to(tl.float32)
        acc += (lo - z) * s * xe + (hi - z) * s * xo  # (q - zero) * scale, the reference's formula; masked x = 0
    out = tl.sum(acc, axis=1)  # (BLOCK_N,)
    if SPLIT_K == 1:
        if HAS_BIAS:
            out += tl.load(bias_ptr + rn).to(tl.float32)
    tl.store(out_ptr + pid_k * stride_os + offs_n, out.to(out_ptr.dtype.element_ty), mask=offs_n < N)


# ======================================================================================================================
# Launcher
# ======================================================================================================================
def int4_kind(M: int) -> str:
    """i4_gemv (one row: the CUDA-core kernel), i4_decode (2-16 rows: 16-row tiles, split-K) or i4 (prefill)."""
    return "i4_gemv" if M == 1 else "i4_decode" if M <= DECODE_MAX_M else "i4"


def int4_configs(M: int, group_size: int, arch) -> List[MatmulConfig]:
    """Candidates for this call: the table's entries for int4_kind(M) with block_k capped at the group size when the
    group is a power of two >= 32 (a tile then never straddles two groups: one scale/zero load per column)."""
    cands = matmul_configs(int4_kind(M), arch)
    if group_size >= 32 and group_size & (group_size - 1) == 0:
        cands = [dataclasses.replace(c, block_k=min(c.block_k, group_size)) for c in cands]
    return list(dict.fromkeys(cands))


def int4_splits(M: int, N: int, K: int, group_size: int, cands: List[MatmulConfig], device) -> tuple:
    """(splits, K_SPLIT) for M <= 16 (prefill: one split). K_SPLIT is a multiple of every candidate's block_k (the
    autotuner may pick any of them; with EVEN_K the tiles carry no mask, so none may cross a split's end) and, when
    a tile fits in a group, of the group size (split ranges are whole groups)."""
    if M > DECODE_MAX_M:
        return 1, K
    c0 = cands[0]
    align = math.lcm(*(c.block_k for c in cands), group_size if group_size % c0.block_k == 0 else 1)
    return split_k(M, N, K, c0, device, align=align)


def _launch_int4(x, w_packed, scales, zeros, group_size, bias):
    M, K = x.shape
    N = w_packed.shape[0]
    if M == 0 or N == 0 or K == 0:
        return int4_matmul_reference(x, w_packed, scales, zeros, group_size, bias)
    cands = int4_configs(M, group_size, arch_of(x.device))
    splits, k_split = int4_splits(M, N, K, group_size, cands, x.device)
    buf = torch.empty((splits, M, N), device=x.device,
                      dtype=out_buffer_dtype(x.dtype, x.device, splits))  # (S, M, N): partials when S > 1
    even_k = all(K % c.block_k == 0 for c in cands)  # then K_SPLIT and K are whole tiles for every candidate
    if int4_kind(M) == "i4_gemv":
        grid = lambda meta: (cdiv(N, meta["BLOCK_N"]), splits)  # noqa: E731
        launch(_int4_gemv_kernel, grid, cands, ("N", "K", "GROUP_SIZE", "HAS_BIAS", "SPLIT_K"),
               x, w_packed, scales, zeros, bias if bias is not None else scales, buf,
               N, K, x.stride(1), w_packed.stride(0), w_packed.stride(1), scales.stride(0), scales.stride(1),
               zeros.stride(0), zeros.stride(1), buf.stride(0), k_split,
               GROUP_SIZE=group_size, HAS_BIAS=bias is not None, SPLIT_K=splits, EVEN_K=even_k)
        return finish_splits(buf, bias, x.dtype)
    dot_dtype, dot_prec = dot_flags(x.dtype, x.device)
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]), splits)  # noqa: E731
    launch(_int4_matmul_kernel, grid, cands, ("N", "K", "GROUP_SIZE", "HAS_BIAS", "SPLIT_K"),
           x, w_packed, scales, zeros, bias if bias is not None else scales, buf,
           M, N, K, x.stride(0), x.stride(1), w_packed.stride(0), w_packed.stride(1),
           scales.stride(0), scales.stride(1), zeros.stride(0), zeros.stride(1),
           buf.stride(0), buf.stride(1), buf.stride(2), k_split,
           GROUP_SIZE=group_size, HAS_BIAS=bias is not None, SPLIT_K=splits, EVEN_K=even_k, DOT_DTYPE=dot_dtype,
           DOT_PREC=dot_prec)
    return finish_splits(buf, bias, x.dtype)


# ======================================================================================================================
# Public API
# ======================================================================================================================
def int4_matmul(x, w_packed, scales, zeros, group_size, bias=None):
    """x (M, K) float @ w.T (+ bias) in x's dtype, w[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G] with the
    codes q unpacked from w_packed (N, K // 2) (API.md). Triton on CUDA and under the interpreter; on plain CPU
    torch's packed int4 kernel in bf16 (`int4_matmul_cpu`)."""
    check_int4_matmul_args(x, w_packed, scales, zeros, group_size, bias)
    if bias is not None:
        _need(bias.is_floating_point(), lambda: f"bias must be a float tensor, got {bias.dtype}", TypeError)
    if x.dtype == torch.float64:  # the contract covers fp32/fp16/bf16; fp64 takes the reference everywhere
        return int4_matmul_reference(x, w_packed, scales, zeros, group_size, bias)
    if backend_of(x, "tinyformer.kernels.int4_matmul") == "triton":
        return _launch_int4(x, w_packed, scales, zeros, group_size, bias)
    if x.device.type == "cpu":
        return int4_matmul_cpu(x, w_packed, scales, zeros, group_size, bias)
    return int4_matmul_reference(x, w_packed, scales, zeros, group_size, bias)


def plan(M: int, N: int, K: int, group_size: int, device="cpu") -> dict:
    """Which path an int4_matmul call takes: backend, kind (i4 / i4_decode / cpu), config, splits."""
    device = torch.device(device)
    if backend_of(torch.empty(0, device=device), "tinyformer.kernels.int4_matmul") != "triton":
        return dict(backend="torch", kind="cpu", config=None, splits=1)
    cands = int4_configs(M, group_size, arch_of(device))
    splits = int4_splits(M, N, K, group_size, cands, device)[0]
    return dict(backend="triton", kind=int4_kind(M), config=cands[0], splits=splits)
