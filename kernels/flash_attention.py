"""Fused attention in Triton: FlashAttention-2 forward and backward, and a split-KV decode path.

`attention(q, k, v, causal=False, scale=None, key_padding_mask=None)` is tinyformer's attention op (contract in
docs/API.md; pure-torch reference `tinyformer.kernels.reference.attention`). It runs Triton kernels on CUDA tensors
and, under TRITON_INTERPRET=1, on CPU tensors; on CPU without the interpreter (and where triton is not installed) it
uses torch's fused SDPA (`cpu.sdpa_attention`, the same contract).

References:
- Dao 2023, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning": a Q tile per program
  against streamed K/V tiles with an online softmax; backward recomputes P from the saved log-sum-exp, with the
  preprocess delta = rowsum(dO * O), a dK/dV pass (program per K/V tile) and a dQ pass (program per Q tile).
- Dao, Haziza, Massa, Sizov 2023, "Flash-Decoding for long-context inference": split the KV cache over programs,
  each writes a partial (out, lse), then a combine step rescales and sums them.
- The Triton fused-attention tutorial (triton-lang/triton, python/tutorials/06-fused-attention.py): exp2-domain
  softmax with log2(e) folded into the scale, and splitting the key loop into an unmasked part and a masked part.
- Ainslie et al. 2023 (GQA): query head h reads k/v head h // (Hq // Hkv); repeated K/V are never materialised.
- flash-attn's variable-length API (Dao-AILab/flash-attention, flash_attn_varlen_func): packed documents given by
  cu_seqlens. Here every document stays inside one row of the (B, T) batch, so the kernels keep their grid and a
  VARLEN constexpr adds per-token document bounds: a tile's loop runs over its documents' span only, whole tiles
  inside every row's document run unmasked, and the masked tiles also test the document.

Layout of this file: @triton.jit kernels -> ONE heuristic (`kernel_configs`: blocks, warps and stages from
configs.csv) -> launchers -> `_FlashAttention` (torch.autograd.Function) -> public `attention` and `plan`.

Legend: B batch, Hq query heads, Hkv key/value heads, G = Hq // Hkv (group), Tq query length, Tk key length,
D head dim, BLOCK_D = next power of two >= D (padded lanes are masked), S number of KV splits (decode),
R = B * Hq * Tq rows. Softmax is kept in the log2 domain: s2 = q.k * scale * log2(e), lse2 = log2(sum 2^(s2)).
Rows that see no key (all keys padded, or causal with Tq > Tk) get output 0 and lse2 = +inf, so the backward's
recomputed P = 2^(s2 - lse2) is exactly 0 there (no NaN).
"""
from __future__ import annotations  # kernel annotations stay strings: the module imports without triton

import dataclasses
import functools
import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import List, Optional

import torch

from .configs import arch_family, candidates
from .cpu import sdpa_attention
from .device import INTERPRET, arch_of, backend_of, cdiv, cuda_index, num_sms, tl, triton
from .reference import check_attention_args, document_ids

LOG2E = 1.4426950408889634

# Which path ran, counted per call: tests assert that the split-KV decode path really was taken.
stats: Counter = Counter()


# ======================================================================================================================
# Triton kernels
# ======================================================================================================================
# Every row index is widened to 64 bits before it multiplies a stride: B*Tq*Hq*D can pass 2^31 (aot's PTX check).
@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, kb_base,
               stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
               q_pos, offs_d, lo, hi, Tk, causal_off, qk_scale, doc_lo, doc_hi,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
               HAS_KPM: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, VARLEN: tl.constexpr):
    """Online softmax over key tiles [lo, hi). q: (BLOCK_M, BLOCK_D); q_pos: (BLOCK_M,) query positions for the
    causal rule key j <= q_pos + causal_off (non-causal calls pass an offset past every key). MASKED adds the
    key-boundary and causal masks: only the last tiles need them, so callers split their loop and the bulk of the
    tiles runs without a select per score. VARLEN (packed documents) adds to the masks that key j lies in the
    query's document [doc_lo, doc_hi), (BLOCK_M,) positions in the row."""
    offs_n0 = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < Tk
        if MASKED:
            kt = tl.load(k_base + offs_n.to(tl.int64)[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                         mask=d_ok[:, None] & n_ok[None, :], other=0.0)  # (BLOCK_D, BLOCK_N)
            v = tl.load(v_base + offs_n.to(tl.int64)[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        else:
            kt = tl.load(k_base + offs_n.to(tl.int64)[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                         mask=d_ok[:, None], other=0.0)
            v = tl.load(v_base + offs_n.to(tl.int64)[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                        mask=d_ok[None, :], other=0.0)
        if UPCAST:  # interpreter: bf16 arithmetic is computed on raw bits there, so compute in fp32
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        if HAS_KPM:  # additive key bias (0 attend, -inf padded) fused into the scaling: one FMA per score
            kb = tl.load(kb_base + offs_n.to(tl.int64) * stride_mn, mask=n_ok, other=float("-inf"))
            s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale + kb[None, :]  # (BLOCK_M, BLOCK_N), log2 domain
        else:
            s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale  # (BLOCK_M, BLOCK_N), log2 domain
        if MASKED:
            ok = n_ok[None, :] & (offs_n[None, :] <= q_pos[:, None] + causal_off)  # (BLOCK_M, BLOCK_N)
            if VARLEN:
                ok = ok & (offs_n[None, :] >= doc_lo[:, None]) & (offs_n[None, :] < doc_hi[:, None])
            s = tl.where(ok, s, float("-inf"))
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
def _doc_tiles(lo, full_lo, full_hi, hi, BLOCK: tl.constexpr):
    """Packed documents: split a tile's span [lo, hi) of the other side's rows into masked tiles [lo, a), whole
    tiles [a, b) inside [full_lo, full_hi), the part every row of the tile sees (no mask), and masked tiles [b, hi).
    Tiles are counted from lo, so the three loops never cover a row twice."""
    a = tl.minimum(lo + tl.cdiv(tl.maximum(full_lo - lo, 0), BLOCK) * BLOCK, hi)
    b = a + tl.maximum(full_hi - a, 0) // BLOCK * BLOCK
    return a, b


@triton.jit
def _query_tile_keys(DOC, b, Tq, Tk, start_m, offs_m, m_ok, doc_stride, causal_off,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, VARLEN: tl.constexpr):
    """The keys a tile of query rows [start_m, start_m + BLOCK_M) reads, as spans: [lo, n_lo) masked (packed
    documents only: from the first row's document start), [n_lo, n_full) whole tiles every row sees (no mask),
    [n_full, hi) masked; keys past the horizon of the tile's last row are skipped. Packed documents also give each
    row's document's key range [doc_lo, doc_hi) (BLOCK_M,). Returns (lo, n_lo, n_full, hi, doc_lo, doc_hi)."""
    hi = tl.minimum(Tk, start_m + BLOCK_M + causal_off)
    n_full = tl.minimum(Tk, tl.maximum(start_m + causal_off + 1, 0)) // BLOCK_N * BLOCK_N  # whole, seen by row 0
    lo = 0
    n_lo = 0
    doc_lo = 0
    doc_hi = Tk
    if VARLEN:  # from the first row's document start to the last row's document end; then as above
        doc_base = DOC + b * Tq
        last = tl.minimum(start_m + BLOCK_M, Tq) - 1
        doc_lo = tl.load(doc_base + offs_m, mask=m_ok, other=0)  # (BLOCK_M,)
        doc_hi = tl.load(doc_base + doc_stride + offs_m, mask=m_ok, other=0)
        lo = tl.load(doc_base + start_m)
        hi = tl.minimum(hi, tl.load(doc_base + doc_stride + last))
        n_lo, n_full = _doc_tiles(lo, tl.load(doc_base + last),
                                  tl.minimum(tl.load(doc_base + doc_stride + start_m), start_m + causal_off + 1),
                                  hi, BLOCK_N)
    return lo, n_lo, n_full, hi, doc_lo, doc_hi


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, KB, DOC,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb, stride_mn, doc_stride,
    Hq, GROUP, Tq, Tk, causal_off, qk_scale,
    TQ_KEY, TK_KEY, CAUSAL_KEY,  # power-of-two buckets of Tq/Tk and causal: unused here, they key the autotuner
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_KPM: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, VARLEN: tl.constexpr,
):
    """Grid (cdiv(Tq, BLOCK_M), B * Hq). Writes O (B, Hq, Tq, D) and LSE (B, Hq, Tq) fp32 (log2 domain).
    Query i sees keys j <= i + causal_off: Tk - Tq for bottom-right causal, past every key otherwise.
    VARLEN: DOC (2, B, T) int32 holds each token's document start, then end (doc_stride = B * T apart), as positions
    in its row; query i also needs key j in its document, and the tile's keys run over its documents' span only."""
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

    q = tl.load(Q + b * stride_qb + h * stride_qh
                + offs_m.to(tl.int64)[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    kb_base = KB + b * stride_mb

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, n_lo, n_full, hi, doc_lo, doc_hi = _query_tile_keys(DOC, b, Tq, Tk, start_m, offs_m, m_ok, doc_stride,
                                                            causal_off, BLOCK_M, BLOCK_N, VARLEN)
    if VARLEN:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, kb_base,
                                   stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
                                   offs_m, offs_d, lo, n_lo, Tk, causal_off, qk_scale, doc_lo, doc_hi,
                                   HEAD_DIM, BLOCK_N, True, HAS_KPM, UPCAST, DOT_PREC, VARLEN)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, kb_base,
                               stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
                               offs_m, offs_d, n_lo, n_full, Tk, causal_off, qk_scale, doc_lo, doc_hi,
                               HEAD_DIM, BLOCK_N, False, HAS_KPM, UPCAST, DOT_PREC, VARLEN)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, kb_base,
                               stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
                               offs_m, offs_d, n_full, hi, Tk, causal_off, qk_scale, doc_lo, doc_hi,
                               HEAD_DIM, BLOCK_N, True, HAS_KPM, UPCAST, DOT_PREC, VARLEN)

    empty = l_i == 0.0  # the row saw no key: output 0, lse +inf (so the backward's P is 0)
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    tl.store(LSE + pid_bh.to(tl.int64) * Tq + offs_m, lse, mask=m_ok)
    tl.store(O + b * stride_ob + h * stride_oh + offs_m.to(tl.int64)[:, None] * stride_om + offs_d[None, :] * stride_od,
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
    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + i.to(tl.int64)[:, None] * stride_qm
                + offs_d[None, :] * stride_qd,
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
                               i, offs_d, lo, hi, Tk, causal_off, qk_scale, 0, Tk,
                               HEAD_DIM, BLOCK_N, True, True, UPCAST, DOT_PREC, False)
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
        o_s = tl.load(OP + (tl.cast(s, tl.int64) * R + rows)[:, None] * HEAD_DIM + offs_d[None, :],
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
    o = tl.load(O + b * stride_ob + h * stride_oh
                + offs_m.to(tl.int64)[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh
                 + offs_m.to(tl.int64)[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * Tq + offs_m, tl.sum(o * do, 1), mask=offs_m < Tq)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                    stride_qm, stride_qd, stride_dom, stride_dod,
                    offs_n, offs_d, lo, hi, Tq, causal_off, qk_scale, doc_lo, doc_hi,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
                    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, VARLEN: tl.constexpr):
    """Accumulate dK, dV of one key tile over query tiles [lo, hi), in transposed form (keys on rows).
    Padded query rows load lse = +inf, so their P is 0; keys past Tk only produce rows that are never stored.
    VARLEN: the masks also need query i in key j's document [doc_lo, doc_hi), (BLOCK_N,) positions in the row."""
    d_ok = offs_d < HEAD_DIM
    for start_m in tl.range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < Tq
        q = tl.load(q_base + offs_m.to(tl.int64)[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
        do = tl.load(do_base + offs_m.to(tl.int64)[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                     mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(lse_base + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # (BLOCK_N, BLOCK_M)
        pt = tl.math.exp2(st - lse[None, :])
        if MASKED:
            ok = offs_n[:, None] <= offs_m[None, :] + causal_off  # (BLOCK_N, BLOCK_M)
            if VARLEN:
                ok = ok & (offs_m[None, :] >= doc_lo[:, None]) & (offs_m[None, :] < doc_hi[:, None])
            pt = tl.where(ok, pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_D)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_D)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, KB, DOC,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_mb, stride_mn, doc_stride,
    stride_dks, stride_dvs, HEADS_PER,
    Hq, GROUP, Tq, Tk, causal_off, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, VARLEN: tl.constexpr,
):
    """Grid (cdiv(Tk, BLOCK_N), B * Hkv, S). One program owns a K/V tile of one kv head and loops over the query
    tiles of HEADS_PER of the G query heads that share it (split pid 2 takes heads [s * HEADS_PER, ..)), so the GQA
    reduction of dK/dV happens in registers; with S > 1 each split writes its own fp32 partial at DK + s * stride_dks
    (and DV), summed by the launcher in a fixed order: deterministic, no atomics. VARLEN: DOC as in the forward;
    the query loop runs over the span of the tile's keys' documents only."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    Hkv = Hq // GROUP
    b = (pid_bh // Hkv).to(tl.int64)
    hk = (pid_bh % Hkv).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < Tk
    d_ok = offs_d < HEAD_DIM
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * stride_kb + hk * stride_kh
                + offs_n.to(tl.int64)[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(V + b * stride_vb + hk * stride_vh
                + offs_n.to(tl.int64)[:, None] * stride_vn + offs_d[None, :] * stride_vd,
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
    m_end = Tq
    doc_lo = 0
    doc_hi = Tq
    if VARLEN:  # queries from the first key's document start (or its causal horizon) to the last key's document end
        doc_base = DOC + b * Tk
        last = tl.minimum(start_n + BLOCK_N, Tk) - 1
        doc_lo = tl.load(doc_base + offs_n, mask=n_ok, other=0)  # (BLOCK_N,)
        doc_hi = tl.load(doc_base + doc_stride + offs_n, mask=n_ok, other=0)
        m_lo = tl.maximum(tl.load(doc_base + start_n), start_n - causal_off)
        m_hi = tl.load(doc_base + doc_stride + last)
        m_mid, m_end = _doc_tiles(m_lo, tl.maximum(tl.load(doc_base + last), last - causal_off),
                                  tl.load(doc_base + doc_stride + start_n), m_hi, BLOCK_M)
    for g in range(pid_s * HEADS_PER, tl.minimum(pid_s * HEADS_PER + HEADS_PER, GROUP)):
        h = hk * GROUP + g
        bh = b * Hq + h
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_base = LSE + bh * Tq
        delta_base = DELTA + bh * Tq
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                 stride_qm, stride_qd, stride_dom, stride_dod,
                                 offs_n, offs_d, m_lo, m_mid, Tq, causal_off, qk_scale, doc_lo, doc_hi,
                                 HEAD_DIM, BLOCK_M, True, UPCAST, DOT_PREC, VARLEN)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                 stride_qm, stride_qd, stride_dom, stride_dod,
                                 offs_n, offs_d, m_mid, m_end, Tq, causal_off, qk_scale, doc_lo, doc_hi,
                                 HEAD_DIM, BLOCK_M, False, UPCAST, DOT_PREC, VARLEN)
        if VARLEN:
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                     stride_qm, stride_qd, stride_dom, stride_dod,
                                     offs_n, offs_d, m_end, m_hi, Tq, causal_off, qk_scale, doc_lo, doc_hi,
                                     HEAD_DIM, BLOCK_M, True, UPCAST, DOT_PREC, VARLEN)
    # a padded key (bias -inf) contributes to no row: its dK/dV rows are exactly 0. Read once per program, so no
    # constexpr variant: without a mask KB is a single 0 with zero strides.
    kp = tl.load(KB + b * stride_mb + offs_n.to(tl.int64) * stride_mn, mask=n_ok, other=float("-inf")) == 0.0
    dk = tl.where(kp[:, None], dk, 0.0)
    dv = tl.where(kp[:, None], dv, 0.0)
    dk = dk * sm_scale
    tl.store(DK + pid_s.to(tl.int64) * stride_dks + b * stride_dkb + hk * stride_dkh
             + offs_n.to(tl.int64)[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + pid_s.to(tl.int64) * stride_dvs + b * stride_dvb + hk * stride_dvh
             + offs_n.to(tl.int64)[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, kb_base,
                  stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
                  offs_m, offs_d, lo, hi, Tk, causal_off, qk_scale, doc_lo, doc_hi,
                  HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                  UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, VARLEN: tl.constexpr):
    """Accumulate dQ of one query tile over key tiles [lo, hi). The key bias is always read (without a mask: a
    single 0 with zero strides): BLOCK_N floats per tile next to two (BLOCK_N, D) tiles, fused into the scaling FMA,
    so one dQ binary serves both cases. VARLEN: as in `_fwd_inner`."""
    d_ok = offs_d < HEAD_DIM
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Tk
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base
                    + offs_n.to(tl.int64)[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base
                    + offs_n.to(tl.int64)[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        # padded keys: bias -inf, so P = 2^(-inf) = 0 there
        kb = tl.load(kb_base + offs_n.to(tl.int64) * stride_mn, mask=n_ok, other=float("-inf"))
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale + kb[None, :]  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:  # n_ok too: a key past Tk has k = 0 but 2^(0 - lse) can overflow, and inf * 0 = NaN
            ok = n_ok[None, :] & (offs_n[None, :] <= offs_m[:, None] + causal_off)  # (BLOCK_M, BLOCK_N)
            if VARLEN:
                ok = ok & (offs_n[None, :] >= doc_lo[:, None]) & (offs_n[None, :] < doc_hi[:, None])
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_D)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KB, DOC,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_mb, stride_mn, doc_stride,
    Hq, GROUP, Tq, Tk, causal_off, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, VARLEN: tl.constexpr,
):
    """Grid (cdiv(Tq, BLOCK_M), B * Hq). One program owns a query tile and streams the key tiles it can see.
    VARLEN: DOC and the key span as in the forward."""
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
    q = tl.load(Q + b * stride_qb + h * stride_qh
                + offs_m.to(tl.int64)[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=qd_mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh
                 + offs_m.to(tl.int64)[:, None] * stride_dom + offs_d[None, :] * stride_dod,
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
    lo, n_lo, n_full, hi, doc_lo, doc_hi = _query_tile_keys(DOC, b, Tq, Tk, start_m, offs_m, m_ok, doc_stride,
                                                            causal_off, BLOCK_M, BLOCK_N, VARLEN)  # the forward's
    if VARLEN:
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, kb_base,
                           stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
                           offs_m, offs_d, lo, n_lo, Tk, causal_off, qk_scale, doc_lo, doc_hi,
                           HEAD_DIM, BLOCK_N, True, UPCAST, DOT_PREC, VARLEN)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, kb_base,
                       stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
                       offs_m, offs_d, n_lo, n_full, Tk, causal_off, qk_scale, doc_lo, doc_hi,
                       HEAD_DIM, BLOCK_N, False, UPCAST, DOT_PREC, VARLEN)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, kb_base,
                       stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
                       offs_m, offs_d, n_full, hi, Tk, causal_off, qk_scale, doc_lo, doc_hi,
                       HEAD_DIM, BLOCK_N, True, UPCAST, DOT_PREC, VARLEN)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh
             + offs_m.to(tl.int64)[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=qd_mask)


# ======================================================================================================================
# One heuristic: blocks, warps and stages per kernel, head dim, dtype and GPU generation (GPU rows: configs.csv)
# ======================================================================================================================
@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    row: Optional[int] = dataclasses.field(default=None, compare=False, repr=False)  # its configs.csv row


KERNELS = ("fwd", "decode", "decode_combine", "bwd_preprocess", "bwd_dkdv", "bwd_dq")
FIXED_TILE_KERNELS = ("decode_combine", "bwd_preprocess")  # no K/V tile loop: neither dtype nor stage rules apply

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


def table_variant(kind: str, rows: int = 1, has_kpm: bool = False, varlen: bool = False) -> str:
    """The configs.csv variant of a call: the forward has its own rows with a key padding mask (the bias vector per
    key tile needs smaller tiles in some buckets) and with packed documents (the per-row document bounds and the
    extra masked key loop spill the larger tiles of the 128 bucket); decode's BLOCK_M follows the rows packed per kv
    head (G * Tq)."""
    if kind == "fwd":
        return "kpm" if has_kpm else "varlen" if varlen else ""
    if kind == "decode":
        return "rows16" if rows <= 16 else "rows64"
    return ""


def kernel_configs(kind: str, head_dim: int, dtype: torch.dtype, arch: Optional[int],
                   rows: int = 1, has_kpm: bool = False, varlen: bool = False) -> List[KernelConfig]:
    """THE heuristic: candidate configs for one kernel, default first. arch None = the interpreter (one config).
    rows: for "decode", the rows packed per kv head (G * Tq), which sets BLOCK_M. has_kpm: the forward with a key
    padding mask. varlen: the forward with packed documents (the backward kernels share their rows with the plain
    call). fp16/bf16 read configs.csv as it is; fp32 and sm_86/sm_89 derive from it."""
    if kind not in KERNELS:
        raise ValueError(f"kind must be one of {KERNELS}, got {kind!r}")
    if arch is None:
        return [_INTERPRET_CONFIG[kind]]
    found = candidates("attn_" + kind, arch_family(arch), str(block_d(head_dim)),
                       table_variant(kind, rows, has_kpm, varlen))
    cands = [KernelConfig(r["block_m"], r["block_n"], r["num_warps"], r["num_stages"], row=i) for i, r in found]
    if kind in FIXED_TILE_KERNELS:
        return cands
    if dtype == torch.float32:  # fp32 tiles take twice the registers and shared memory: halve the streamed block
        cands = [dataclasses.replace(c, block_m=max(16, c.block_m // 2), num_stages=min(c.num_stages, 2))
                 if kind == "bwd_dkdv" else
                 dataclasses.replace(c, block_n=max(16, c.block_n // 2), num_stages=min(c.num_stages, 2))
                 for c in cands]
    if arch < 90 and arch != 80:  # sm_86/sm_89 have 100 KB of shared memory, not the A100's 164 KB
        cands = [dataclasses.replace(c, num_stages=min(c.num_stages, 2)) for c in cands]
    return list(dict.fromkeys(cands))


def _autotune_enabled() -> bool:
    return os.environ.get("TINYFORMER_ATTN_AUTOTUNE", "1") != "0"


# ======================================================================================================================
# Launchers
# ======================================================================================================================
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
_NO_DOCS: dict = {}


def _kpm_args(key_padding_mask, q):
    """The key padding mask as an additive fp32 key bias (B, Tk): 0 where True (attend), -inf where padded, plus
    its strides. An add fuses into the score scaling (one FMA), where a select on the bool mask in the unmasked key
    loop costs registers (it spills the sm_80 D=128 forward). Without a mask: one cached 0.0 with strides 0, which
    the kernels that always read the bias (decode, dQ, dK/dV) see as "attend everywhere"; the forward compiles a
    variant without it (HAS_KPM=False): its unmasked key loop is the hot path."""
    if key_padding_mask is None:
        key = str(q.device)
        if key not in _ZERO_BIAS:
            _ZERO_BIAS[key] = torch.zeros(1, device=q.device, dtype=torch.float32)
        return _ZERO_BIAS[key], 0, 0, False
    kb = torch.zeros(key_padding_mask.shape, device=q.device, dtype=torch.float32)
    kb.masked_fill_(~key_padding_mask, float("-inf"))  # (B, Tk)
    return kb, kb.stride(0), kb.stride(1), True


def _doc_args(cu_seqlens, q):
    """Packed documents for the kernels: DOC (2, B * T) int32, each token's document start, then end, as positions
    in its row (computed on the device, no host sync), and its row stride B * T; True. Without cu_seqlens: a cached
    empty int32 tensor the VARLEN=False kernels never read, 0, False."""
    if cu_seqlens is None:
        key = str(q.device)
        if key not in _NO_DOCS:
            _NO_DOCS[key] = torch.zeros(1, device=q.device, dtype=torch.int32)
        return _NO_DOCS[key], 0, False
    B, T = q.shape[0], q.shape[2]
    ids = document_ids(cu_seqlens, B, T).view(-1)  # (B, T) -> (B * T,) document of each token
    cu = cu_seqlens.long()
    pos = torch.arange(B * T, device=q.device)  # (B * T,) flat token index
    row0 = pos - pos % T  # (B * T,) flat index of the token's row start
    return torch.stack((cu[ids] - row0, cu[ids + 1] - row0)).to(torch.int32), B * T, True  # (2, B * T)


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


def _backend(q: torch.Tensor) -> str:
    if q.dtype == torch.float64:  # the contract covers fp32/fp16/bf16; fp64 takes the torch path everywhere
        return "sdpa"
    return "triton" if backend_of(q, "tinyformer.kernels.attention") == "triton" else "sdpa"


def plan(q, k, v, causal: bool = False, key_padding_mask=None, needs_grad: Optional[bool] = None,
         cu_seqlens=None) -> Plan:
    """The dispatch decision for these inputs (validated first). needs_grad defaults to whether autograd records
    this call; the decode path is forward-only, so a call that needs gradients takes the flash path. Packed
    documents (cu_seqlens, Tq == Tk) always take the flash path."""
    B, Hq, Hkv, Tq, Tk, D = check_attention_args(q, k, v, key_padding_mask, cu_seqlens=cu_seqlens)
    backend = _backend(q)
    if backend == "sdpa":
        return Plan("sdpa", "sdpa")
    if needs_grad is None:
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    arch = arch_of(q.device)
    if not needs_grad and cu_seqlens is None and Tq <= DECODE_MAX_TQ and Tk >= DECODE_MIN_TK:
        G = Hq // Hkv
        c = kernel_configs("decode", D, q.dtype, arch, rows=G * Tq)[0]
        n_tiles = cdiv(Tk, c.block_n)
        if q.is_cuda:  # enough splits for about two waves of programs over the SMs
            base = B * Hkv * cdiv(G * Tq, c.block_m)  # programs without splitting
            splits = max(1, min(n_tiles, cdiv(2 * num_sms(cuda_index(q.device)), base), DECODE_MAX_SPLITS))
        else:  # interpreter: the work is the same however it is split; 4 splits exercise the combine
            splits = min(n_tiles, 4)
        chunk = cdiv(n_tiles, splits) * c.block_n  # keys per split, whole tiles
        return Plan("triton", "decode", c, cdiv(Tk, chunk), chunk)
    return Plan("triton", "flash", kernel_configs("fwd", D, q.dtype, arch, has_kpm=key_padding_mask is not None,
                                                  varlen=cu_seqlens is not None)[0])


@functools.lru_cache(maxsize=None)
def _autotuned_fwd(cands: tuple, do_bench=None):
    """The forward wrapped in triton.autotune over the heuristic's candidates (built on first use, never at import).
    Keyed on head dim, mask, dtype and power-of-two buckets of Tq and Tk and causal, so a growing KV cache does not
    retune at every step. do_bench: a timer override (tests pass a CPU timer; GPU uses triton's default)."""
    tconfigs = [triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n}, num_warps=c.num_warps,
                              num_stages=c.num_stages) for c in cands]
    return triton.autotune(configs=tconfigs, key=["HEAD_DIM", "HAS_KPM", "VARLEN", "TQ_KEY", "TK_KEY", "CAUSAL_KEY"],
                           do_bench=do_bench)(_attn_fwd_kernel)


def _flash_fwd(q, k, v, causal, scale, key_padding_mask, docs=None, configs=None, do_bench=None):
    """Launch the forward. Returns out (B, Hq, Tq, D) in q's dtype and lse2 (B, Hq, Tq) fp32. docs: `_doc_args`.
    configs: override the heuristic's candidates (tests); more than one goes through triton.autotune."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    o = torch.empty((B, Hq, Tq, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, Hq, Tq), device=q.device, dtype=torch.float32)
    kpm, smb, smn, has_kpm = _kpm_args(key_padding_mask, q)
    doc, doc_stride, varlen = docs if docs is not None else _doc_args(None, q)
    upcast, prec = _kernel_flags(q)
    if configs is None:
        configs = kernel_configs("fwd", D, q.dtype, arch_of(q.device), has_kpm=has_kpm, varlen=varlen)
        if not _autotune_enabled():
            configs = configs[:1]
    args = (q, k, v, o, lse, kpm, doc, *q.stride(), *k.stride(), *v.stride(), *o.stride(), smb, smn, doc_stride,
            Hq, Hq // Hkv, Tq, Tk, _causal_offset(causal, Tq, Tk), scale * LOG2E,
            triton_next_pow2(Tq), triton_next_pow2(Tk), int(causal))
    meta = dict(HEAD_DIM=D, BLOCK_D=block_d(D), HAS_KPM=has_kpm, UPCAST=upcast, DOT_PREC=prec, VARLEN=varlen)
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
    cc = kernel_configs("decode_combine", D, q.dtype, arch_of(q.device))[0]
    _attn_decode_combine_kernel[(cdiv(R, cc.block_m),)](
        op, lp, o, S, R, HEAD_DIM=D, BLOCK_D=block_d(D), BLOCK_S=max(2, triton_next_pow2(S)), BLOCK_R=cc.block_m,
        num_warps=cc.num_warps, num_stages=cc.num_stages)
    stats["decode_split_kv"] += 1
    stats["decode_splits"] += S
    return o


def dkdv_head_splits(programs: int, G: int, device) -> tuple:
    """(S, heads per split) for the dK/dV kernel: its grid is one program per K/V tile and kv head, so GQA/MQA with
    few kv heads leaves most SMs idle (MQA, T = 4096, 128-key tiles: 32 programs on 132 SMs); the G query heads are
    then split over S programs per tile, about one wave in all. Under the interpreter 2 splits exercise the sum."""
    if G == 1:
        return 1, 1
    want = min(G, cdiv(num_sms(cuda_index(device)), programs)) if device.type == "cuda" else 2
    per = cdiv(G, max(1, want))
    return cdiv(G, per), per


def _flash_bwd(do, q, k, v, o, lse, causal, scale, key_padding_mask, docs):
    """Launch preprocess, dK/dV and dQ. Returns dq, dk, dv in the dtypes of q, k, v. docs: `_doc_args`."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    arch = arch_of(q.device)
    upcast, prec = _kernel_flags(q)
    kpm, smb, smn, _ = _kpm_args(key_padding_mask, q)
    doc, doc_stride, varlen = docs
    dims = dict(HEAD_DIM=D, BLOCK_D=block_d(D))

    delta = torch.empty((B, Hq, Tq), device=q.device, dtype=torch.float32)
    c = kernel_configs("bwd_preprocess", D, q.dtype, arch)[0]
    _attn_bwd_preprocess_kernel[(cdiv(Tq, c.block_m), B * Hq)](
        o, do, delta, *o.stride(), *do.stride(), Hq, Tq, **dims, BLOCK_M=c.block_m,
        num_warps=c.num_warps, num_stages=c.num_stages)

    flags = dict(UPCAST=upcast, DOT_PREC=prec, VARLEN=varlen)
    shape_args = (Hq, Hq // Hkv, Tq, Tk, _causal_offset(causal, Tq, Tk), scale * LOG2E, scale)
    c = kernel_configs("bwd_dkdv", D, q.dtype, arch)[0]
    S, per = dkdv_head_splits(B * Hkv * cdiv(Tk, c.block_n), Hq // Hkv, q.device)
    if S == 1:
        dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
        dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
        dks, dvs = dk, dv
    else:  # (S, B, Hkv, Tk, D) fp32 partials, one per split of the query heads
        dks = torch.empty((S, *k.shape), device=k.device, dtype=torch.float32)
        dvs = torch.empty((S, *v.shape), device=v.device, dtype=torch.float32)
    _attn_bwd_dkdv_kernel[(cdiv(Tk, c.block_n), B * Hkv, S)](
        q, k, v, do, lse, delta, dks[0] if S > 1 else dks, dvs[0] if S > 1 else dvs, kpm, doc,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dks.stride()[-4:], *dvs.stride()[-4:], smb, smn,
        doc_stride,
        dks.stride(0) if S > 1 else 0, dvs.stride(0) if S > 1 else 0, per,
        *shape_args, **dims, **flags,
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, num_warps=c.num_warps, num_stages=c.num_stages)
    if S > 1:
        dk, dv = dks.sum(0).to(k.dtype), dvs.sum(0).to(v.dtype)

    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    c = kernel_configs("bwd_dq", D, q.dtype, arch)[0]
    _attn_bwd_dq_kernel[(cdiv(Tq, c.block_m), B * Hq)](
        q, k, v, do, lse, delta, dq, kpm, doc,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), smb, smn, doc_stride,
        *shape_args, **dims, **flags,
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, num_warps=c.num_warps, num_stages=c.num_stages)
    stats["flash_bwd"] += 1
    return dq, dk, dv


# ======================================================================================================================
# autograd.Function and the public op
# ======================================================================================================================
class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, key_padding_mask, cu_seqlens):
        docs = _doc_args(cu_seqlens, q)
        o, lse = _flash_fwd(q, k, v, causal, scale, key_padding_mask, docs)
        ctx.save_for_backward(q, k, v, o, lse, key_padding_mask, docs[0])
        ctx.causal, ctx.scale, ctx.doc_args = causal, scale, docs[1:]
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, key_padding_mask, doc = ctx.saved_tensors
        dq, dk, dv = _flash_bwd(do, q, k, v, o, lse, ctx.causal, ctx.scale, key_padding_mask, (doc, *ctx.doc_args))
        return dq, dk, dv, None, None, None, None


def _check_scale(scale, D: int) -> float:
    if scale is None:
        return D ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def attention(q, k, v, causal: bool = False, scale: Optional[float] = None, key_padding_mask=None,
              cu_seqlens=None):
    """softmax(q k^T * scale + mask) v, fused. q (B, Hq, Tq, D); k, v (B, Hkv, Tk, D) with Hq % Hkv == 0;
    causal is bottom-right aligned (query i sees keys j <= i + Tk - Tq); key_padding_mask bool (B, Tk), True =
    attend. A query row that sees no key gives 0. Differentiable in q, k, v. Returns (B, Hq, Tq, D) in q's dtype.
    cu_seqlens: packed documents, flash-attn's varlen convention (int32/int64 (n_docs + 1,) offsets into the B * T
    tokens, every row boundary among them; self-attention only): each document attends only to itself, causally
    or bidirectionally; not with key_padding_mask (a row's padding is its last document).

    Arguments are validated before anything is launched (ValueError/TypeError naming the argument). CUDA tensors
    and CPU tensors under TRITON_INTERPRET=1 run the Triton kernels (`plan` says which path); other CPU tensors run
    torch SDPA (`cpu.sdpa_attention`)."""
    check_attention_args(q, k, v, key_padding_mask, cu_seqlens=cu_seqlens)
    scale = _check_scale(scale, q.shape[-1])
    p = plan(q, k, v, causal, key_padding_mask, cu_seqlens=cu_seqlens)
    if p.backend == "sdpa":
        stats["sdpa"] += 1
        return sdpa_attention(q, k, v, causal=bool(causal), scale=scale, key_padding_mask=key_padding_mask,
                              cu_seqlens=cu_seqlens)
    if p.path == "decode":
        return _decode_fwd(q, k, v, bool(causal), scale, key_padding_mask, p)
    return _FlashAttention.apply(q, k, v, bool(causal), scale, key_padding_mask, cu_seqlens)
