"""Shared machinery of the low-bit matmul kernels (int8_mm, int8_wo_mm, per_token_quant, int4_mm, fp8_mm, w4a8_mm):
the tile config and its lookup in configs.csv (the one heuristic), grouped tile ordering, split-K for decode shapes and
the sum of the split partials, the dot dtype flags, the launch (one config, or triton.autotune over the candidates),
and the autograd.Function that makes a frozen low-bit weight's product differentiable in its input (QLoRA).

References:
- The Triton matrix multiplication tutorial (triton-lang/triton, python/tutorials/03-matrix-multiplication.py):
  grouped program ordering for L2 reuse.
- Split-K for skinny GEMMs (e.g. CUTLASS's split-K GEMM): decode has M <= 16, so parallelism must come from N and K.

Legend: M rows of activations (tokens), N output features, K input features, S number of K splits.
"""
from __future__ import annotations  # kernel annotations stay strings: the module imports without triton

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import List, Optional

import torch

from .configs import TILE, arch_family, candidates
from .device import cdiv, cuda_index, num_sms, tl, triton


@dataclass(frozen=True)
class MatmulConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8
    row: Optional[int] = dataclasses.field(default=None, compare=False, repr=False)  # its configs.csv row


DECODE_MAX_M = 16  # up to 16 rows (a decode step, or speculative verification) take the 16-row split-K path
MAX_SPLITS = 32

# Under the interpreter a kernel costs ~ programs x loop iterations x a few ms of numpy, whatever the tile size:
# 64-wide tiles keep the tests fast; 16-row decode tiles still cover the split-K path.
INTERPRET_CONFIGS = {
    "w8a8": MatmulConfig(64, 64, 64, 4, 1),
    "w8a8_decode": MatmulConfig(16, 64, 64, 4, 1),
    "wo": MatmulConfig(64, 64, 64, 4, 1),
    "wo_decode": MatmulConfig(16, 64, 64, 4, 1),
    "quant": MatmulConfig(1, 0, 256, 4, 1),
    "i4_gemv": MatmulConfig(1, 32, 64, 4, 1),
    "i4_decode": MatmulConfig(16, 64, 64, 4, 1),
    "i4": MatmulConfig(64, 64, 64, 4, 1),
    "i4_prefill": MatmulConfig(64, 64, 64, 4, 1),
    "fp8": MatmulConfig(64, 64, 64, 4, 1),
    "w4a8": MatmulConfig(64, 64, 64, 4, 1),
    "w4a8_e4m3": MatmulConfig(64, 64, 64, 4, 1),
}
KINDS = tuple(INTERPRET_CONFIGS)
SM90_ONLY = ()  # kinds with rows for the sm90 table only (none: fp8's sm80 rows are for sm_89, Ada's e4m3 mma.sync)


M_BUCKET_MAX = 8192


def m_bucket(M: int) -> int:
    """M rounded up to a power of two (at most M_BUCKET_MAX): an autotune key, so the first prefill length seen for a
    layer shape does not fix its config for every M, and prefill lengths that differ a little share one tuning."""
    return min(M_BUCKET_MAX, 1 << max(0, M - 1).bit_length())


def matmul_configs(kind: str, arch: Optional[int]) -> List[MatmulConfig]:
    """THE heuristic: candidate configs for one kernel kind, default first, from configs.csv; arch None = the
    interpreter (one config: @triton.autotune with more than one fails there)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    if arch is None:
        return [INTERPRET_CONFIGS[kind]]
    cands = [MatmulConfig(*(r[k] for k in TILE), row=i) for i, r in candidates(kind, arch_family(arch))]
    if arch < 90 and arch != 80:  # sm_86/sm_89: ~100 KB of shared memory, not the A100's 164 KB
        cands = [dataclasses.replace(c, num_stages=min(c.num_stages, 2)) for c in cands]
    return list(dict.fromkeys(cands))


@triton.jit
def tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
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
def ab_tiles(a_ptr, b_ptr, M, N, stride_am, stride_ak, stride_bn, stride_bk,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """The first K tile of a program of A (M, K) @ B (N, K)^T in grouped order: (offs_m, offs_n, rm, rn, a_ptrs
    (BLOCK_M, BLOCK_K), b_ptrs (BLOCK_K, BLOCK_N), the B^T tile). Rows/columns past M/N wrap around (rm, rn; the
    tutorial's trick): the loads stay in bounds without a mask, the store drops them. 64-bit row offsets: M*K and
    N*K can pass 2^31."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rm = (offs_m % M).to(tl.int64)
    rn = (offs_n % N).to(tl.int64)
    a_ptrs = a_ptr + rm[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + rn[None, :] * stride_bn
    return offs_m, offs_n, rm, rn, a_ptrs, b_ptrs


@triton.jit
def store_tile(acc, out_ptr, bias_ptr, pid_k, offs_m, offs_n, rn, M, N, stride_os, stride_om, stride_on,
               HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Store a weight-only kernel's fp32 tile acc (BLOCK_M, BLOCK_N): SPLIT_K == 1 with the bias added, in out's
    dtype; SPLIT_K > 1 as split pid_k's fp32 partial at out + pid_k * stride_os (`finish_splits` sums them)."""
    # 64-bit offsets: S*M*N can pass 2^31
    out_ptrs = (out_ptr + pid_k.to(tl.int64) * stride_os + offs_m.to(tl.int64)[:, None] * stride_om
                + offs_n[None, :] * stride_on)
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn).to(tl.float32)[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def split_k(M: int, N: int, K: int, c: MatmulConfig, device: torch.device, align: int = 1):
    """(splits, K_SPLIT) for the decode path: K is cut into `splits` ranges of K_SPLIT columns, a multiple of
    c.block_k and of `align` (int4: the group size when it is a multiple of block_k, so a tile never straddles two
    groups). About two waves of programs over the SMs on a GPU; 2 under the interpreter (the work is the same however
    it is split, and 2 exercises the partial sums)."""
    unit = math.lcm(c.block_k, align)
    units = cdiv(K, unit)
    if device.type == "cuda":
        base = cdiv(M, c.block_m) * cdiv(N, c.block_n)
        want = max(1, min(units, MAX_SPLITS, cdiv(2 * num_sms(cuda_index(device)), base)))
    else:
        want = min(units, 2)
    per = cdiv(units, max(1, want))  # whole units per split; no split is left empty
    return cdiv(units, per), per * unit


def finish_splits(buf, bias, dtype):
    """(S, M, N) kernel output -> (M, N) in dtype: S == 1 holds the finished tile (bias added in the kernel); S > 1
    holds fp32 partials, summed here in a fixed order (deterministic, unlike atomics), then the bias."""
    if buf.shape[0] == 1:
        return buf[0].to(dtype)
    out = buf.sum(0)  # (M, N) fp32
    if bias is not None:
        out += bias.to(torch.float32)
    return out.to(dtype)


def out_buffer_dtype(x_dtype: torch.dtype, device: torch.device, splits: int) -> torch.dtype:
    """What the kernel stores: fp32 partials when K is split; fp32 for bf16 under the interpreter (its fp32 -> bf16
    stores truncate, so torch rounds afterwards); else the activation dtype."""
    return torch.float32 if splits > 1 or (x_dtype == torch.bfloat16 and device.type == "cpu") else x_dtype


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
    tconfigs = [triton.Config(_tile_kwargs(fn, c), num_warps=c.num_warps, num_stages=c.num_stages) for c in cands]
    return triton.autotune(configs=tconfigs, key=list(key), do_bench=do_bench)(fn)


def launch(fn, grid_fn, cands: List[MatmulConfig], key: tuple, *args, **kwargs):
    """Launch fn with the single candidate (interpreter, or a one-entry table) or through the autotuner (keyed on
    `key`: the N, K, flags and M bucket of a call, so each layer shape is tuned once per bucket of M)."""
    if len(cands) == 1:
        c = cands[0]
        fn[grid_fn(dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n))](*args, **kwargs, **launch_kwargs(fn, c))
    else:
        autotuned(fn, tuple(cands), key, AUTOTUNE_DO_BENCH)[grid_fn](*args, **kwargs)


class FrozenWeightMatmul(torch.autograd.Function):
    """y = product(x) differentiable in x alone, dx = input_grad(dy): the product of a frozen low-bit weight (codes,
    scales and bias take no gradient: QLoRA trains adapters beside it; Dettmers et al. 2023). Whichever kernel
    computes the forward, the backward is the op's torch reference (`reference.*_backward`): one dequantization and
    one float product."""

    @staticmethod
    def forward(ctx, x, product, input_grad):
        ctx.input_grad = input_grad
        return product(x)

    @staticmethod
    def backward(ctx, dy):
        return ctx.input_grad(dy), None, None


def with_input_grad(x, product, input_grad, bias=None):
    """product(x), through FrozenWeightMatmul when autograd needs x's gradient; the plain call otherwise, so inference
    pays nothing."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return product(x)
    if bias is not None and bias.requires_grad:
        raise ValueError("bias of a low-bit product must be frozen (requires_grad=False): its gradient is not computed")
    return FrozenWeightMatmul.apply(x, product, input_grad)
