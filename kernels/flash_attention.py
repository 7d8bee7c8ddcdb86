"""Fused attention in Triton: FlashAttention-2 forward and backward, and a split-KV decode path.

`attention(q, k, v, causal=False, scale=None, key_padding_mask=None)` is tinyformer's attention op (contract in
shared/API.md; pure-torch reference `tinyformer.kernels.reference.attention`). It runs Triton kernels on CUDA tensors
and, under TRITON_INTERPRET=1, on CPU tensors; on CPU without the interpreter (and where triton is not installed) it
uses torch's fused SDPA (`reference.sdpa_attention`, the same contract).

References:
- Dao 2023, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning": a Q tile per program
  against streamed K/V tiles with an online softmax; backward recomputes P from the saved log-sum-exp, with the
  preprocess delta = rowsum(dO * O), a dK/dV pass (program per K/V tile) and a dQ pass (program per Q tile).
- Dao, Haziza, Massa, Sizov 2023, "Flash-Decoding for long-context inference": split the KV cache over programs,
  each writes a partial (out, lse), then a combine step rescales and sums them.
- The Triton fused-attention tutorial (triton-lang/triton, python/tutorials/06-fused-attention.py): exp2-domain
  softmax with log2(e) folded into the scale, and splitting the key loop into an unmasked part and a masked part.
- Ainslie et al. 2023 (GQA): query head h reads k/v head h // (Hq // Hkv); repeated K/V are never materialised.

Layout of this file: @triton.jit kernels -> launchers, which take blocks/warps/stages from ONE heuristic
(`kernel_configs`) -> `_FlashAttention` (torch.autograd.Function) -> public `attention`, `plan` and `aot_specs`.

Legend: B batch, Hq query heads, Hkv key/value heads, G = Hq // Hkv (group), Tq query length, Tk key length,
D head dim, BLOCK_D = next power of two >= D (padded lanes are masked), S number of KV splits (decode),
R = B * Hq * Tq rows. Softmax is kept in the log2 domain: s2 = q.k * scale * log2(e), lse2 = log2(sum 2^(s2)).
Rows that see no key (all keys padded, or causal with Tq > Tk) get output 0 and lse2 = +inf, so the backward's
recomputed P = 2^(s2 - lse2) is exactly 0 there (no NaN).
"""
from __future__ import annotations  # kernel annotations stay strings: the module imports without triton

import functools
import math
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import List, Optional

import torch

from .device import HAS_TRITON, INTERPRET, tl, triton  # noqa: F401  (HAS_TRITON: public)
from .device import cdiv, cuda_arch as _cuda_arch, cuda_index as _cuda_index, num_sms as _num_sms
from .reference import check_attention_args, sdpa_attention

LOG2E = 1.4426950408889634

# Which path ran, counted per call: tests assert that the split-KV decode path really was taken.
stats: Counter = Counter()


# ======================================================================================================================
# Triton kernels
# ======================================================================================================================
@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, kb_base,
               stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
               q_pos, offs_d, lo, hi, Tk, causal_off, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
               HAS_KPM: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online softmax over key tiles [lo, hi). q: (BLOCK_M, BLOCK_D); q_pos: (BLOCK_M,) query positions for the
    causal rule key j <= q_pos + causal_off (non-causal calls pass an offset past every key). MASKED adds the
    key-boundary and causal masks: only the last tiles need them, so callers split their loop and the bulk of the
    tiles runs without a select per score."""
    offs_n0 = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < Tk
        if MASKED:
            kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                         mask=d_ok[:, None] & n_ok[None, :], other=0.0)  # (BLOCK_D, BLOCK_N)
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        else:
            kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                         mask=d_ok[:, None], other=0.0)
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                        mask=d_ok[None, :], other=0.0)
        if UPCAST:  # interpreter: bf16 arithmetic is computed on raw bits there, so compute in fp32
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        if HAS_KPM:  # additive key bias (0 attend, -inf padded) fused into the scaling: one FMA per score
            kb = tl.load(kb_base + offs_n * stride_mn, mask=n_ok, other=float("-inf"))
            s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale + kb[None, :]  # (BLOCK_M, BLOCK_N), log2 domain
        else:
            s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale  # (BLOCK_M, BLOCK_N), log2 domain
        if MASKED:
            s = tl.where(n_ok[None, :] & (offs_n[None, :] <= q_pos[:, None] + causal_off), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED or HAS_KPM:  # a row with every key masked so far keeps m = -inf: shift by 0, not by -inf
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, KB,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb, stride_mn,
    Hq, GROUP, Tq, Tk, causal_off, qk_scale,
    TQ_KEY, TK_KEY, CAUSAL_KEY,  # power-of-two buckets of Tq/Tk and causal: unused here, they key the autotuner
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_KPM: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Grid (cdiv(Tq, BLOCK_M), B * Hq). Writes O (B, Hq, Tq, D) and LSE (B, Hq, Tq) fp32 (log2 domain).
    Query i sees keys j <= i + causal_off: Tk - Tq for bottom-right causal, past every key otherwise."""
    pid_m = tl.cdiv(Tq, BLOCK_M) - 1 - tl.program_id(0)  # causal: the last tiles see the most keys, start them first
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    hk = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Tq
    d_ok = offs_d < HEAD_DIM

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    kb_base = KB + b * stride_mb

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = tl.minimum(Tk, start_m + BLOCK_M + causal_off)  # keys past the horizon of the tile's last row: skipped
    # key tiles that are whole and visible to the tile's FIRST row run without masks
    n_full = tl.minimum(Tk, tl.maximum(start_m + causal_off + 1, 0)) // BLOCK_N * BLOCK_N
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, kb_base,
                               stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
                               offs_m, offs_d, 0, n_full, Tk, causal_off, qk_scale,
                               HEAD_DIM, BLOCK_N, False, HAS_KPM, UPCAST, DOT_PREC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, kb_base,
                               stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
                               offs_m, offs_d, n_full, hi, Tk, causal_off, qk_scale,
                               HEAD_DIM, BLOCK_N, True, HAS_KPM, UPCAST, DOT_PREC)

    empty = l_i == 0.0  # the row saw no key: output 0, lse +inf (so the backward's P is 0)
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    tl.store(LSE + pid_bh.to(tl.int64) * Tq + offs_m, lse, mask=m_ok)
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _attn_decode_kernel(
    Q, K, V, OP, LP, KB,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mn,
    Hq, GROUP, Tq, Tk, causal_off, qk_scale, CHUNK, R,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Flash-decoding partials. Grid (S, cdiv(G * Tq, BLOCK_M), B * Hkv). The G query heads of one kv head and their
    Tq positions are packed into the M rows (row r -> head g = r // Tq, position i = r % Tq), so each K/V tile is read
    once per kv head, not once per query head. Split s covers keys [s * CHUNK, (s + 1) * CHUNK), CHUNK a multiple of
    BLOCK_N. Writes OP (S, R, D) fp32 and LP (S, R) fp32 (lse2, -inf for a split with no visible key)."""
    pid_s = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_bh = tl.program_id(2)
    Hkv = Hq // GROUP
    b = (pid_bh // Hkv).to(tl.int64)
    hk = (pid_bh % Hkv).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < GROUP * Tq
    g = rows // Tq
    i = rows % Tq
    h = hk * GROUP + g  # (BLOCK_M,) query head of each row
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + i[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo = pid_s * CHUNK
    hi = tl.minimum(lo + CHUNK, Tk)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K + b * stride_kb + hk * stride_kh,
                               V + b * stride_vb + hk * stride_vh, KB + b * stride_mb,
                               stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
                               i, offs_d, lo, hi, Tk, causal_off, qk_scale,
                               HEAD_DIM, BLOCK_N, True, True, UPCAST, DOT_PREC)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe))
    r = (b * Hq + h) * Tq + i  # (BLOCK_M,) row of (B, Hq, Tq)
    split_base = pid_s.to(tl.int64) * R
    tl.store(LP + split_base + r, lse, mask=row_ok)
    tl.store(OP + (split_base + r)[:, None] * HEAD_DIM + offs_d[None, :], out,
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _attn_decode_combine_kernel(OP, LP, O, S, R,
                                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                                BLOCK_R: tl.constexpr):
    """Grid (cdiv(R, BLOCK_R),). out[r] = sum_s 2^(lse_s - lse) * out_s[r] with lse = log2 sum_s 2^lse_s;
    O is contiguous (R, D) in the output dtype. A row that no split saw gets 0."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < R
    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < S
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    lse = tl.load(LP + offs_s[None, :].to(tl.int64) * R + rows[:, None],
                  mask=r_ok[:, None] & s_ok[None, :], other=float("-inf"))  # (BLOCK_R, BLOCK_S)
    m = tl.max(lse, 1)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m[:, None])  # (BLOCK_R, BLOCK_S), 0 for empty splits
    denom = tl.sum(w, 1)
    denom = tl.where(denom == 0.0, 1.0, denom)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for s in range(0, S):
        w_s = tl.sum(tl.where(offs_s[None, :] == s, w, 0.0), 1)  # (BLOCK_R,) column s of w
        o_s = tl.load(OP + (s * R + rows.to(tl.int64))[:, None] * HEAD_DIM + offs_d[None, :],
                      mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        acc += w_s[:, None] * o_s
    out = acc / denom[:, None]
    tl.store(O + rows.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=r_ok[:, None] & d_ok[None, :])


@triton.jit
def _attn_bwd_preprocess_kernel(O, DO, DELTA,
                                stride_ob, stride_oh, stride_om, stride_od,
                                stride_dob, stride_doh, stride_dom, stride_dod,
                                Hq, Tq,
                                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Grid (cdiv(Tq, BLOCK_M), B * Hq). delta = rowsum(dO * O) in fp32, DELTA (B, Hq, Tq) contiguous."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < Tq)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * Tq + offs_m, tl.sum(o * do, 1), mask=offs_m < Tq)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                    stride_qm, stride_qd, stride_dom, stride_dod,
                    offs_n, offs_d, lo, hi, Tq, causal_off, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
                    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """Accumulate dK, dV of one key tile over query tiles [lo, hi), in transposed form (keys on rows).
    Padded query rows load lse = +inf, so their P is 0; keys past Tk only produce rows that are never stored."""
    d_ok = offs_d < HEAD_DIM
    for start_m in tl.range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < Tq
        q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
        do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                     mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(lse_base + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # (BLOCK_N, BLOCK_M)
        pt = tl.math.exp2(st - lse[None, :])
        if MASKED:
            pt = tl.where(offs_n[:, None] <= offs_m[None, :] + causal_off, pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_D)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_D)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, KB,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_mb, stride_mn,
    Hq, GROUP, Tq, Tk, causal_off, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Grid (cdiv(Tk, BLOCK_N), B * Hkv). One program owns a K/V tile of one kv head and loops over the query tiles
    of all G query heads that share it, so the GQA reduction of dK/dV happens in registers: deterministic, no
    atomics."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    Hkv = Hq // GROUP
    b = (pid_bh // Hkv).to(tl.int64)
    hk = (pid_bh % Hkv).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < Tk
    d_ok = offs_d < HEAD_DIM
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # query i sees key j iff i >= j - causal_off: rows before m_lo see none of this tile's keys; rows from m_full on
    # see all of them (no mask); the tiles in between take the causal mask. Non-causal: m_lo = m_full = 0.
    m_lo = tl.maximum(start_n - causal_off, 0) // BLOCK_M * BLOCK_M
    m_full = tl.maximum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - causal_off, 0), BLOCK_M) * BLOCK_M, m_lo)
    m_mid = tl.minimum(m_full, Tq)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * Hq + h
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_base = LSE + bh * Tq
        delta_base = DELTA + bh * Tq
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                 stride_qm, stride_qd, stride_dom, stride_dod,
                                 offs_n, offs_d, m_lo, m_mid, Tq, causal_off, qk_scale,
                                 HEAD_DIM, BLOCK_M, True, UPCAST, DOT_PREC)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                 stride_qm, stride_qd, stride_dom, stride_dod,
                                 offs_n, offs_d, m_full, Tq, Tq, causal_off, qk_scale,
                                 HEAD_DIM, BLOCK_M, False, UPCAST, DOT_PREC)
    # a padded key (bias -inf) contributes to no row: its dK/dV rows are exactly 0. Read once per program, so no
    # constexpr variant: without a mask KB is a single 0 with zero strides.
    kp = tl.load(KB + b * stride_mb + offs_n * stride_mn, mask=n_ok, other=float("-inf")) == 0.0
    dk = tl.where(kp[:, None], dk, 0.0)
    dv = tl.where(kp[:, None], dv, 0.0)
    dk = dk * sm_scale
    tl.store(DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, kb_base,
                  stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
                  offs_m, offs_d, lo, hi, Tk, causal_off, qk_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                  UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """Accumulate dQ of one query tile over key tiles [lo, hi). The key bias is always read (without a mask: a
    single 0 with zero strides): BLOCK_N floats per tile next to two (BLOCK_N, D) tiles, fused into the scaling
    FMA; measured +3 to +35 registers, no spills, and it halves the dQ binaries to compile."""
    d_ok = offs_d < HEAD_DIM
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Tk
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        # padded keys: bias -inf, so P = 2^(-inf) = 0 there
        kb = tl.load(kb_base + offs_n * stride_mn, mask=n_ok, other=float("-inf"))
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale + kb[None, :]  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:  # n_ok too: a key past Tk has k = 0 but 2^(0 - lse) can overflow, and inf * 0 = NaN
            p = tl.where(n_ok[None, :] & (offs_n[None, :] <= offs_m[:, None] + causal_off), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_D)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KB,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_mb, stride_mn,
    Hq, GROUP, Tq, Tk, causal_off, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Grid (cdiv(Tq, BLOCK_M), B * Hq). One program owns a query tile and streams the key tiles it can see."""
    pid_m = tl.cdiv(Tq, BLOCK_M) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    hk = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Tq
    qd_mask = m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=qd_mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=qd_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * Tq + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * Tq + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    kb_base = KB + b * stride_mb
    hi = tl.minimum(Tk, start_m + BLOCK_M + causal_off)
    n_full = tl.minimum(Tk, tl.maximum(start_m + causal_off + 1, 0)) // BLOCK_N * BLOCK_N
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, kb_base,
                       stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
                       offs_m, offs_d, 0, n_full, Tk, causal_off, qk_scale,
                       HEAD_DIM, BLOCK_N, False, UPCAST, DOT_PREC)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, kb_base,
                       stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
                       offs_m, offs_d, n_full, hi, Tk, causal_off, qk_scale,
                       HEAD_DIM, BLOCK_N, True, UPCAST, DOT_PREC)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=qd_mask)


# ======================================================================================================================
# One heuristic: blocks, warps and stages per kernel, head dim, dtype and GPU generation
# ======================================================================================================================
@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


KERNELS = ("fwd", "decode", "decode_combine", "bwd_preprocess", "bwd_dkdv", "bwd_dq")

# GPU table: (kind, arch family, BLOCK_D[, variant]) -> candidates for fp16/bf16, default first (the only one used
# when autotuning is off, and for decode and backward). Every entry is compiled for sm_80 and sm_90 by
# `python -m tinyformer.kernels.aot`, which reports registers/spills/shared memory; the numbers in the comments are
# its measurements (fp16, triton 3.9 and its bundled ptxas; bf16 gives the same numbers except +-4 registers in the
# preprocess kernel).
_GPU_TABLE = {
    # ---- forward: BLOCK_M x BLOCK_N, warps, stages. A (128, 64) tile on 4 warps spilled 20 B on sm_80 at
    # D=64 (255 regs); on 8 warps it takes 155 regs.
    ("fwd", "sm80", 16): [KernelConfig(128, 64, 4, 3)],  # 163 regs
    ("fwd", "sm80", 32): [KernelConfig(128, 64, 4, 3)],  # 180 regs
    ("fwd", "sm80", 64): [KernelConfig(128, 64, 8, 3), KernelConfig(64, 64, 4, 3)],  # 155 / 156 regs
    ("fwd", "sm80", 128): [KernelConfig(128, 64, 8, 3), KernelConfig(128, 32, 8, 3)],  # 219 (D=80: 226) / 194
    # (128, 64) at D=128 with the key-padding bias: 255 regs + 8 B spills; (128, 32): 200 regs
    ("fwd", "sm80", 128, "kpm"): [KernelConfig(128, 32, 8, 3)],
    # D=256: (64, 64) on 8 warps sat at 255 regs (no spill, no margin), so only (64, 32): 174 regs, 182 with mask
    ("fwd", "sm80", 256): [KernelConfig(64, 32, 8, 2)],
    ("fwd", "sm90", 16): [KernelConfig(128, 64, 4, 3)],  # 165 regs
    ("fwd", "sm90", 32): [KernelConfig(128, 64, 4, 3)],  # 200 regs
    # (128, 64) on 4 warps / 4 stages: 232 regs, 76 B spills with the padding bias; on 8 warps: 115 regs
    ("fwd", "sm90", 64): [KernelConfig(128, 64, 8, 3), KernelConfig(128, 128, 8, 3)],  # 115 / 223 regs
    ("fwd", "sm90", 64, "kpm"): [KernelConfig(128, 64, 8, 3)],  # 210 regs; (128, 128) spills 44 B
    ("fwd", "sm90", 128): [KernelConfig(128, 64, 8, 3), KernelConfig(128, 128, 8, 3)],  # 181 / 250 regs, 224 KB smem
    ("fwd", "sm90", 128, "kpm"): [KernelConfig(128, 64, 8, 3)],  # 239 regs; (128, 128) spills 188 B
    # D=256: (64, 64) on 8 warps spilled 8 B, (128, 32) sat at 255 regs; (64, 32): 204 regs, 223 with mask
    ("fwd", "sm90", 256): [KernelConfig(64, 32, 8, 2)],
    # ---- decode (split-KV); variant = BLOCK_M: 16 rows when G * Tq <= 16, else 64. 93-201 regs, no spills.
    ("decode", "sm80", 16, 16): [KernelConfig(16, 128, 4, 3)],
    ("decode", "sm80", 32, 16): [KernelConfig(16, 128, 4, 3)],
    ("decode", "sm80", 64, 16): [KernelConfig(16, 128, 4, 3)],
    ("decode", "sm80", 128, 16): [KernelConfig(16, 64, 4, 3)],
    ("decode", "sm80", 256, 16): [KernelConfig(16, 32, 4, 3)],
    ("decode", "sm80", 16, 64): [KernelConfig(64, 64, 4, 3)],
    ("decode", "sm80", 32, 64): [KernelConfig(64, 64, 4, 3)],
    ("decode", "sm80", 64, 64): [KernelConfig(64, 64, 4, 3)],
    ("decode", "sm80", 128, 64): [KernelConfig(64, 64, 8, 3)],
    ("decode", "sm80", 256, 64): [KernelConfig(64, 32, 8, 3)],  # (64, 32) on 4 warps spilled 52 B on sm_90
    ("decode", "sm90", 16, 16): [KernelConfig(16, 128, 4, 3)],
    ("decode", "sm90", 32, 16): [KernelConfig(16, 128, 4, 3)],
    ("decode", "sm90", 64, 16): [KernelConfig(16, 128, 4, 3)],
    ("decode", "sm90", 128, 16): [KernelConfig(16, 64, 4, 3)],
    ("decode", "sm90", 256, 16): [KernelConfig(16, 32, 4, 3)],
    ("decode", "sm90", 16, 64): [KernelConfig(64, 64, 4, 3)],
    ("decode", "sm90", 32, 64): [KernelConfig(64, 64, 4, 3)],
    ("decode", "sm90", 64, 64): [KernelConfig(64, 64, 4, 3)],
    ("decode", "sm90", 128, 64): [KernelConfig(64, 64, 8, 3)],
    ("decode", "sm90", 256, 64): [KernelConfig(64, 32, 8, 3)],
    # ---- backward dK/dV: BLOCK_M = query tile streamed, BLOCK_N = the K/V tile a program owns (its dK and dV
    # accumulators live in registers). (32, 64) on 8 warps spilled 60 B at D=80 on sm_90 (252 regs at D=128).
    # D=128 was swept on an H100 (triton 3.6, bf16, B=4 H=16 T=4096 non-causal, 24 configs per kernel, the whole
    # backward timed with do_bench while the other kernel kept its config): dK/dV (16, 64) on 8 warps / 2 stages
    # 14.4 ms, (16, 128) on 8 warps / 3 stages 8.3 ms; the fastest, (64, 64) on 4 warps / 2 stages at 7.1 ms,
    # spills 372-840 B with triton 3.9 (AOT), as every larger tile does, while (16, 128) w8 s3 does not. dQ: (64, 32)
    # on 8 warps 14.6 ms, on 4 warps 11.1 ms (the fastest, (128, 64) w8 at 11.0, spills 32 B on sm_80). The whole
    # forward + backward then ran at 1.04-1.09x SDPA's flash backend at T 4k/16k, causal and not (0.36-0.44x
    # before). The sm_80 rows take the same configs, unmeasured (no A100 run).
    ("bwd_dkdv", "sm80", 16): [KernelConfig(32, 128, 4, 3)],  # 234 regs
    ("bwd_dkdv", "sm80", 32): [KernelConfig(32, 128, 8, 3)],  # 208 regs (4 warps: 252)
    ("bwd_dkdv", "sm80", 64): [KernelConfig(32, 128, 8, 3)],  # 236 regs
    ("bwd_dkdv", "sm80", 128): [KernelConfig(16, 128, 8, 3)],  # 255 regs
    ("bwd_dkdv", "sm80", 256): [KernelConfig(16, 32, 8, 2)],  # 220 regs
    ("bwd_dkdv", "sm90", 16): [KernelConfig(32, 128, 4, 3)],  # 234 regs
    ("bwd_dkdv", "sm90", 32): [KernelConfig(32, 128, 8, 3)],  # 194 regs
    ("bwd_dkdv", "sm90", 64): [KernelConfig(32, 128, 8, 3)],  # 219 regs
    ("bwd_dkdv", "sm90", 128): [KernelConfig(16, 128, 8, 3)],  # 250 regs
    ("bwd_dkdv", "sm90", 256): [KernelConfig(16, 32, 8, 2)],  # 210 regs
    # ---- backward dQ: BLOCK_M = the query tile a program owns, BLOCK_N = key tile streamed. 128-180 regs.
    ("bwd_dq", "sm80", 16): [KernelConfig(128, 32, 4, 3)],
    ("bwd_dq", "sm80", 32): [KernelConfig(128, 32, 4, 3)],
    ("bwd_dq", "sm80", 64): [KernelConfig(128, 32, 8, 3)],
    ("bwd_dq", "sm80", 128): [KernelConfig(64, 32, 4, 2)],  # 240 regs
    ("bwd_dq", "sm80", 256): [KernelConfig(32, 32, 8, 2)],
    ("bwd_dq", "sm90", 16): [KernelConfig(128, 32, 4, 3)],
    ("bwd_dq", "sm90", 32): [KernelConfig(128, 32, 4, 3)],
    ("bwd_dq", "sm90", 64): [KernelConfig(128, 32, 8, 3)],
    ("bwd_dq", "sm90", 128): [KernelConfig(64, 32, 4, 2)],  # 179 regs
    ("bwd_dq", "sm90", 256): [KernelConfig(32, 64, 8, 2)],  # (32, 32) spilled 8 B with the padding bias
}
# Under the interpreter a kernel costs ~ programs x loop iterations x a few ms of numpy: 32-row query tiles against
# 64-key tiles keep the tests fast and still cover ragged edges, non-square tiles and the causal diagonal.
_INTERPRET_CONFIG = {
    "fwd": KernelConfig(32, 64, 4, 1),
    "decode": KernelConfig(16, 64, 4, 1),
    "decode_combine": KernelConfig(16, 0, 4, 1),
    "bwd_preprocess": KernelConfig(64, 0, 4, 1),
    "bwd_dkdv": KernelConfig(32, 64, 4, 1),
    "bwd_dq": KernelConfig(32, 64, 4, 1),
}


def triton_next_pow2(n: int) -> int:
    return 1 << (max(1, int(n)) - 1).bit_length()


def block_d(head_dim: int) -> int:
    """Head dims are padded to a power of two >= 16 (tl.dot needs K >= 16); lanes >= D are masked."""
    return max(16, triton_next_pow2(head_dim))


def _arch_family(arch: Optional[int]) -> str:
    """sm_90+ (Hopper: 228 KB shared memory, wgmma) or the sm_80 table (Ampere/Ada)."""
    return "sm90" if arch is not None and arch >= 90 else "sm80"


def kernel_configs(kind: str, head_dim: int, dtype: torch.dtype, arch: Optional[int],
                   rows: int = 1, has_kpm: bool = False) -> List[KernelConfig]:
    """THE heuristic: candidate configs for one kernel, default first. arch None = the interpreter (one config).
    rows: for "decode", the rows packed per kv head (G * Tq), which sets BLOCK_M. has_kpm: the forward with a key
    padding mask holds one more vector per key tile; a few buckets need smaller tiles then."""
    if kind not in KERNELS:
        raise ValueError(f"kind must be one of {KERNELS}, got {kind!r}")
    bd = block_d(head_dim)
    if arch is None:
        return [_INTERPRET_CONFIG[kind]]
    if kind == "bwd_preprocess":
        # a row reduction of two fp32-converted (BLOCK_M, BLOCK_D) tiles: 128 rows x 128 lanes on 4 warps spilled
        # (255 regs, 52 B on sm_80); 4096 elements per tile (32 per thread per tensor) does not
        return [KernelConfig(max(16, min(128, 4096 // bd)), 0, 4, 1)]
    if kind == "decode_combine":
        return [KernelConfig(16, 0, 4, 1)]
    fam = _arch_family(arch)
    if kind == "decode":
        cands = list(_GPU_TABLE[(kind, fam, bd, 16 if rows <= 16 else 64)])
    else:
        cands = list((has_kpm and _GPU_TABLE.get((kind, fam, bd, "kpm"))) or _GPU_TABLE[(kind, fam, bd)])
    if dtype == torch.float32:  # fp32 tiles take twice the registers and shared memory: halve the streamed block
        cands = [KernelConfig(max(16, c.block_m // 2), c.block_n, c.num_warps, min(c.num_stages, 2))
                 if kind == "bwd_dkdv" else
                 KernelConfig(c.block_m, max(16, c.block_n // 2), c.num_warps, min(c.num_stages, 2))
                 for c in cands]
    if arch < 90 and arch != 80:  # sm_86/sm_89 have 100 KB of shared memory, not the A100's 164 KB
        cands = [KernelConfig(c.block_m, c.block_n, c.num_warps, min(c.num_stages, 2)) for c in cands]
    return list(dict.fromkeys(cands))


def _autotune_enabled() -> bool:
    return os.environ.get("TINYFORMER_ATTN_AUTOTUNE", "1") != "0"


# ======================================================================================================================
# Launchers
# ======================================================================================================================
def _arch(device: torch.device) -> Optional[int]:
    """Compute capability as an int (80, 90, ...) for CUDA tensors; None under the interpreter (one small config)."""
    if INTERPRET or device.type != "cuda":
        return None
    return _cuda_arch(_cuda_index(device))


NONCAUSAL_PAD = 1024  # > every BLOCK_N/BLOCK_M: a non-causal call passes causal_off = Tk + this


def _causal_offset(causal: bool, Tq: int, Tk: int) -> int:
    """Query i sees keys j <= i + offset. Causal is bottom-right aligned (Tk - Tq); non-causal gets an offset past
    every key, so ONE compiled kernel serves both (the causal compare only runs in the masked boundary tiles)."""
    return Tk - Tq if causal else Tk + NONCAUSAL_PAD


def _kernel_flags(q: torch.Tensor):
    """(UPCAST, DOT_PREC): the interpreter computes bf16 on raw bits, so upcast tiles right after loading there;
    fp32 dots follow torch's TF32 switch (off by default: IEEE fp32, like torch's own fp32 matmul)."""
    upcast = INTERPRET and q.dtype == torch.bfloat16
    prec = "tf32" if q.dtype == torch.float32 and q.is_cuda and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return upcast, prec


_ZERO_BIAS: dict = {}


def _kpm_args(key_padding_mask, q):
    """The key padding mask as an additive fp32 key bias (B, Tk): 0 where True (attend), -inf where padded, plus
    its strides. An add fuses into the score scaling (one FMA); a select on the bool mask in the unmasked key loop
    pushed the sm_80 D=128 forward from 219 registers to 255 + 44 B of spills. Without a mask: one cached 0.0 with
    strides 0, which the kernels that always read the bias (decode, dQ, dK/dV) see as "attend everywhere"; the
    forward compiles a variant without it (HAS_KPM=False): its unmasked key loop is the hot path."""
    if key_padding_mask is None:
        key = str(q.device)
        if key not in _ZERO_BIAS:
            _ZERO_BIAS[key] = torch.zeros(1, device=q.device, dtype=torch.float32)
        return _ZERO_BIAS[key], 0, 0, False
    kb = torch.zeros(key_padding_mask.shape, device=q.device, dtype=torch.float32)
    kb.masked_fill_(~key_padding_mask, float("-inf"))  # (B, Tk)
    return kb, kb.stride(0), kb.stride(1), True


@dataclass(frozen=True)
class Plan:
    """What `attention` runs: backend "triton" or "sdpa"; path "flash" (tiled forward, + backward kernels),
    "decode" (split-KV partials + combine) or "sdpa"; the forward config and, for decode, the number of splits
    and the keys per split."""
    backend: str
    path: str
    config: Optional[KernelConfig] = None
    num_splits: int = 1
    chunk: int = 0


DECODE_MAX_TQ = 16  # a decode/verify step: up to 16 new query positions per sequence
DECODE_MIN_TK = 256  # below this one pass over the keys is short; splitting would only add the combine
DECODE_MAX_SPLITS = 64  # the combine kernel holds all splits of a row in one BLOCK_S <= 64 tile


@functools.lru_cache(maxsize=None)
def _warn_once(msg: str):
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _backend(q: torch.Tensor) -> str:
    if q.dtype == torch.float64:  # the contract covers fp32/fp16/bf16; fp64 takes the torch path everywhere
        return "sdpa"
    if q.is_cuda:
        if not HAS_TRITON:
            raise RuntimeError("tinyformer.kernels.attention on CUDA tensors needs triton (pip install triton); "
                               "tinyformer.kernels.reference.sdpa_attention is the torch path")
        return "triton"
    if q.device.type == "cpu" and HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1":
        if INTERPRET:
            return "triton"
        _warn_once("TRITON_INTERPRET=1 was set after tinyformer.kernels.flash_attention was imported, so its "
                   "kernels were built for a GPU; CPU tensors use torch SDPA. Set it before the import.")
    return "sdpa"


def plan(q, k, v, causal: bool = False, key_padding_mask=None, needs_grad: Optional[bool] = None) -> Plan:
    """The dispatch decision for these inputs (validated first). needs_grad defaults to whether autograd records
    this call; the decode path is forward-only, so a call that needs gradients takes the flash path."""
    B, Hq, Hkv, Tq, Tk, D = check_attention_args(q, k, v, key_padding_mask)
    backend = _backend(q)
    if backend == "sdpa":
        return Plan("sdpa", "sdpa")
    if needs_grad is None:
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    arch = _arch(q.device)
    if not needs_grad and Tq <= DECODE_MAX_TQ and Tk >= DECODE_MIN_TK:
        G = Hq // Hkv
        c = kernel_configs("decode", D, q.dtype, arch, rows=G * Tq)[0]
        n_tiles = cdiv(Tk, c.block_n)
        if q.is_cuda:  # enough splits for about two waves of programs over the SMs
            base = B * Hkv * cdiv(G * Tq, c.block_m)  # programs without splitting
            splits = max(1, min(n_tiles, cdiv(2 * _num_sms(_cuda_index(q.device)), base), DECODE_MAX_SPLITS))
        else:  # interpreter: the work is the same however it is split; 4 splits exercise the combine
            splits = min(n_tiles, 4)
        chunk = cdiv(n_tiles, splits) * c.block_n  # keys per split, whole tiles
        return Plan("triton", "decode", c, cdiv(Tk, chunk), chunk)
    return Plan("triton", "flash", kernel_configs("fwd", D, q.dtype, arch, has_kpm=key_padding_mask is not None)[0])


@functools.lru_cache(maxsize=None)
def _autotuned_fwd(cands: tuple, do_bench=None):
    """The forward wrapped in triton.autotune over the heuristic's candidates (built on first use, never at import).
    Keyed on head dim, mask, dtype and power-of-two buckets of Tq and Tk and causal, so a growing KV cache does not
    retune at every step. do_bench: a timer override (tests pass a CPU timer; GPU uses triton's default)."""
    configs = [triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n}, num_warps=c.num_warps,
                             num_stages=c.num_stages) for c in cands]
    return triton.autotune(configs=configs, key=["HEAD_DIM", "HAS_KPM", "TQ_KEY", "TK_KEY", "CAUSAL_KEY"],
                           do_bench=do_bench)(_attn_fwd_kernel)


def _flash_fwd(q, k, v, causal, scale, key_padding_mask, configs=None, do_bench=None):
    """Launch the forward. Returns out (B, Hq, Tq, D) in q's dtype and lse2 (B, Hq, Tq) fp32.
    configs: override the heuristic's candidates (tests); more than one goes through triton.autotune."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    o = torch.empty((B, Hq, Tq, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, Hq, Tq), device=q.device, dtype=torch.float32)
    kpm, smb, smn, has_kpm = _kpm_args(key_padding_mask, q)
    upcast, prec = _kernel_flags(q)
    if configs is None:
        configs = kernel_configs("fwd", D, q.dtype, _arch(q.device), has_kpm=has_kpm)
        if not _autotune_enabled():
            configs = configs[:1]
    args = (q, k, v, o, lse, kpm, *q.stride(), *k.stride(), *v.stride(), *o.stride(), smb, smn,
            Hq, Hq // Hkv, Tq, Tk, _causal_offset(causal, Tq, Tk), scale * LOG2E,
            triton_next_pow2(Tq), triton_next_pow2(Tk), int(causal))
    meta = dict(HEAD_DIM=D, BLOCK_D=block_d(D), HAS_KPM=has_kpm, UPCAST=upcast, DOT_PREC=prec)
    if len(configs) > 1:
        grid = lambda m: (cdiv(Tq, m["BLOCK_M"]), B * Hq)  # noqa: E731
        _autotuned_fwd(tuple(configs), do_bench)[grid](*args, **meta)
    else:
        c = configs[0]
        _attn_fwd_kernel[(cdiv(Tq, c.block_m), B * Hq)](
            *args, **meta, BLOCK_M=c.block_m, BLOCK_N=c.block_n, num_warps=c.num_warps, num_stages=c.num_stages)
    stats["flash_fwd"] += 1
    return o, lse


def _decode_fwd(q, k, v, causal, scale, key_padding_mask, p: Plan):
    """Split-KV forward: partials (S, R, D) fp32 and their lse2 (S, R), then the combine kernel. Returns out."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    R = B * Hq * Tq
    S, c = p.num_splits, p.config
    op = torch.empty((S, R, D), device=q.device, dtype=torch.float32)
    lp = torch.empty((S, R), device=q.device, dtype=torch.float32)
    kpm, smb, smn, _ = _kpm_args(key_padding_mask, q)
    upcast, prec = _kernel_flags(q)
    _attn_decode_kernel[(S, cdiv(G * Tq, c.block_m), B * Hkv)](
        q, k, v, op, lp, kpm, *q.stride(), *k.stride(), *v.stride(), smb, smn,
        Hq, G, Tq, Tk, _causal_offset(causal, Tq, Tk), scale * LOG2E, p.chunk, R,
        HEAD_DIM=D, BLOCK_D=block_d(D), BLOCK_M=c.block_m, BLOCK_N=c.block_n,
        UPCAST=upcast, DOT_PREC=prec, num_warps=c.num_warps, num_stages=c.num_stages)
    o = torch.empty((B, Hq, Tq, D), device=q.device, dtype=q.dtype)  # contiguous: row r = (b * Hq + h) * Tq + i
    cc = kernel_configs("decode_combine", D, q.dtype, _arch(q.device))[0]
    _attn_decode_combine_kernel[(cdiv(R, cc.block_m),)](
        op, lp, o, S, R, HEAD_DIM=D, BLOCK_D=block_d(D), BLOCK_S=max(2, triton_next_pow2(S)), BLOCK_R=cc.block_m,
        num_warps=cc.num_warps, num_stages=cc.num_stages)
    stats["decode_split_kv"] += 1
    stats["decode_splits"] += S
    return o


def _flash_bwd(do, q, k, v, o, lse, causal, scale, key_padding_mask):
    """Launch preprocess, dK/dV and dQ. Returns dq, dk, dv in the dtypes of q, k, v."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    arch = _arch(q.device)
    upcast, prec = _kernel_flags(q)
    kpm, smb, smn, _ = _kpm_args(key_padding_mask, q)
    dims = dict(HEAD_DIM=D, BLOCK_D=block_d(D))

    delta = torch.empty((B, Hq, Tq), device=q.device, dtype=torch.float32)
    c = kernel_configs("bwd_preprocess", D, q.dtype, arch)[0]
    _attn_bwd_preprocess_kernel[(cdiv(Tq, c.block_m), B * Hq)](
        o, do, delta, *o.stride(), *do.stride(), Hq, Tq, **dims, BLOCK_M=c.block_m,
        num_warps=c.num_warps, num_stages=c.num_stages)

    flags = dict(UPCAST=upcast, DOT_PREC=prec)
    shape_args = (Hq, Hq // Hkv, Tq, Tk, _causal_offset(causal, Tq, Tk), scale * LOG2E, scale)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    c = kernel_configs("bwd_dkdv", D, q.dtype, arch)[0]
    _attn_bwd_dkdv_kernel[(cdiv(Tk, c.block_n), B * Hkv)](
        q, k, v, do, lse, delta, dk, dv, kpm,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), smb, smn,
        *shape_args, **dims, **flags,
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, num_warps=c.num_warps, num_stages=c.num_stages)

    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    c = kernel_configs("bwd_dq", D, q.dtype, arch)[0]
    _attn_bwd_dq_kernel[(cdiv(Tq, c.block_m), B * Hq)](
        q, k, v, do, lse, delta, dq, kpm,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), smb, smn,
        *shape_args, **dims, **flags,
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, num_warps=c.num_warps, num_stages=c.num_stages)
    stats["flash_bwd"] += 1
    return dq, dk, dv


# ======================================================================================================================
# autograd.Function and the public op
# ======================================================================================================================
class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, key_padding_mask):
        o, lse = _flash_fwd(q, k, v, causal, scale, key_padding_mask)
        ctx.save_for_backward(q, k, v, o, lse, key_padding_mask)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, key_padding_mask = ctx.saved_tensors
        dq, dk, dv = _flash_bwd(do, q, k, v, o, lse, ctx.causal, ctx.scale, key_padding_mask)
        return dq, dk, dv, None, None, None


def _check_scale(scale, D: int) -> float:
    if scale is None:
        return D ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def attention(q, k, v, causal: bool = False, scale: Optional[float] = None, key_padding_mask=None):
    """softmax(q k^T * scale + mask) v, fused. q (B, Hq, Tq, D); k, v (B, Hkv, Tk, D) with Hq % Hkv == 0;
    causal is bottom-right aligned (query i sees keys j <= i + Tk - Tq); key_padding_mask bool (B, Tk), True =
    attend. A query row that sees no key gives 0. Differentiable in q, k, v. Returns (B, Hq, Tq, D) in q's dtype.

    Arguments are validated before anything is launched (ValueError/TypeError naming the argument). CUDA tensors
    and CPU tensors under TRITON_INTERPRET=1 run the Triton kernels (`plan` says which path); other CPU tensors run
    torch SDPA (`reference.sdpa_attention`)."""
    check_attention_args(q, k, v, key_padding_mask)
    scale = _check_scale(scale, q.shape[-1])
    p = plan(q, k, v, causal, key_padding_mask)
    if p.backend == "sdpa":
        stats["sdpa"] += 1
        return sdpa_attention(q, k, v, causal=bool(causal), scale=scale, key_padding_mask=key_padding_mask)
    if p.path == "decode":
        return _decode_fwd(q, k, v, bool(causal), scale, key_padding_mask, p)
    return _FlashAttention.apply(q, k, v, bool(causal), scale, key_padding_mask)


# ======================================================================================================================
# Ahead-of-time compile specs (used by `python -m tinyformer.kernels.aot`)
# ======================================================================================================================
AOT_HEAD_DIMS = (16, 32, 64, 80, 128, 256)  # one per BLOCK_D bucket, plus 80: a padded member of the 128 bucket
_TT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_IO_PTRS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
_FP32_PTRS = {"LSE", "DELTA", "OP", "LP", "KB"}
_FLOAT_ARGS = {"qk_scale", "sm_scale"}
KPM_KERNELS = ("fwd",)  # kernels with a HAS_KPM constexpr; the others always read the key bias
_KERNEL_FNS = {"fwd": "_attn_fwd_kernel", "decode": "_attn_decode_kernel",
               "decode_combine": "_attn_decode_combine_kernel", "bwd_preprocess": "_attn_bwd_preprocess_kernel",
               "bwd_dkdv": "_attn_bwd_dkdv_kernel", "bwd_dq": "_attn_bwd_dq_kernel"}


def aot_spec(kind: str, head_dim: int, dtype: torch.dtype, arch: int, cfg: KernelConfig,
             has_kpm: bool = False) -> dict:
    """One compile spec, typed the way the JIT specialises a call on contiguous tensors: head-dim strides equal to
    1 become constexprs (so loads vectorise) and pointers and the other strides are marked 16-divisible."""
    fn = globals()[_KERNEL_FNS[kind]]
    bd = block_d(head_dim)
    ce = dict(HEAD_DIM=head_dim, BLOCK_D=bd)
    if kind in KPM_KERNELS:
        ce.update(HAS_KPM=has_kpm)
    elif has_kpm:
        raise ValueError(f"{kind} has no mask variant (it always reads the key bias)")
    if kind in ("fwd", "decode", "bwd_dkdv", "bwd_dq"):
        ce.update(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, UPCAST=False, DOT_PREC="ieee")
    elif kind == "bwd_preprocess":
        ce.update(BLOCK_M=cfg.block_m)
    else:  # decode_combine: BLOCK_S is the split count rounded up to a power of two; 64 = DECODE_MAX_SPLITS
        ce.update(BLOCK_S=DECODE_MAX_SPLITS, BLOCK_R=cfg.block_m)
    ce.update({n: 1 for n in fn.arg_names if n.startswith("stride_") and n.endswith("d")})
    sig = {}
    for name in fn.arg_names:
        if name in ce:
            sig[name] = "constexpr"
        elif name in _FP32_PTRS:
            sig[name] = "*fp32"
        elif name in _IO_PTRS:
            sig[name] = "*" + _TT[dtype]
        elif name in _FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    div16 = [n for n in fn.arg_names if n in _IO_PTRS or n in _FP32_PTRS
             or (n.startswith("stride_") and n[-1] in "bhmn" and not n.startswith("stride_m") and n not in ce)]
    tile = f"m{cfg.block_m}" + (f"n{cfg.block_n}" if cfg.block_n else "")
    name = (f"attn_{kind}_d{head_dim}_{_TT[dtype]}{'_kpm' if has_kpm else ''}_{tile}w{cfg.num_warps}"
            f"s{cfg.num_stages}")
    return dict(name=name, fn=fn, signature=sig, constexprs=ce, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                targets=[arch], divisible_by_16=div16, kind=kind, shipped_forward=kind in ("fwd", "decode"))


def aot_specs() -> List[dict]:
    """Every kernel configuration the launchers can pick on sm_80 and sm_90: each kernel x head-dim bucket
    (AOT_HEAD_DIMS) x fp16/bf16 x every autotune candidate and decode BLOCK_M. Causal and non-causal share one
    binary (causal is a runtime offset); the forward with and without a key padding mask (the mask's bias vector
    spilled three forward configs that were clean without it); decode, dQ and dK/dV always read the bias. fp32
    inputs are not in the set.
    Keys: name, fn, signature, constexprs, num_warps, num_stages, targets, plus divisible_by_16 (arguments the
    JIT marks 16-aligned), kind, and shipped_forward (a spill there fails the AOT check)."""
    specs = []
    for arch in (80, 90):
        for dtype in (torch.float16, torch.bfloat16):
            for D in AOT_HEAD_DIMS:
                for kind in KERNELS:
                    masks = (False, True) if kind in KPM_KERNELS else (False,)
                    for has_kpm in masks:
                        for rows in ((16, 64) if kind == "decode" else (1,)):
                            for c in kernel_configs(kind, D, dtype, arch, rows=rows, has_kpm=has_kpm):
                                specs.append(aot_spec(kind, D, dtype, arch, c, has_kpm=has_kpm))
    return specs
