"""Weight-only int4 matmul in Triton (asymmetric, group-wise, two codes per byte).

`int4_matmul(x, w_packed, scales, zeros, group_size, bias=None)` (contract in docs/API.md; reference
`tinyformer.kernels.reference.int4_matmul`): x float (M, K) @ w.T (+ bias), in x's dtype, where
w[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G] and w_packed uint8 (N, K // 2) holds code k = 2j in the low
nibble and k = 2j + 1 in the high nibble of byte j.

Rounding, the same at every M for power-of-two groups >= 32 (a K tile then lies in one group): the exact integer
codes multiply x, the products are summed over the tile in fp32, and the group's scale and zero act on that partial
sum, acc += s * (sum_k q x - z * sum_k x) (GemLite); the dequantized weight is never rounded. Other group sizes
dequantize each weight, (q - zero) * scale in fp32 (the reference's formula), round it once to the dot dtype and feed
one tl.dot, at every M.

Four paths, three layouts:
- one row (M = 1, a decode step), power-of-two groups >= 32: `_int4_gemv_kernel` on the CUDA cores over the weight
  repacked once into GemLite's GEMV layout (`Int4Gemv`: int32 (K / 8, N), N contiguous, so one 16-byte load brings
  4 columns x 8 codes; scales and zeros group-major (K / G, N)); codes become floats by OR-ing them into a float's
  mantissa (no int -> float conversion), about 4.3 SASS instructions per weight (the AOT report checks <= 5); split-K
  is reduced inside the same launch (the last split of a column tile to finish sums the partials).
- decode (up to 16 rows, and one row with other group sizes): 16-row tensor-core tiles on the API layout (uint8
  (N, K / 2)), split-K over whole groups, fp32 partials summed afterwards.
- prefill (M > 16), power-of-two groups >= 32: `_int4_prefill_kernel` over the weight repacked once into the K-plane
  layout (`Int4Prefill`: in each chunk of 64 columns, byte j of a row holds column j in its low nibble and column
  32 + j in its high nibble). It computes out^T tiles, acc (BLOCK_N, BLOCK_M) = codes @ x^T, so the weight is the
  MMA's left operand, made in registers from the loaded bytes (one mask or one shift a plane: no join, permute or
  reshape), and x^T the right operand from shared memory (sm_90's wgmma takes only its left operand from
  registers, "HGMMA:RS" in the AOT report); the token tile is the MMA's N side, so it can be 128 or 256 rows wide.
  The dequantized weight never round-trips through shared memory (the packed bytes do, in the cp.async pipeline).
  Codes become fp16/bf16 by OR-ing them into a float's mantissa; z * sum_k x reads sums of x over each 32 columns,
  made once per call (`plane_sums`). With G = 32 the two planes of a tile are two groups, each scaled on its own.
- prefill with other group sizes: 64/128-row tensor-core tiles on the API layout, the whole epilogue in the kernel.
The API-layout tensor-core kernel reads the packed bytes of a K tile as (BLOCK_K / 2, BLOCK_N): low nibbles are the
even columns, high nibbles the odd ones, interleaved back into one (BLOCK_K, BLOCK_N) tile (join + permute + reshape)
so the activation loads stay contiguous. When K is a whole number of K tiles (EVEN_K: always for power-of-two groups
>= 32) the loads carry no mask: a mask along k makes ptxas emit one-byte loads of the weight.

Dispatch: CUDA tensors, and CPU tensors under TRITON_INTERPRET=1 set before import -> the Triton kernels; other CPU
tensors -> torch's packed int4 kernel on a weight repacked once (`cpu.int4_matmul_cpu`, bf16 accuracy); fp64 and
other devices -> the reference.

References:
- Frantar et al. 2022, "GPTQ" and Lin et al. 2023, "AWQ": asymmetric group-wise 4-bit weights with per-group scales
  and integer zero points, dequantized on the fly in weight-only kernels.
- The Triton matrix multiplication tutorial (grouped ordering, pointer-arithmetic tiles, masked K loop).
- Frantar et al. 2024, "MARLIN" (the batch-1 target: ~4x over fp16 is the bandwidth limit of 4-bit weights; codes
  turned into floats by OR-ing them into a float's mantissa; the weight repacked offline so that a thread's loaded
  bytes unpack straight into the registers of the MMA's weight operand).
- GemLite (mobiusml/gemlite): the GEMV layout (codes packed along K into int32 words, N contiguous) and the group
  scaling of integer-code partial sums.

Layout: @triton.jit kernels -> launcher (configs from `matmul.matmul_configs`, block_k capped at the group size) ->
public function and `plan`. Each repacked layout is made once per weight (`cpu.prepared`) and kept beside it.
Legend: M rows of activations, N output features, K input features, G group size, S number of K splits.
"""
from __future__ import annotations  # kernel annotations stay strings: the module imports without triton

import dataclasses
import math
from typing import List, NamedTuple

import torch

from .cpu import int4_matmul_cpu, prepared
from .device import arch_of, backend_of, cdiv, tl, triton
from .matmul import (DECODE_MAX_M, MatmulConfig, dot_flags, finish_splits, launch, matmul_configs, out_buffer_dtype,
                     m_bucket, split_k, store_tile, tile_ids, with_input_grad)
from .reference import _need, check_int4_matmul_args, int4_matmul as int4_matmul_reference, int4_matmul_backward, \
    unpack_int4

__all__ = ["int4_matmul", "plan"]


# ======================================================================================================================
# Kernel
# ======================================================================================================================
@triton.jit
def _int4_matmul_kernel(x_ptr, w_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr,
                        M, N, K,
                        stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_zn, stride_zg,
                        stride_os, stride_om, stride_on,
                        K_SPLIT, M_KEY,  # power-of-two bucket of M: unused here, it keys the autotuner
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
    # rows/columns past M/N wrap around (in-bounds loads, dropped by the store mask); 64-bit row offsets: M*K and
    # N*K/2 can pass 2^31
    rm = (offs_m % M).to(tl.int64)
    rn = (offs_n % N).to(tl.int64)
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
        if GROUP_SIZE % BLOCK_K == 0:
            # the tile lies in group k // G: the exact codes go through the MMA and the group's scale and zero act on
            # its fp32 partial, s * (sum q x - z * sum x): the one-row kernel's rounding, so every M rounds alike
            g = k // GROUP_SIZE
            s = tl.load(scales_ptr + rn * stride_sn + g * stride_sg).to(tl.float32)[None, :]  # (1, BLOCK_N)
            z = tl.load(zeros_ptr + rn * stride_zn + g * stride_zg).to(tl.float32)[None, :]
            q = tl.join(packed & 0xF, packed >> 4)  # (BLOCK_K / 2, BLOCK_N, 2): [..., 0] = column 2j, [..., 1] = 2j + 1
            q = tl.reshape(tl.permute(q, (0, 2, 1)), (BLOCK_K, BLOCK_N)).to(DOT_DTYPE)  # codes 0..15: exact
            part = tl.dot(x, q, input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_N) fp32
            acc += s * (part - z * tl.sum(x.to(tl.float32), axis=1)[:, None])
        else:  # groups smaller than the tile (or not dividing it): gather per (column pair, n), dequantize per weight
            g = kk // GROUP_SIZE  # (BLOCK_K / 2,): 2j and 2j + 1 share a group since G is even
            s = tl.load(scales_ptr + rn[None, :] * stride_sn + g[:, None] * stride_sg,
                        mask=k_mask[:, None], other=0.0).to(tl.float32)  # (BLOCK_K / 2, BLOCK_N)
            z = tl.load(zeros_ptr + rn[None, :] * stride_zn + g[:, None] * stride_zg,
                        mask=k_mask[:, None], other=0.0).to(tl.float32)
            # (q - zero) * scale in fp32, the reference's formula, rounded once to the dot dtype; masked rows meet x = 0
            w = tl.join(((packed & 0xF).to(tl.float32) - z) * s, ((packed >> 4).to(tl.float32) - z) * s)
            w = tl.reshape(tl.permute(w, (0, 2, 1)), (BLOCK_K, BLOCK_N)).to(DOT_DTYPE)  # (BLOCK_K, BLOCK_N) = w^T
            acc = tl.dot(x, w, acc, input_precision=DOT_PREC)
    store_tile(acc, out_ptr, bias_ptr, pid_k, offs_m, offs_n, rn, M, N, stride_os, stride_om, stride_on, HAS_BIAS,
               SPLIT_K)


@triton.jit
def _exact_codes(q, DOT_DTYPE: tl.constexpr):
    """uint8 codes 0..15 -> DOT_DTYPE, exactly, with no int -> float conversion (a plain .to() gave one I2F.F16.U16
    a code, a quarter-rate instruction): q OR-ed into the mantissa of 1024.0 (fp16) or 128.0 (bf16), whose ulp is 1,
    is that float plus q, and subtracting the float leaves q: one LOP3 and one HADD2 a pair of codes on sm_90. fp32
    (fp32 activations, and bf16 ones under the interpreter) converts."""
    if DOT_DTYPE == tl.float16:
        return (q.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True) - 1024.0
    elif DOT_DTYPE == tl.bfloat16:
        return (q.to(tl.uint16) | 0x4300).to(tl.bfloat16, bitcast=True) - 128.0
    else:
        return q.to(DOT_DTYPE)


@triton.jit
def _add_group(acc, part, x_sum, s_ptrs, z_ptrs, g, stride_sg, stride_zg):
    """acc + s * (part - z * x_sum) on an out^T tile: part (BLOCK_N, BLOCK_M) = sum_k q x and x_sum (BLOCK_M,) =
    sum_k x over columns of group g, s and z (BLOCK_N,) its scales and zeros."""
    s = tl.load(s_ptrs + g * stride_sg).to(tl.float32)
    z = tl.load(z_ptrs + g * stride_zg).to(tl.float32)
    return acc + s[:, None] * (part - z[:, None] * x_sum[None, :])


@triton.jit
def _int4_prefill_kernel(x_ptr, xs_ptr, w_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr,
                         M, N, K,
                         stride_xm, stride_xk, stride_xsg, stride_xsm, stride_wn, stride_wk, stride_sg, stride_sn,
                         stride_zg, stride_zn, stride_om, stride_on,
                         M_KEY,  # power-of-two bucket of M: unused here, it keys the autotuner
                         GROUP_SIZE: tl.constexpr, PLANE: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                         DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out tile (BLOCK_M, BLOCK_N) = x (M, K) @ dequant(w)^T (+ bias), computed transposed: acc (BLOCK_N, BLOCK_M) =
    codes (BLOCK_N, K) @ x^T (K, BLOCK_M), the weight the left operand of the MMA, made in registers from the loaded
    bytes. w uint8 (N, Kp / 2) in the K-plane layout (`Int4Prefill`): byte c * PLANE + j of a row holds the code of
    column 2c * PLANE + j in its low nibble and of 2c * PLANE + PLANE + j in its high nibble, so a K tile unpacks into
    two (BLOCK_N, BLOCK_K / 2) planes by one mask and one shift, each the left operand of a dot with the x^T rows of
    its columns. xs fp32 (Kp / PLANE, M): the sums of x over each plane's columns, made once per call (`plane_sums`);
    scales and zeros group-major (Kp / G, N); past K all three are zeros. Power-of-two groups >= PLANE; BLOCK_K a
    multiple of 2 * PLANE dividing the group (G >= 2 * PLANE) or equal to 2 * PLANE (G == PLANE: each plane is one
    group)."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # rows/columns past M/N wrap around (in-bounds loads, dropped by the store mask); 64-bit row offsets: M*K and
    # N*K/2 can pass 2^31
    rm = (offs_m % M).to(tl.int64)
    rn = (offs_n % N).to(tl.int64)
    offs_j = tl.arange(0, BLOCK_K // 2)  # byte j of a row's K tile
    col = (offs_j // PLANE) * (2 * PLANE) + offs_j % PLANE  # (BLOCK_K / 2,) low nibble's column; high: col + PLANE
    w_ptrs = w_ptr + rn[:, None] * stride_wn + offs_j[None, :] * stride_wk  # (BLOCK_N, BLOCK_K / 2)
    x_ptrs = x_ptr + col[:, None] * stride_xk + rm[None, :] * stride_xm  # (BLOCK_K / 2, BLOCK_M): x^T, low plane
    xs_ptrs = xs_ptr + rm * stride_xsm  # (BLOCK_M,) the sums of plane 0
    s_ptrs = scales_ptr + rn * stride_sn  # (BLOCK_N,) the scales of group 0
    z_ptrs = zeros_ptr + rn * stride_zn
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # out^T tile
    for k in range(0, K, BLOCK_K):
        packed = tl.load(w_ptrs)  # (BLOCK_N, BLOCK_K / 2) uint8; no mask: the layout pads K to whole chunks
        lo = _exact_codes(packed & 0xF, DOT_DTYPE)  # codes 0..15 of columns k + col: exact
        hi = _exact_codes(packed >> 4, DOT_DTYPE)  # codes of columns k + col + PLANE
        if EVEN_K:  # every tile is whole: no mask, so the loads vectorize
            x_lo = tl.load(x_ptrs).to(DOT_DTYPE)  # (BLOCK_K / 2, BLOCK_M)
            x_hi = tl.load(x_ptrs + PLANE * stride_xk).to(DOT_DTYPE)
        else:  # G == PLANE and K an odd number of planes: the last tile's high plane lies past K
            x_lo = tl.load(x_ptrs, mask=(k + col < K)[:, None], other=0.0).to(DOT_DTYPE)
            x_hi = tl.load(x_ptrs + PLANE * stride_xk, mask=(k + PLANE + col < K)[:, None], other=0.0).to(DOT_DTYPE)
        p = tl.cast(k // PLANE, tl.int64)  # the tile's first plane; 64-bit: times a row stride of xs (M)
        if GROUP_SIZE == PLANE:  # each plane is one group: its partial takes its own scale and zero
            # (a high plane past K has x = 0, x_sum = 0 and s = z = 0: the padding of xs, scales and zeros)
            acc = _add_group(acc, tl.dot(lo, x_lo, input_precision=DOT_PREC), tl.load(xs_ptrs + p * stride_xsg),
                             s_ptrs, z_ptrs, p, stride_sg, stride_zg)
            acc = _add_group(acc, tl.dot(hi, x_hi, input_precision=DOT_PREC), tl.load(xs_ptrs + (p + 1) * stride_xsg),
                             s_ptrs, z_ptrs, p + 1, stride_sg, stride_zg)
        else:  # the tile lies in group k // G: both planes' exact-code sums, then the group's scale and zero once
            part = tl.dot(lo, x_lo, input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M) fp32
            part = tl.dot(hi, x_hi, part, input_precision=DOT_PREC)
            planes = p + tl.arange(0, BLOCK_K // PLANE)  # (BLOCK_K / PLANE,)
            x_sum = tl.sum(tl.load(xs_ptrs[None, :] + planes[:, None] * stride_xsg), axis=0)  # (BLOCK_M,)
            acc = _add_group(acc, part, x_sum, s_ptrs, z_ptrs, tl.cast(k // GROUP_SIZE, tl.int64), stride_sg,
                             stride_zg)
        w_ptrs += (BLOCK_K // 2) * stride_wk
        x_ptrs += BLOCK_K * stride_xk
    # out = acc^T: one split (pid 0 of axis 1), bias added, stored in out's dtype
    store_tile(tl.trans(acc), out_ptr, bias_ptr, tl.program_id(1), offs_m, offs_n, rn, M, N, 0, stride_om, stride_on,
               HAS_BIAS, 1)


@triton.jit
def _code_fma(d, word, MASK: tl.constexpr, magic, OFFSET: tl.constexpr, x):
    """d + q * x[:, None] for the 4-bit codes q at bits MASK of word (below bit 16), with no shift and no int -> float
    conversion: magic is the bit pattern of the float OFFSET = 2^(23 - shift), whose mantissa step is 2^-shift, so
    the bits magic | (q << shift) are the float OFFSET + q exactly. Per code: one LOP3, one FADD, one FFMA."""
    q = ((word & MASK) | magic).to(tl.float32, bitcast=True) - OFFSET
    return d + q * x[:, None]


@triton.jit
def _int4_gemv_kernel(x_ptr, wq_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr, part_ptr, count_ptr,
                      N, K, stride_xk, stride_wk, stride_sg, stride_zg,
                      K_SPLIT, MAGIC,
                      GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One activation row (M = 1) on the CUDA cores, weights in the GEMV layout (`Int4Gemv`): out[n] = sum_k x[k] *
    w[n, k] for BLOCK_N outputs over K columns [pid_k * K_SPLIT, ..). wq int32 (K / 8, N), N contiguous: word (j, n)
    holds the codes of k = 8j + i at bits 4i, so a thread's 4 adjacent columns are one 16-byte load. Each K tile lies
    in one group (BLOCK_K divides G): acc += s * (sum_k q * x - z * sum_k x), with exact integer codes, the scale and
    zero applied once per group. SPLIT_K > 1: each split stores an fp32 partial (S, N), and the last split of a column
    tile to finish (an atomic ticket per tile) sums them in split order, adds the bias, stores out and resets the
    ticket: one launch, deterministic. MAGIC = 0x4B000000 (the float 2^23), a runtime argument: LOP3 takes one
    immediate, and ptxas rematerializes a constant second operand once per code but keeps an argument in a register."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_j = tl.arange(0, BLOCK_K // 8)  # word rows of the tile
    k_begin = pid_k * K_SPLIT
    k_end = tl.minimum(k_begin + K_SPLIT, K)  # whole tiles: K_SPLIT and K are multiples of BLOCK_K
    magic4 = MAGIC - (4 << 23)  # the floats 2^19, 2^15, 2^11: codes at bits 4, 8 and 12
    magic8 = MAGIC - (8 << 23)
    magic12 = MAGIC - (12 << 23)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k in range(k_begin, k_end, BLOCK_K):
        # 64-bit offsets: K/8 * N words can pass 2^31
        w = tl.load(wq_ptr + (k // 8 + offs_j).to(tl.int64)[:, None] * stride_wk + offs_n[None, :],
                    mask=n_ok[None, :], other=0, eviction_policy="evict_first")  # (BLOCK_K / 8, BLOCK_N) int32
        wh = w.to(tl.uint32, bitcast=True) >> 16  # codes 4..7 at bits 0..15 (a logical shift: one SHF)
        x_row = x_ptr + (k + 8 * offs_j) * stride_xk  # (BLOCK_K / 8,): x[8j]; code i of word j multiplies x[8j + i]
        x0 = tl.load(x_row).to(tl.float32)
        x1 = tl.load(x_row + stride_xk).to(tl.float32)
        x2 = tl.load(x_row + 2 * stride_xk).to(tl.float32)
        x3 = tl.load(x_row + 3 * stride_xk).to(tl.float32)
        x4 = tl.load(x_row + 4 * stride_xk).to(tl.float32)
        x5 = tl.load(x_row + 5 * stride_xk).to(tl.float32)
        x6 = tl.load(x_row + 6 * stride_xk).to(tl.float32)
        x7 = tl.load(x_row + 7 * stride_xk).to(tl.float32)
        d = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
        d = _code_fma(d, w, 0xF, MAGIC, 8388608.0, x0)
        d = _code_fma(d, w, 0xF0, magic4, 524288.0, x1)
        d = _code_fma(d, w, 0xF00, magic8, 32768.0, x2)
        d = _code_fma(d, w, 0xF000, magic12, 2048.0, x3)
        d = _code_fma(d, wh, 0xF, MAGIC, 8388608.0, x4)
        d = _code_fma(d, wh, 0xF0, magic4, 524288.0, x5)
        d = _code_fma(d, wh, 0xF00, magic8, 32768.0, x6)
        d = _code_fma(d, wh, 0xF000, magic12, 2048.0, x7)
        dot = tl.sum(d, axis=0)  # (BLOCK_N,) sum_k q * x over the tile, exact codes
        x_sum = tl.sum(((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7)), axis=0)
        g = tl.cast(k // GROUP_SIZE, tl.int64)
        s = tl.load(scales_ptr + g * stride_sg + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        z = tl.load(zeros_ptr + g * stride_zg + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        acc += s * (dot - z * x_sum)
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)
    else:
        tl.store(part_ptr + pid_k.to(tl.int64) * N + offs_n, acc, mask=n_ok)
        tl.debug_barrier()  # every thread's partial is written before the ticket releases them
        ticket = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")
        if ticket == SPLIT_K - 1:  # the last split of this column tile: the others' partials are visible
            total = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for sk in range(0, SPLIT_K):
                total += tl.load(part_ptr + sk * N + offs_n, mask=n_ok, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            tl.store(out_ptr + offs_n, total.to(out_ptr.dtype.element_ty), mask=n_ok)
            tl.atomic_xchg(count_ptr + pid_n, 0)  # the ticket is ready for the next launch


# ======================================================================================================================
# Launcher
# ======================================================================================================================
# The prefill layout's plane width, fixed whatever the autotuner picks: a plane of 32 columns lies in one group for
# every power-of-two G >= 32, and every BLOCK_K that is a multiple of 64 reads whole chunks of two planes, so one
# repack serves every config and group size (a plane as wide as BLOCK_K / 2 would tie the layout to the config).
# 32 columns are two k16 steps of the MMA, and a chunk is 32 bytes of a row: two 16-byte loads.
PLANE = 32
PLANE_GROUP_TILE = 128 * 64  # the largest prefill tile (rows x columns) that does not spill with groups of one plane


def _pow2_group(group_size: int) -> bool:
    return group_size >= 32 and group_size & (group_size - 1) == 0


def int4_kind(M: int, group_size: int = 128) -> str:
    """For power-of-two groups >= 32: i4_gemv (one row: the CUDA-core kernel on the GEMV layout), i4_decode (up to
    16 rows: 16-row tiles, split-K) or i4_prefill (more rows: the swapped-operand kernel on the K-plane layout).
    Other groups: i4_decode up to 16 rows, i4 beyond (the API layout's tiles, each weight dequantized)."""
    if _pow2_group(group_size):
        return "i4_gemv" if M == 1 else "i4_decode" if M <= DECODE_MAX_M else "i4_prefill"
    return "i4_decode" if M <= DECODE_MAX_M else "i4"


def int4_configs(M: int, group_size: int, arch) -> List[MatmulConfig]:
    """Candidates for this call: the table's entries for int4_kind(M, G) with block_k capped at the group size when
    the group is a power of two >= 32 (a tile then never straddles two groups: one scale/zero load per column); the
    prefill kernel's tiles are whole chunks of two planes, so there the cap is max(G, 2 * PLANE), and with groups of
    one plane its tiles are at most PLANE_GROUP_TILE."""
    kind = int4_kind(M, group_size)
    cands = matmul_configs(kind, arch)
    if _pow2_group(group_size):
        cap = max(group_size, 2 * PLANE) if kind == "i4_prefill" else group_size
        cands = [dataclasses.replace(c, block_k=min(c.block_k, cap)) for c in cands]
    if kind == "i4_prefill" and group_size == PLANE:
        # a tile's two planes are two groups: two scaled partials live at once, and 128 x 128 tiles spill 36-120 B
        cands = [c for c in cands if c.block_m * c.block_n <= PLANE_GROUP_TILE]
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


class Int4Gemv(NamedTuple):
    """An int4 weight in the one-row kernel's layout (GemLite's): wq int32 (K / 8, N), N contiguous, word (j, n)
    holding the codes of k = 8j + i at bits 4i; scales and zeros (K / G, N), group-major, N contiguous."""
    wq: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor


def repack_int4_gemv(w_packed, scales, zeros) -> Int4Gemv:
    """The API layout (w_packed uint8 (N, K / 2), scales and zeros (N, K / G)) -> Int4Gemv; K a multiple of 8."""
    N, K = w_packed.shape[0], 2 * w_packed.shape[1]
    _need(K % 8 == 0, lambda: f"the GEMV layout packs 8 codes a word: K must be a multiple of 8, got {K}")
    q = unpack_int4(w_packed).to(torch.int64).reshape(N, K // 8, 8)  # (N, K / 8, 8) codes
    words = (q << (4 * torch.arange(8, device=q.device))).sum(-1)  # (N, K / 8) in [0, 2^32)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)  # the same bits as int32
    return Int4Gemv(words.T.contiguous(), scales.T.contiguous(), zeros.T.contiguous())


def gemv_layout(w_packed, scales, zeros) -> Int4Gemv:
    """The weight's Int4Gemv, repacked on first use and kept while the weight lives unchanged (`cpu.prepared`):
    quantized weights are repacked once, at their first decode step, not per call."""
    return prepared((w_packed, scales, zeros), lambda: repack_int4_gemv(w_packed, scales, zeros), tag="int4_gemv")


class Int4Prefill(NamedTuple):
    """An int4 weight in the prefill kernel's K-plane layout: w uint8 (N, Kp / 2), Kp = K rounded up to a whole chunk
    of 2 * PLANE columns (codes 0 past K); in chunk c, byte c * PLANE + j holds the code of column 2c * PLANE + j in
    its low nibble and of 2c * PLANE + PLANE + j in its high nibble. scales and zeros (Kp / G, N), group-major, zero
    past K (G = 32 with K an odd number of planes: the last tile's high plane adds nothing, and no load needs a
    mask)."""
    w: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor


def repack_int4_prefill(w_packed, scales, zeros) -> Int4Prefill:
    """The API layout (w_packed uint8 (N, K / 2), scales and zeros (N, K / G)) -> Int4Prefill."""
    N, K = w_packed.shape[0], 2 * w_packed.shape[1]
    q = torch.nn.functional.pad(unpack_int4(w_packed), (0, -K % (2 * PLANE)))  # (N, Kp) codes
    q = q.view(N, -1, 2, PLANE)  # (N, Kp / 64, 2, PLANE): [:, c, 0] the low plane of chunk c, [:, c, 1] the high
    w = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(N, -1)  # (N, Kp / 64, PLANE) -> (N, Kp / 2)
    pad = (0, 0, 0, -K % (2 * PLANE) // (K // scales.shape[1]))  # zero groups up to Kp (one, or none)
    return Int4Prefill(w, *(torch.nn.functional.pad(t.T, pad).contiguous() for t in (scales, zeros)))


def prefill_layout(w_packed, scales, zeros) -> Int4Prefill:
    """The weight's Int4Prefill, repacked on first use and kept while the weight lives unchanged (`cpu.prepared`),
    beside its Int4Gemv when it also runs one-row steps."""
    return prepared((w_packed, scales, zeros), lambda: repack_int4_prefill(w_packed, scales, zeros),
                    tag="int4_prefill")


_TICKETS: dict = {}  # device -> int32 counters of the one-row kernel's split-K reduction, zero between launches


def _tickets(device, n: int) -> torch.Tensor:
    """At least n zeroed int32 tickets on device. Every launch leaves them zeroed; launches of the one-row kernel on
    two streams at once would share them."""
    t = _TICKETS.get(str(device))
    if t is None or t.numel() < n:
        t = _TICKETS[str(device)] = torch.zeros(max(n, 1024), device=device, dtype=torch.int32)
    return t


def _launch_gemv(x, g: Int4Gemv, group_size, bias, cands):
    """x (1, K) @ w.T (+ bias) -> (1, N) in x's dtype, in one launch of the one-row kernel."""
    K, N = x.shape[1], g.wq.shape[1]
    splits, k_split = int4_splits(1, N, K, group_size, cands, x.device)
    out = torch.empty((1, N), device=x.device, dtype=out_buffer_dtype(x.dtype, x.device, 1))
    part = torch.empty((splits, N), device=x.device, dtype=torch.float32) if splits > 1 else out  # (S, N) partials
    tickets = _tickets(x.device, cdiv(N, min(c.block_n for c in cands)))
    grid = lambda meta: (cdiv(N, meta["BLOCK_N"]), splits)  # noqa: E731
    launch(_int4_gemv_kernel, grid, cands, ("N", "K", "GROUP_SIZE", "HAS_BIAS", "SPLIT_K"),
           x, g.wq, g.scales, g.zeros, bias if bias is not None else g.scales, out, part, tickets,
           N, K, x.stride(1), g.wq.stride(0), g.scales.stride(0), g.zeros.stride(0), k_split, 0x4B000000,
           GROUP_SIZE=group_size, HAS_BIAS=bias is not None, SPLIT_K=splits)
    return out.to(x.dtype)


def plane_sums(x):
    """(Kp / PLANE, M) fp32: the sums of x (M, K) over each plane's PLANE columns, which the prefill kernel's zero
    points multiply (z * sum_k x), made once per call and read as a few rows a tile: summing the activation tile in
    every program took ~90 SASS instructions a tile per thread on sm_90 and made the 256-row tiles spill."""
    M, K = x.shape
    sums = x.T.reshape(K // PLANE, PLANE, M).sum(1, dtype=torch.float32)  # (K, M) -> (K / PLANE, PLANE, M) -> sums
    if K % (2 * PLANE):  # an odd number of planes: a zero row for the last tile's high plane
        sums = torch.nn.functional.pad(sums, (0, 0, 0, 1))  # (Kp / PLANE, M)
    return sums


def _launch_prefill(x, p: Int4Prefill, group_size, bias, cands):
    """x (M, K) @ w.T (+ bias) -> (M, N) in x's dtype: the plane sums of x, then one launch of the prefill kernel."""
    M, K = x.shape
    N = p.w.shape[0]
    xs = plane_sums(x)  # (K / PLANE, M)
    out = torch.empty((M, N), device=x.device, dtype=out_buffer_dtype(x.dtype, x.device, 1))
    dot_dtype, dot_prec = dot_flags(x.dtype, x.device)
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]), 1)  # noqa: E731
    launch(_int4_prefill_kernel, grid, cands, ("N", "K", "GROUP_SIZE", "HAS_BIAS", "M_KEY"),
           x, xs, p.w, p.scales, p.zeros, bias if bias is not None else p.scales, out,
           M, N, K, x.stride(0), x.stride(1), xs.stride(0), xs.stride(1), p.w.stride(0), p.w.stride(1),
           p.scales.stride(0), p.scales.stride(1), p.zeros.stride(0), p.zeros.stride(1), out.stride(0), out.stride(1),
           m_bucket(M), GROUP_SIZE=group_size, PLANE=PLANE, HAS_BIAS=bias is not None,
           EVEN_K=all(K % c.block_k == 0 for c in cands), DOT_DTYPE=dot_dtype, DOT_PREC=dot_prec)
    return out.to(x.dtype)


def _launch_int4(x, w_packed, scales, zeros, group_size, bias):
    M, K = x.shape
    N = w_packed.shape[0]
    if M == 0 or N == 0 or K == 0:
        return int4_matmul_reference(x, w_packed, scales, zeros, group_size, bias)
    cands = int4_configs(M, group_size, arch_of(x.device))
    kind = int4_kind(M, group_size)
    if kind == "i4_gemv":
        return _launch_gemv(x, gemv_layout(w_packed, scales, zeros), group_size, bias, cands)
    if kind == "i4_prefill":
        return _launch_prefill(x, prefill_layout(w_packed, scales, zeros), group_size, bias, cands)
    splits, k_split = int4_splits(M, N, K, group_size, cands, x.device)
    buf = torch.empty((splits, M, N), device=x.device,
                      dtype=out_buffer_dtype(x.dtype, x.device, splits))  # (S, M, N): partials when S > 1
    even_k = all(K % c.block_k == 0 for c in cands)  # then K_SPLIT and K are whole tiles for every candidate
    dot_dtype, dot_prec = dot_flags(x.dtype, x.device)
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]), splits)  # noqa: E731
    launch(_int4_matmul_kernel, grid, cands, ("N", "K", "GROUP_SIZE", "HAS_BIAS", "SPLIT_K", "M_KEY"),
           x, w_packed, scales, zeros, bias if bias is not None else scales, buf,
           M, N, K, x.stride(0), x.stride(1), w_packed.stride(0), w_packed.stride(1),
           scales.stride(0), scales.stride(1), zeros.stride(0), zeros.stride(1),
           buf.stride(0), buf.stride(1), buf.stride(2), k_split, m_bucket(M),
           GROUP_SIZE=group_size, HAS_BIAS=bias is not None, SPLIT_K=splits, EVEN_K=even_k, DOT_DTYPE=dot_dtype,
           DOT_PREC=dot_prec)
    return finish_splits(buf, bias, x.dtype)


# ======================================================================================================================
# Public API
# ======================================================================================================================
def int4_matmul(x, w_packed, scales, zeros, group_size, bias=None):
    """x (M, K) float @ w.T (+ bias) in x's dtype, w[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G] with the
    codes q unpacked from w_packed (N, K // 2) (API.md); differentiable in x (dx = dy @ w, the weight frozen). Triton
    on CUDA and under the interpreter; on plain CPU torch's packed int4 kernel in bf16 (`int4_matmul_cpu`)."""
    check_int4_matmul_args(x, w_packed, scales, zeros, group_size, bias)
    if bias is not None:
        _need(bias.is_floating_point(), lambda: f"bias must be a float tensor, got {bias.dtype}", TypeError)
    if x.dtype == torch.float64:  # the contract covers fp32/fp16/bf16; fp64 takes the reference everywhere
        forward = int4_matmul_reference
    elif backend_of(x, "tinyformer.kernels.int4_matmul") == "triton":
        forward = _launch_int4
    elif x.device.type == "cpu":
        forward = int4_matmul_cpu
    else:
        forward = int4_matmul_reference
    if torch.is_grad_enabled() and x.requires_grad:
        return with_input_grad(x, lambda x: forward(x, w_packed, scales, zeros, group_size, bias),
                               lambda dy: int4_matmul_backward(dy, w_packed, scales, zeros, group_size), bias)
    return forward(x, w_packed, scales, zeros, group_size, bias)


def plan(M: int, N: int, K: int, group_size: int, device="cpu") -> dict:
    """Which path an int4_matmul call takes: backend, kind (i4_gemv / i4_decode / i4_prefill / i4 / cpu), config,
    splits."""
    device = torch.device(device)
    if backend_of(torch.empty(0, device=device), "tinyformer.kernels.int4_matmul") != "triton":
        return dict(backend="torch", kind="cpu", config=None, splits=1)
    cands = int4_configs(M, group_size, arch_of(device))
    splits = int4_splits(M, N, K, group_size, cands, device)[0]
    return dict(backend="triton", kind=int4_kind(M, group_size), config=cands[0], splits=splits)
