"""int8 matmuls in Triton: W8A8 (int8 x int8 -> exact int32, scaled in a fused epilogue), the fused dynamic per-token
activation quantizer that feeds it, and int8 weight-only (W8A16) matmul; with a fast torch path on plain CPU.

Public functions (contract in shared/API.md; pure-torch references in `tinyformer.kernels.reference` and
`tinyformer.kernels.quant`):
- `int8_matmul(a, b, a_scale, b_scale, bias=None, out_dtype=torch.float32)`:
  (a @ b.T) * a_scale[:, None] * b_scale[None, :] (+ bias). a int8 (M, K) activations, b int8 (N, K) weight (the
  nn.Linear layout), per-row / per-output-channel float32 scales. The int32 accumulation is exact.
- `int8_matmul_int32(a, b)`: the raw int32 accumulator a @ b.T of the same kernel (EPILOGUE off), for tests and for
  callers that scale themselves.
- `quantize_per_token(x) -> (q int8 (..., K), scale float32 (...))`: one fused pass per row: absmax -> scale =
  absmax / 127 -> q = round(x / scale) (the rule of `quant.quantize_per_token_int8`, bit-exact under the interpreter).
- `int8_weight_only_matmul(x, w_int8, w_scale, bias=None)`: x @ (w_int8 * w_scale[:, None]).T (+ bias) in x's dtype;
  the int8 weight tile is converted in registers and fed to a float tl.dot. Decode shapes (M <= 16) split K over
  programs (partials summed afterwards), so one token still fills the GPU.

Dispatch: CUDA tensors -> Triton; CPU tensors with TRITON_INTERPRET=1 set before import -> the same Triton kernels in
the interpreter; other CPU tensors -> torch's fast CPU kernels (`torch._int_mm` for W8A8, exact;
`torch.ops.aten._weight_int8pack_mm` with bf16 activations for weight-only, or the weight converted to bf16 and
torch's bf16 matmul from 128 rows on: bf16 accuracy; measured numbers in the comments and in benchmarks/matmul.py),
or the reference where those do not apply.

References:
- Dettmers et al. 2022, "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale" (absmax int8 with
  per-row activation and per-column weight scales, int32 accumulation).
- Xiao et al. 2023, "SmoothQuant" (W8A8 with dynamic per-token activation scales and per-channel weight scales).
- The Triton matrix multiplication tutorial (triton-lang/triton, python/tutorials/03-matrix-multiplication.py):
  grouped program ordering for L2 reuse, pointer-arithmetic tiles, a K loop with masks.
- Split-K for skinny GEMMs (e.g. CUTLASS's split-K GEMM): decode has M <= 16, so parallelism must come from N and K.

Layout: @triton.jit kernels -> launchers that take blocks/warps/stages from ONE heuristic (`matmul_configs`) ->
public functions, `plan` (which path a call takes) and `aot_specs` (every config for the AOT compile report).
Legend: M rows of activations (tokens), N output features, K input features, S number of K splits.
"""
from __future__ import annotations  # kernel annotations stay strings: the module imports without triton

import functools
import math
import os
import warnings
import weakref
from dataclasses import dataclass
from typing import List, Optional

import torch

from .quant import quantize_per_token_int8
from .device import HAS_TRITON, INTERPRET, tl, triton  # noqa: F401  (HAS_TRITON: public)
from .device import cdiv, cuda_arch as _cuda_arch, cuda_index as _cuda_index, num_sms as _num_sms
from .reference import _need, check_int8_matmul_args, int8_matmul as _int8_matmul_ref, int8_matmul_int32 as _int32_ref
from .reference import check_int8_weight_only_args as _check_weight_only_args
from .reference import int8_weight_only_matmul as int8_weight_only_matmul_reference



__all__ = ["int8_matmul", "int8_matmul_int32", "quantize_per_token", "int8_weight_only_matmul",
           "int8_weight_only_matmul_reference", "plan", "matmul_configs", "aot_specs"]


# ======================================================================================================================
# Kernels
# ======================================================================================================================
@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (pid_m, pid_n) in grouped order: GROUP_M row-tiles run next to each other and share the same
    weight tiles in L2 (Triton matmul tutorial)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _int8_matmul_kernel(a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr,
                        M, N, K,
                        stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
                        HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C tile (BLOCK_M, BLOCK_N) = A (M, K) int8 @ B (N, K)^T int8 in int32; EPILOGUE: * a_scale[m] * b_scale[n]
    (+ bias[n]) in fp32, stored in C's dtype; else the int32 accumulator is stored."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # rows/columns past M/N wrap around (tutorial trick): the loads stay in bounds without a mask, the store drops them
    rm = offs_m % M
    rn = offs_n % N
    a_ptrs = a_ptr + rm[:, None] * stride_am + offs_k[None, :] * stride_ak  # (BLOCK_M, BLOCK_K)
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + rn[None, :] * stride_bn  # (BLOCK_K, BLOCK_N): B^T tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0  # the K tail is masked with 0, which adds nothing to an integer dot
        a = tl.load(a_ptrs, mask=k_mask[None, :], other=0)
        b = tl.load(b_ptrs, mask=k_mask[:, None], other=0)
        # int8 x int8 -> int32: exact (|acc| <= K * 2**14 < 2**31 for K < 131072). out_dtype must be named: triton
        # 3.6 defaults it to fp32 and rejects the int32 accumulator (seen on an H100), 3.9 infers it from acc
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
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


@triton.jit
def _quantize_per_token_kernel(x_ptr, q_ptr, s_ptr, K,
                               stride_xm, stride_xk, stride_qm, stride_qk,
                               BLOCK_K: tl.constexpr):
    """One program per row: pass 1 row absmax, scale = absmax / 127 (1 for a zero row); pass 2 q = rne(x / scale).
    Divisions are IEEE (div_rn) so the codes equal torch.round(x / scale) bit for bit."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row * stride_xm
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_row + (k0 + offs) * stride_xk, mask=offs < K - k0, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.math.div_rn(tl.max(amax, axis=0), 127.0)
    scale = tl.where(scale > 0, scale, 1.0)
    tl.store(s_ptr + row, scale)
    q_row = q_ptr + row * stride_qm
    for k0 in range(0, K, BLOCK_K):
        mask = offs < K - k0
        x = tl.load(x_row + (k0 + offs) * stride_xk, mask=mask, other=0.0).to(tl.float32)
        v = tl.math.div_rn(x, scale)
        # round half to even by the magic-number trick: |v| <= 127, so v + 1.5 * 2**23 lies in [2**23, 2**24) where the
        # fp32 spacing is 1 and the add itself rounds v to an integer (IEEE round-to-nearest-even, as torch.round);
        # the subtract is exact. libdevice.rint would do it on the GPU but is broken in the interpreter.
        r = (v + 12582912.0) - 12582912.0
        r = tl.minimum(tl.maximum(r, -127.0), 127.0)
        tl.store(q_row + (k0 + offs) * stride_qk, r.to(tl.int8), mask=mask)


@triton.jit
def _int8_weight_only_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr,
                             M, N, K,
                             stride_xm, stride_xk, stride_wn, stride_wk, stride_os, stride_om, stride_on,
                             K_SPLIT,
                             HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                             DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             GROUP_M: tl.constexpr):
    """out tile = x (M, K) float @ (w (N, K) int8)^T * w_scale[n] (+ bias) with fp32 accumulation. Split pid 1 takes
    K columns [pid_k * K_SPLIT, min((pid_k + 1) * K_SPLIT, K)). SPLIT_K == 1: the full epilogue, stored in out's
    dtype; SPLIT_K > 1: scaled fp32 partials at out + pid_k * stride_os, summed (+ bias) by the launcher."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rm = offs_m % M
    rn = offs_n % N
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
    out_ptrs = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn).to(tl.float32)[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


# ======================================================================================================================
# The heuristic: one table of configs for every low-bit kernel (this file's and int4_mm's, which imports it)
# ======================================================================================================================
@dataclass(frozen=True)
class MatmulConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8


DECODE_MAX_M = 16  # up to 16 rows (a decode step, or speculative verification) take the BLOCK_M = 16 split-K path
MAX_SPLITS = 32

# GPU candidates, default first. Every entry compiles for sm_80 and sm_90 with no spills (`python -m
# tinyformer.kernels.aot --modules int8_mm,int4_mm`, triton 3.9, bundled ptxas; registers sm_80 / sm_90):
# - W8A8 (int8 tl.dot, fp16 output + bias epilogue): 128x128x64 on 4 warps spilled 636 B on sm_80 (255 registers;
#   248 and no spill on sm_90), 128x256x64 and 256x128x64 on 8 warps 700 / 588 B on sm_80. Shipped: 128x128x64 on
#   8 warps (251 / 107), 128x128x128 on 8 warps (238 / 126), 128x64x128 and 64x128x128 on 4 warps (254 / 123,
#   238 / 126), 64x64x128 (158 / 72); decode 16x64x128 (84 / 54) and 16x128x128 (115 / 84).
# - weight-only int8 converts the int8 weight tile to fp16/bf16 in registers before the dot: prefill 128x128x64 on
#   8 warps (170 / 128), 64x128x64 and 128x64x64 on 4 warps (<= 201 / 136). Decode 16x64x128 with 4 stages spilled
#   4 B on sm_90 with bf16 activations (80 registers; fp16 did not, 3 stages still did, 2 did not): replaced by
#   16x64x256 with 3 stages (96 / 92 registers; a deeper K per load for a memory-bound GEMV).
# - int4: see int4_mm's docstring (interleaving the dequantized nibbles into one dot removed the sm_80 spills);
#   prefill <= 208 / 191 registers, decode <= 128 / 128. One row (i4_gemv, <= 80 registers): an H100 sweep over
#   block_n 16-128, block_k 64/128, 2-8 warps (CUDA-graph timing, 4096^2, 8192^2, 4096 x 11008) put 64x128 on
#   8 warps (8192^2: 35.1 us), 32x128 on 4 warps (4096^2: 12.7 us, 4096 x 11008: 24.1 us) and 128x64 on 8 warps
#   first; the autotuner picks among them per layer shape.
_GPU_TABLE = {
    "w8a8": [MatmulConfig(128, 128, 64, 8, 3), MatmulConfig(128, 128, 128, 8, 3), MatmulConfig(128, 64, 128, 4, 3),
             MatmulConfig(64, 128, 128, 4, 3), MatmulConfig(64, 64, 128, 4, 4)],
    "w8a8_decode": [MatmulConfig(16, 64, 128, 4, 4), MatmulConfig(16, 128, 128, 4, 3)],
    "wo": [MatmulConfig(128, 128, 64, 8, 3), MatmulConfig(64, 128, 64, 4, 3), MatmulConfig(128, 64, 64, 4, 3)],
    "wo_decode": [MatmulConfig(16, 64, 256, 4, 3), MatmulConfig(16, 128, 128, 4, 4), MatmulConfig(16, 64, 64, 4, 4),
                  MatmulConfig(16, 32, 128, 2, 4)],
    "quant": [MatmulConfig(1, 0, 1024, 4, 1)],
    # int4_mm (weight-only int4, group-wise): block_k is capped at the group size by its launcher
    # one row (block_m unused): block_n outputs x block_k columns, CUDA cores; no shared memory, so stages do nothing
    "i4_gemv": [MatmulConfig(1, 64, 128, 8, 2), MatmulConfig(1, 32, 128, 4, 2), MatmulConfig(1, 128, 64, 8, 2)],
    "i4_decode": [MatmulConfig(16, 64, 128, 4, 4), MatmulConfig(16, 128, 128, 4, 3), MatmulConfig(16, 32, 128, 2, 4)],
    "i4": [MatmulConfig(64, 128, 64, 4, 3), MatmulConfig(128, 128, 64, 8, 3), MatmulConfig(128, 64, 64, 4, 3)],
}
# Under the interpreter a kernel costs ~ programs x loop iterations x a few ms of numpy, whatever the tile size:
# 64-wide tiles keep the tests fast; 16-row decode tiles still cover the split-K path.
_INTERPRET_TABLE = {
    "w8a8": MatmulConfig(64, 64, 64, 4, 1),
    "w8a8_decode": MatmulConfig(16, 64, 64, 4, 1),
    "wo": MatmulConfig(64, 64, 64, 4, 1),
    "wo_decode": MatmulConfig(16, 64, 64, 4, 1),
    "quant": MatmulConfig(1, 0, 256, 4, 1),
    "i4_gemv": MatmulConfig(1, 32, 64, 4, 1),
    "i4_decode": MatmulConfig(16, 64, 64, 4, 1),
    "i4": MatmulConfig(64, 64, 64, 4, 1),
}


def matmul_configs(kind: str, arch: Optional[int]) -> List[MatmulConfig]:
    """THE heuristic: candidate configs for one kernel kind, default first; arch None = the interpreter (one config,
    as @triton.autotune with more than one config fails there). Kinds: w8a8, w8a8_decode, wo, wo_decode, quant
    (this file) and i4, i4_decode (int4_mm)."""
    if kind not in _GPU_TABLE:
        raise ValueError(f"kind must be one of {sorted(_GPU_TABLE)}, got {kind!r}")
    if arch is None:
        return [_INTERPRET_TABLE[kind]]
    cands = list(_GPU_TABLE[kind])
    if arch < 90 and arch != 80:  # sm_86/sm_89: ~100 KB of shared memory, not the A100's 164 KB
        cands = [MatmulConfig(c.block_m, c.block_n, c.block_k, c.num_warps, min(c.num_stages, 2), c.group_m)
                 for c in cands]
    return list(dict.fromkeys(cands))


def split_k(M: int, N: int, K: int, c: MatmulConfig, device: torch.device, align: int = 1):
    """(splits, K_SPLIT) for the decode path: K is cut into `splits` ranges of K_SPLIT columns, a multiple of
    c.block_k and of `align` (int4: the group size when it is a multiple of block_k, so a tile never straddles two
    groups). About two waves of programs over the SMs on a GPU; 2 under the interpreter (the work is the same however
    it is split, and 2 exercises the partial sums)."""
    unit = math.lcm(c.block_k, align)
    units = cdiv(K, unit)
    if device.type == "cuda":
        base = cdiv(M, c.block_m) * cdiv(N, c.block_n)
        want = max(1, min(units, MAX_SPLITS, cdiv(2 * _num_sms(_cuda_index(device)), base)))
    else:
        want = min(units, 2)
    per = cdiv(units, max(1, want))  # whole units per split; no split is left empty
    return cdiv(units, per), per * unit


# ======================================================================================================================
# Launch helpers shared with int4_mm
# ======================================================================================================================
def arch_of(device: torch.device) -> Optional[int]:
    """Compute capability as an int (80, 90, ...) for CUDA tensors; None for CPU tensors (the interpreter)."""
    return _cuda_arch(_cuda_index(device)) if device.type == "cuda" else None


@functools.lru_cache(maxsize=None)
def _warn_once(msg: str):
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def backend_of(t: torch.Tensor, module_interpret: bool, module: str) -> str:
    """"triton" (CUDA, or CPU under an interpreter set before `module` was imported) or "torch" (every other case)."""
    if t.is_cuda:
        if not HAS_TRITON:
            raise RuntimeError(f"{module} on CUDA tensors needs triton (pip install triton)")
        return "triton"
    if t.device.type == "cpu" and HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1":
        if module_interpret:
            return "triton"
        _warn_once(f"TRITON_INTERPRET=1 was set after {module} was imported, so its kernels were built for a GPU; "
                   "CPU tensors take the torch path. Set it before the import.")
    return "torch"


def dot_flags(x_dtype: torch.dtype, device: torch.device):
    """(DOT_DTYPE, DOT_PREC) for a float activation tile: the interpreter computes bf16 on raw bits, so bf16 tiles are
    upcast to fp32 right after loading there; fp32 dots follow torch's TF32 switch (IEEE fp32 by default, like torch's
    own fp32 matmul), so an fp32 call is accurate to fp32 rounding."""
    if x_dtype == torch.bfloat16:
        dot = tl.float32 if device.type == "cpu" else tl.bfloat16
    elif x_dtype == torch.float16:
        dot = tl.float16
    else:
        dot = tl.float32
    prec = "tf32" if x_dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32 \
        else "ieee"
    return dot, prec


def _tile_kwargs(fn, c: MatmulConfig) -> dict:
    """The config's tile sizes that fn takes (the one-row int4 kernel has no BLOCK_M / GROUP_M)."""
    tiles = dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, GROUP_M=c.group_m)
    return {k: v for k, v in tiles.items() if k in fn.arg_names}


def launch_kwargs(fn, c: MatmulConfig) -> dict:
    return dict(_tile_kwargs(fn, c), num_warps=c.num_warps, num_stages=c.num_stages)


# A timer for the autotuner: None = triton.testing.do_bench (GPU). Tests set a CPU timer, so the autotuned launch
# path runs under the interpreter too (with triton's default timer it fails there: "0 active drivers").
AUTOTUNE_DO_BENCH = None


@functools.lru_cache(maxsize=None)
def autotuned(fn, cands: tuple, key: tuple, do_bench=None):
    """fn wrapped in triton.autotune over the heuristic's candidates, built on first use (never at import)."""
    configs = [triton.Config(_tile_kwargs(fn, c), num_warps=c.num_warps, num_stages=c.num_stages) for c in cands]
    return triton.autotune(configs=configs, key=list(key), do_bench=do_bench)(fn)


def launch(fn, grid_fn, cands: List[MatmulConfig], key: tuple, *args, **kwargs):
    """Launch fn with the single candidate (interpreter, or a one-entry table) or through the autotuner (keyed on
    `key`: the N, K, flags of a layer, so each layer shape is tuned once)."""
    if len(cands) == 1:
        c = cands[0]
        fn[grid_fn(dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n))](*args, **kwargs, **launch_kwargs(fn, c))
    else:
        autotuned(fn, tuple(cands), key, AUTOTUNE_DO_BENCH)[grid_fn](*args, **kwargs)


def _check_out_dtype(out_dtype):
    _need(out_dtype in (torch.float32, torch.float16, torch.bfloat16),
          lambda: f"out_dtype must be torch.float32, torch.float16 or torch.bfloat16, got {out_dtype}", TypeError)


# ======================================================================================================================
# Launchers
# ======================================================================================================================
def _launch_int8_matmul(a, b, a_scale, b_scale, bias, out_dtype, epilogue: bool):
    M, K = a.shape
    N = b.shape[0]
    arch = arch_of(a.device)
    kind = "w8a8_decode" if M <= DECODE_MAX_M else "w8a8"
    cands = matmul_configs(kind, arch)
    # interpreter: fp32 -> bf16 stores truncate there, so bf16 is stored as fp32 and rounded by torch
    store_dtype = torch.int32 if not epilogue else (
        torch.float32 if out_dtype == torch.bfloat16 and a.device.type == "cpu" else out_dtype)
    c = torch.empty((M, N), device=a.device, dtype=store_dtype)
    if M == 0 or N == 0:
        return c.to(out_dtype) if epilogue else c
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    a_scale = a_scale if epilogue else c  # dummy pointers when unused
    b_scale = b_scale if epilogue else c
    launch(_int8_matmul_kernel, grid, cands, ("N", "K", "HAS_BIAS", "EPILOGUE"),
           a, b, c, a_scale, b_scale, bias if bias is not None else c,
           M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
           HAS_BIAS=bias is not None, EPILOGUE=epilogue)
    return c if not epilogue else c.to(out_dtype)


def _launch_quantize_per_token(x2):
    M, K = x2.shape
    q = torch.empty((M, K), device=x2.device, dtype=torch.int8)
    s = torch.empty((M,), device=x2.device, dtype=torch.float32)
    if M == 0:
        return q, s
    c = matmul_configs("quant", arch_of(x2.device))[0]
    block_k = min(c.block_k, max(16, triton.next_power_of_2(K))) if HAS_TRITON else c.block_k
    _quantize_per_token_kernel[(M,)](x2, q, s, K, x2.stride(0), x2.stride(1), q.stride(0), q.stride(1),
                                     BLOCK_K=block_k, num_warps=c.num_warps)
    return q, s


def _launch_weight_only(x, w, w_scale, bias):
    M, K = x.shape
    N = w.shape[0]
    if M == 0 or N == 0 or K == 0:
        return int8_weight_only_matmul_reference(x, w, w_scale, bias)
    decode = M <= DECODE_MAX_M
    cands = matmul_configs("wo_decode" if decode else "wo", arch_of(x.device))
    splits, k_split = split_k(M, N, K, cands[0], x.device) if decode else (1, K)
    dot_dtype, dot_prec = dot_flags(x.dtype, x.device)
    # interpreter: fp32 -> bf16 stores truncate there, so bf16 is stored as fp32 and rounded by torch
    buf_dtype = torch.float32 if splits > 1 or (x.dtype == torch.bfloat16 and x.device.type == "cpu") else x.dtype
    buf = torch.empty((splits, M, N), device=x.device, dtype=buf_dtype)  # (S, M, N): partials when S > 1
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]), splits)  # noqa: E731
    launch(_int8_weight_only_kernel, grid, cands, ("N", "K", "HAS_BIAS", "SPLIT_K"),
           x, w, w_scale, bias if bias is not None else w_scale, buf,
           M, N, K, x.stride(0), x.stride(1), w.stride(0), w.stride(1), buf.stride(0), buf.stride(1), buf.stride(2),
           k_split, HAS_BIAS=bias is not None, SPLIT_K=splits, DOT_DTYPE=dot_dtype, DOT_PREC=dot_prec)
    return finish_splits(buf, bias, x.dtype)


def finish_splits(buf, bias, dtype):
    """(S, M, N) kernel output -> (M, N) in dtype: S == 1 holds the finished tile (bias added in the kernel); S > 1
    holds fp32 partials, summed here in a fixed order (deterministic, unlike atomics), then the bias."""
    if buf.shape[0] == 1:
        return buf[0].to(dtype)
    out = buf.sum(0)  # (M, N) fp32
    if bias is not None:
        out += bias.to(torch.float32)
    return out.to(dtype)


# ======================================================================================================================
# CPU fast paths (torch's own int8 kernels), measured on the project's 2-core AVX512-VNNI/BF16 EPYC, torch 2.13
# ======================================================================================================================
# torch._int_mm on CPU (torch 2.13): exact for M in 1..64, N in 1..128, K in 2..256, multiples of 8 or not (both the
# (N, K)^T view and a contiguous (K, N) weight); K = 1 with N > 1 returns GARBAGE in the first column. Tiny K gains
# nothing from it, so K < 16 takes the int64 reference. The int32 accumulator cannot overflow below K = 2**31 / 2**14.
INT_MM_MIN_K = 16
INT_MM_MAX_K = 2 ** 31 // 2 ** 14
# torch.ops.aten._weight_int8pack_mm with bf16 activations SEGFAULTS for K not a multiple of 16 (K = 8, 24, 130,
# 136 crashed, K = 16, 48, 128, 144 did not, for N in 1..72 and M in 1..33): only multiples of 32 are sent to it.
INT8PACK_K_MULTIPLE = 32


def _have(op_name: str) -> bool:
    return hasattr(torch.ops.aten, op_name) if op_name.startswith("_weight") else hasattr(torch, op_name)


@functools.cache
def onednn_bf16() -> bool:
    """Whether oneDNN multiplies bf16 on this CPU (AVX512 BW/VL/DQ or AVX-NE-CONVERT). Where it does not (AVX2-only
    CPUs), torch's bf16 matmul is aten's own, a GEMV per row: 1x576 @ 576x1536 takes 0.12 ms, 128 rows 12.7 ms, where
    the same 128-row product in fp32 takes 2.0 ms (2-core AVX2 EPYC)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return torch.backends.mkldnn.is_available() and check is not None and bool(check())


class WeightCache:
    """Derived copies of weights (a transposed int8 weight, a repacked int4 weight), one per live tensor: keyed by the
    id of the first tensor and checked against weak references to every source tensor and their in-place versions
    (an in-place update rebuilds). An entry holds no strong reference to its sources and goes when the first dies."""

    def __init__(self):
        self._entries: dict = {}

    def get(self, tensors: tuple, extra, build):
        key = id(tensors[0])
        stamp = tuple(t._version for t in tensors) + (extra,)
        hit = self._entries.get(key)
        if hit is not None and all(r() is t for r, t in zip(hit[0], tensors)) and hit[1] == stamp:
            return hit[2]
        value = build()
        entries = self._entries  # bound now: at interpreter exit the module global may already be gone
        refs = tuple(weakref.ref(t, (lambda _, k=key, e=entries: e.pop(k, None)) if i == 0 else None)
                     for i, t in enumerate(tensors))
        entries[key] = (refs, stamp, value)
        return value

    def __contains__(self, t) -> bool:
        return id(t) in self._entries

    def __len__(self) -> int:
        return len(self._entries)


# torch._int_mm on CPU, 4096 x 4096 int8 weight, 2 threads (quiet machine): with the weight as the (K, N) view of the
# (N, K) tensor, M = 1 takes 0.16 ms but M = 2..64 take 3.1-5.2 ms; with a contiguous (K, N) copy M = 1 takes 0.87 ms
# and M = 2 / 8 / 16 / 64 take 1.05 / 1.19 / 1.52 / 3.7 ms. So: rows one at a time on the view up to INT_MM_ROWWISE
# rows, a (K, N) copy made once per weight (twice the int8 weight memory on CPU) above that.
INT_MM_ROWWISE = 4
_TRANSPOSED = WeightCache()


def int8_matmul_int32_cpu(a, b):
    """a @ b.T as int32 with torch._int_mm (exact); the int64 reference, narrowed, where it does not apply."""
    M, K = a.shape
    if not (_have("_int_mm") and INT_MM_MIN_K <= K < INT_MM_MAX_K and M > 0 and b.shape[0] > 0):
        return _int32_ref(a, b).to(torch.int32)
    if M <= INT_MM_ROWWISE:  # b (N, K) -> (K, N) column-major view: torch's fast GEMV, no copy of the weight
        return torch.cat([torch._int_mm(a[i:i + 1], b.T) for i in range(M)])  # (M, N)
    bt = _TRANSPOSED.get((b,), None, lambda: b.T.contiguous())  # (K, N) row-major, made once per weight
    return torch._int_mm(a, bt)


def int8_matmul_cpu(a, b, a_scale, b_scale, bias=None, out_dtype=torch.float32):
    """The W8A8 CPU fast path: torch._int_mm accumulation, then the reference's epilogue (same order of operations,
    so the result equals `reference.int8_matmul` bit for bit)."""
    check_int8_matmul_args(a, b, a_scale, b_scale, bias)
    _check_out_dtype(out_dtype)
    acc = int8_matmul_int32_cpu(a, b).to(torch.float32)  # (M, N)
    out = acc * a_scale[:, None] * b_scale[None, :]
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(out_dtype)


# Measured (4096 x 4096 weight, bf16 activations, 2 threads; the machine was shared, so +-30%): torch's packed int8
# kernel is a GEMV at heart: M = 1: 0.49 ms (fp32 matmul 3.5 ms); M = 128: 34 ms, M = 256: 69 ms, M = 512: 131 ms,
# slower than the fp32 matmul (36 / 59 / 108 ms). Converting the weight to bf16 (exact for int8 codes, ~11 ms) and
# running torch's bf16 matmul, scaled per column after, took 24 / 34 / 54 ms there (and lost below M = 64).
WO_DEQUANT_MIN_M = 128


def int8_weight_only_matmul_cpu(x, w, w_scale, bias=None):
    """The W8A16 CPU fast path: torch's `_weight_int8pack_mm` (AVX512-BF16) with bf16 activations and bf16 scales;
    from M = WO_DEQUANT_MIN_M rows on, the weight converted to bf16 and torch's bf16 matmul. fp32/fp16 activations
    are cast to bf16 and the result back: into the packed op they are 5-50x slower than bf16 (1 x 4096 @ 4096^2,
    2 threads: fp32 14 ms, fp16 24 ms, bf16 0.5 ms) while the fp32 matmul takes 3.5 ms, so the cast wins and the
    result has bf16 accuracy (relative error ~2**-8). K not a multiple of 32 (the op crashes) takes the reference."""
    _check_weight_only_args(x, w, w_scale, bias)
    M, K = x.shape
    if not (_have("_weight_int8pack_mm") and K % INT8PACK_K_MULTIPLE == 0 and M > 0 and w.shape[0] > 0):
        return int8_weight_only_matmul_reference(x, w, w_scale, bias)
    xb = x.to(torch.bfloat16).contiguous()
    if M >= WO_DEQUANT_MIN_M and not onednn_bf16():  # no bf16 matmul hardware: fp32 (128 x 576 @ 576 x 1536 on a
        out = (x.float() @ w.float().T) * w_scale.float()  # 2-core AVX2 EPYC: 3.4 ms against 21.7 ms in bf16)
    elif M >= WO_DEQUANT_MIN_M:
        out = (xb @ w.to(torch.bfloat16).T).float() * w_scale.float()  # (M, N); int8 -> bf16 is exact
    else:
        w = w.contiguous()
        if w.data_ptr() % 64:  # the AVX-512 kernel segfaults on weights not 64-byte aligned (seen: offset 56, M=32)
            w = w.clone()
        out = torch.ops.aten._weight_int8pack_mm(xb, w, w_scale.to(torch.bfloat16))  # (M, N) bf16
    if bias is not None:
        out = out.float() + bias.float()
    return out.to(x.dtype)


# ======================================================================================================================
# Public API
# ======================================================================================================================
def int8_matmul(a, b, a_scale, b_scale, bias=None, out_dtype=torch.float32):
    """(a @ b.T) * a_scale[:, None] * b_scale[None, :] (+ bias) with exact int32 accumulation (API.md).
    a int8 (M, K), b int8 (N, K), a_scale float32 (M,), b_scale float32 (N,), bias (N,) any float dtype."""
    check_int8_matmul_args(a, b, a_scale, b_scale, bias)
    _check_out_dtype(out_dtype)
    if bias is not None:
        _need(bias.is_floating_point(), lambda: f"bias must be a float tensor, got {bias.dtype}", TypeError)
    if backend_of(a, INTERPRET, "tinyformer.kernels.int8_mm") == "triton":
        return _launch_int8_matmul(a, b, a_scale, b_scale, bias, out_dtype, epilogue=True)
    if a.device.type == "cpu":
        return int8_matmul_cpu(a, b, a_scale, b_scale, bias, out_dtype)
    return _int8_matmul_ref(a, b, a_scale, b_scale, bias, out_dtype)


def int8_matmul_int32(a, b):
    """The exact int32 accumulator a @ b.T of int8 a (M, K) and b (N, K) (the kernel with its epilogue off)."""
    rows = lambda t: t.shape[0] if isinstance(t, torch.Tensor) and t.dim() >= 1 else 0  # noqa: E731
    dev = a.device if isinstance(a, torch.Tensor) else "cpu"
    M, N, K = check_int8_matmul_args(a, b, torch.ones(rows(a), device=dev), torch.ones(rows(b), device=dev))
    _need(K < INT_MM_MAX_K, lambda: f"K={K} could overflow the int32 accumulator (K must be < {INT_MM_MAX_K})")
    if backend_of(a, INTERPRET, "tinyformer.kernels.int8_mm") == "triton":
        return _launch_int8_matmul(a, b, None, None, None, None, epilogue=False)
    if a.device.type == "cpu":
        return int8_matmul_int32_cpu(a, b)
    return _int32_ref(a, b).to(torch.int32)


def quantize_per_token(x):
    """Dynamic per-token int8 quantization of activations x (..., K) in one fused kernel: returns (q int8 (..., K),
    scale float32 (...)) with scale = absmax(row) / 127 (1 for an all-zero row) and q = round(x / scale), the rule of
    `quant.quantize_per_token_int8` (its reference)."""
    _need(isinstance(x, torch.Tensor), lambda: f"x must be a torch.Tensor, got {type(x).__name__}", TypeError)
    _need(x.dtype in (torch.float32, torch.float16, torch.bfloat16),
          lambda: f"x must be float32/float16/bfloat16, got {x.dtype}", TypeError)
    _need(x.dim() >= 1 and x.shape[-1] >= 1, lambda: f"x must be (..., K) with K >= 1, got shape {tuple(x.shape)}")
    if backend_of(x, INTERPRET, "tinyformer.kernels.int8_mm") != "triton":
        return quantize_per_token_int8(x)
    x2 = x.reshape(-1, x.shape[-1])  # (..., K) -> (M, K), a view when x is contiguous
    q, s = _launch_quantize_per_token(x2)
    return q.view(x.shape), s.view(x.shape[:-1])


def int8_weight_only_matmul(x, w_int8, w_scale, bias=None):
    """x (M, K) float @ (w_int8 (N, K) * w_scale (N,)[:, None]).T (+ bias), in x's dtype (W8A16 weight-only).
    On the CPU fast path (no interpreter) the product is computed in bf16 (see int8_weight_only_matmul_cpu)."""
    _check_weight_only_args(x, w_int8, w_scale, bias)
    if backend_of(x, INTERPRET, "tinyformer.kernels.int8_mm") == "triton":
        return _launch_weight_only(x, w_int8, w_scale, bias)
    if x.device.type == "cpu":
        return int8_weight_only_matmul_cpu(x, w_int8, w_scale, bias)
    return int8_weight_only_matmul_reference(x, w_int8, w_scale, bias)


def plan(op: str, M: int, N: int, K: int, device="cpu") -> dict:
    """Which path a call takes (for benchmarks and debugging): op "w8a8" or "wo"; returns backend, kind, config,
    splits."""
    device = torch.device(device)
    probe = torch.empty(0, device=device)
    backend = backend_of(probe, INTERPRET, "tinyformer.kernels.int8_mm")
    if backend != "triton":
        return dict(backend="torch", kind="cpu", config=None, splits=1)
    kind = op + ("_decode" if M <= DECODE_MAX_M else "")
    c = matmul_configs(kind, arch_of(device))[0]
    splits = split_k(M, N, K, c, device)[0] if kind == "wo_decode" else 1
    return dict(backend="triton", kind=kind, config=c, splits=splits)


# ======================================================================================================================
# AOT specs: every GPU configuration the launchers can pick, for `python -m tinyformer.kernels.aot`
# ======================================================================================================================
_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def aot_specs() -> List[dict]:
    """One spec per (kernel, candidate config, dtype) the GPU launchers can pick on sm_80/sm_90: W8A8 prefill and
    decode with the fused epilogue (fp16 output, bias; EPILOGUE off shares the main loop), weight-only prefill and
    decode (fp16 and bf16 activations; decode with split-K partials, prefill with the full epilogue) and the
    per-token quantizer. Contiguous operands, as the JIT sees them: unit strides are constexpr 1, pointers and the
    other strides 16-divisible."""
    if not HAS_TRITON:
        return []
    specs = []
    common = dict(targets=[80, 90])
    for kind in ("w8a8", "w8a8_decode"):
        for c in matmul_configs(kind, 80):
            sig = {"a_ptr": "*i8", "b_ptr": "*i8", "c_ptr": "*fp16", "a_scale_ptr": "*fp32", "b_scale_ptr": "*fp32",
                   "bias_ptr": "*fp16", "M": "i32", "N": "i32", "K": "i32", "stride_am": "i32",
                   "stride_ak": "constexpr", "stride_bn": "i32", "stride_bk": "constexpr", "stride_cm": "i32",
                   "stride_cn": "constexpr"}
            cx = dict(stride_ak=1, stride_bk=1, stride_cn=1, HAS_BIAS=True, EPILOGUE=True, BLOCK_M=c.block_m,
                      BLOCK_N=c.block_n, BLOCK_K=c.block_k, GROUP_M=c.group_m)
            sig.update({k: "constexpr" for k in cx})
            specs.append(dict(name=f"int8_mm.{kind}_{c.block_m}x{c.block_n}x{c.block_k}_w{c.num_warps}s{c.num_stages}",
                              fn=_int8_matmul_kernel, signature=sig, constexprs=cx, num_warps=c.num_warps,
                              num_stages=c.num_stages, shipped_forward=True,
                              divisible_by_16=["a_ptr", "b_ptr", "c_ptr", "a_scale_ptr", "b_scale_ptr", "bias_ptr",
                                               "N", "K", "stride_am", "stride_bn", "stride_cm"], **common))
    for kind in ("wo", "wo_decode"):
        for c in matmul_configs(kind, 80):
            for dtype in (torch.float16, torch.bfloat16):
                ty = _TRITON_TYPES[dtype]
                split = kind == "wo_decode"
                sig = {"x_ptr": f"*{ty}", "w_ptr": "*i8", "s_ptr": "*fp32", "bias_ptr": f"*{ty}",
                       "out_ptr": "*fp32" if split else f"*{ty}", "M": "i32", "N": "i32", "K": "i32",
                       "stride_xm": "i32", "stride_xk": "constexpr", "stride_wn": "i32", "stride_wk": "constexpr",
                       "stride_os": "i32", "stride_om": "i32", "stride_on": "constexpr", "K_SPLIT": "i32"}
                cx = dict(stride_xk=1, stride_wk=1, stride_on=1, HAS_BIAS=not split, SPLIT_K=4 if split else 1,
                          DOT_DTYPE=tl.float16 if dtype == torch.float16 else tl.bfloat16, DOT_PREC="ieee",
                          BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, GROUP_M=c.group_m)
                sig.update({k: "constexpr" for k in cx})
                specs.append(dict(
                    name=f"int8_mm.{kind}_{ty}_{c.block_m}x{c.block_n}x{c.block_k}_w{c.num_warps}s{c.num_stages}",
                    fn=_int8_weight_only_kernel, signature=sig, constexprs=cx, num_warps=c.num_warps,
                    num_stages=c.num_stages, shipped_forward=True,
                    divisible_by_16=["x_ptr", "w_ptr", "s_ptr", "bias_ptr", "out_ptr", "N", "K", "stride_xm",
                                     "stride_wn", "stride_os", "stride_om", "K_SPLIT"], **common))
    c = matmul_configs("quant", 80)[0]
    for dtype in (torch.float16, torch.bfloat16):
        ty = _TRITON_TYPES[dtype]
        sig = {"x_ptr": f"*{ty}", "q_ptr": "*i8", "s_ptr": "*fp32", "K": "i32", "stride_xm": "i32",
               "stride_xk": "constexpr", "stride_qm": "i32", "stride_qk": "constexpr", "BLOCK_K": "constexpr"}
        specs.append(dict(name=f"int8_mm.quantize_per_token_{ty}_{c.block_k}_w{c.num_warps}",
                          fn=_quantize_per_token_kernel, signature=sig,
                          constexprs=dict(stride_xk=1, stride_qk=1, BLOCK_K=c.block_k), num_warps=c.num_warps,
                          num_stages=c.num_stages, shipped_forward=True,
                          divisible_by_16=["x_ptr", "q_ptr", "s_ptr", "K", "stride_xm", "stride_qm"], **common))
    return specs
