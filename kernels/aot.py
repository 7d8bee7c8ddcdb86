"""Ahead-of-time compile report for tinyformer's Triton kernels, on a machine without a GPU.

`python -m tinyformer.kernels.aot [--targets 80,90] [--filter TEXT] [--csv PATH] [--jobs N] [--write-configs]`
compiles every kernel configuration that the launchers can pick (the candidates of configs.csv, as each op's
launcher looks them up, for every head-dim bucket, dtype and variant the launcher distinguishes; for the fused norms,
which have no table, their launchers' pick at a few model widths) for sm_80 and sm_90 with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`: the whole pipeline TTIR -> TTGIR -> LLIR -> PTX
-> cubin runs here, with the ptxas bundled in the triton wheel. For each kernel and target it prints
registers per thread, spill stores/loads (the `ptxas -v` log of triton's own cubin step, or ptxas -v run again on
the PTX when the cubin came from a warm cache), shared memory (`ck.metadata.shared`) and the compile time, and from
the SASS (`cuobjdump -sass`): instructions per weight of the matmul kernels (the main loop's instructions per thread
over the weights a thread handles in one iteration), the widest global load in bits and the tensor-core instructions
(HGMMA / IGMMA / QGMMA: wgmma; HMMA / IMMA / QMMA: mma.sync). Exit status: 1 if any compile fails, if a shipped
forward configuration spills (other spills are reported as warnings), if a kernel multiplies a row index by a stride
in 32 bits (the PTX check `narrow_stride_products`: such an offset wraps past 2^31), if a one-row int4 config
exceeds its instruction budget (GEMV_IPW_BUDGET), if the int4 prefill kernel's wgmma on sm_90 takes its left operand
(the dequantized weight) from shared memory instead of registers ("HGMMA:RS" in the mma column), or if nothing
matched, else 0. By default a fresh temporary triton
cache is used, so the compile times are real (--cache reuses ~/.triton/cache). `--write-configs` writes the
measurements back into configs.csv (the worst per row over its compiles), keeping its rows; without it, a full run
says how many rows of configs.csv its measurements contradict.

The interpreter cannot show register pressure or shared-memory overflow; this report can, so CI runs it.
Measured facts behind it: shared/TRITON_ON_CPU.md ("Ahead-of-time compile for real GPUs, without a GPU").

A spec is a dict: name, fn (a JITFunction), signature {arg: "*fp16" | "i32" | "fp32" | "constexpr" ...},
constexprs {arg: value}, num_warps, num_stages, targets [80, 89 or 90], divisible_by_16 [arg names the JIT would mark
16-aligned on contiguous tensors], shipped_forward (bool: a spill there is an error), row (its configs.csv row),
weights (weight elements per main-loop iteration, matmuls only), ipw_budget (instructions per weight allowed) and
register_a (bool: on sm_90 its wgmma must take the left operand from registers, "HGMMA:RS").
Specs are typed the way the JIT specialises a call on contiguous tensors: unit strides become constexpr 1 (so loads
vectorise), pointers and the other strides are marked 16-divisible.

References: Triton's compiler API (triton.compiler.ASTSource, triton.backends.compiler.GPUTarget); NVIDIA ptxas -v
resource report; the PTX ISA (ld.param, mul.lo / mul.wide) and the SASS opcodes cuobjdump prints.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import List, Optional

import torch

from . import configs, flash_attention as fa, fused_layer_norm, fused_rms_norm, int4_mm, w4a8_mm
from .device import tl
from .fp8_mm import _fp8_matmul_kernel
from .int8_mm import _int8_matmul_kernel
from .int8_wo_mm import _int8_weight_only_kernel
from .matmul import MatmulConfig, matmul_configs
from .per_token_quant import _quantize_per_token_kernel

DEFAULT_TARGETS = (80, 90)
# a target compiles the specs of its configs.csv table: sm_80 also the sm80 table's rows that exist for sm_89 alone
# (fp8: Ada's e4m3 mma.sync), compiled for sm_89
FAMILY_TARGETS = {80: (80, 89)}
_PKG = __package__ or "tinyformer.kernels"


# ======================================================================================================================
# Specs: every configuration each launcher can pick
# ======================================================================================================================
def _signature(fn, ptrs: dict, constexprs: dict, floats=()) -> dict:
    """Argument types of fn: pointers as given, constexprs, fp32 scalars, every other argument i32."""
    return {n: "constexpr" if n in constexprs else ptrs[n] if n in ptrs else "fp32" if n in floats else "i32"
            for n in fn.arg_names}


def _spec(name, fn, ptrs, constexprs, c, arch, divisible_by_16, shipped_forward=True, floats=(), weights=0,
          ipw_budget=None, register_a=False) -> dict:
    return dict(name=name, fn=fn, signature=_signature(fn, ptrs, constexprs, floats), constexprs=constexprs,
                num_warps=c.num_warps, num_stages=c.num_stages, targets=[arch], divisible_by_16=divisible_by_16,
                shipped_forward=shipped_forward, row=c.row, weights=weights, ipw_budget=ipw_budget,
                register_a=register_a)


ATTN_HEAD_DIMS = (16, 32, 64, 80, 128, 256)  # one per BLOCK_D bucket, plus 80: a padded member of the 128 bucket
_ATTN_IO_PTRS = ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")
_ATTN_FP32_PTRS = ("LSE", "DELTA", "OP", "LP", "KB")
ATTN_KPM_KERNELS = ("fwd",)  # kernels with a HAS_KPM constexpr; the others always read the key bias
ATTN_VARLEN_KERNELS = ("fwd", "bwd_dkdv", "bwd_dq")  # kernels with a VARLEN constexpr (packed documents)
_ATTN_FNS = {"fwd": "_attn_fwd_kernel", "decode": "_attn_decode_kernel",
             "decode_combine": "_attn_decode_combine_kernel", "bwd_preprocess": "_attn_bwd_preprocess_kernel",
             "bwd_dkdv": "_attn_bwd_dkdv_kernel", "bwd_dq": "_attn_bwd_dq_kernel"}


def _ty(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]


def attention_spec(kind: str, head_dim: int, dtype: torch.dtype, arch: int, cfg: fa.KernelConfig,
                   has_kpm: bool = False, varlen: bool = False) -> dict:
    """One compile spec of a flash_attention kernel: kind (flash_attention.KERNELS), head dim, fp16/bf16, target,
    a KernelConfig, for the forward whether it reads a key padding mask, and for the forward and backward kernels
    whether they confine attention to packed documents (VARLEN; never with a key padding mask)."""
    fn = getattr(fa, _ATTN_FNS[kind])
    ce = dict(HEAD_DIM=head_dim, BLOCK_D=fa.block_d(head_dim))
    if kind in ATTN_KPM_KERNELS:
        ce.update(HAS_KPM=has_kpm)
    elif has_kpm:
        raise ValueError(f"{kind} has no mask variant (it always reads the key bias)")
    if kind in ATTN_VARLEN_KERNELS:
        ce.update(VARLEN=varlen)
    if varlen and (has_kpm or kind not in ATTN_VARLEN_KERNELS):
        raise ValueError(f"{kind} has no packed-document variant" + (" with a key padding mask" if has_kpm else ""))
    if kind in ("fwd", "decode", "bwd_dkdv", "bwd_dq"):
        ce.update(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, UPCAST=False, DOT_PREC="ieee")
    elif kind == "bwd_preprocess":
        ce.update(BLOCK_M=cfg.block_m)
    else:  # decode_combine: BLOCK_S is the split count rounded up to a power of two, at most DECODE_MAX_SPLITS
        ce.update(BLOCK_S=fa.DECODE_MAX_SPLITS, BLOCK_R=cfg.block_m)
    ce.update({n: 1 for n in fn.arg_names if n.startswith("stride_") and n.endswith("d")})
    ptrs = {n: "*fp32" for n in _ATTN_FP32_PTRS}
    ptrs.update({n: "*" + _ty(dtype) for n in _ATTN_IO_PTRS}, DOC="*i32")
    div16 = [n for n in fn.arg_names if n in ptrs
             or (n.startswith("stride_") and n[-1] in "bhmn" and not n.startswith("stride_m") and n not in ce)]
    tile = f"m{cfg.block_m}" + (f"n{cfg.block_n}" if cfg.block_n else "")
    name = (f"attn_{kind}_d{head_dim}_{_ty(dtype)}{'_kpm' if has_kpm else ''}{'_varlen' if varlen else ''}_{tile}"
            f"w{cfg.num_warps}s{cfg.num_stages}")
    return _spec(name, fn, {n: t for n, t in ptrs.items() if n in fn.arg_names}, ce, cfg, arch, div16,
                 shipped_forward=kind in ("fwd", "decode"), floats=("qk_scale", "sm_scale"))


def attention_specs() -> List[dict]:
    """Every flash_attention config the launchers can pick on sm_80 and sm_90: each kernel x head-dim bucket
    (ATTN_HEAD_DIMS) x fp16/bf16 x every candidate and decode BLOCK_M. Causal and non-causal share one binary (causal
    is a runtime offset); the forward with and without a key padding mask; decode, dQ and dK/dV always read the bias;
    the forward, dQ and dK/dV also with packed documents. fp32 inputs are not in the set."""
    specs = []
    for arch in DEFAULT_TARGETS:
        for dtype in (torch.float16, torch.bfloat16):
            for D in ATTN_HEAD_DIMS:
                for kind in fa.KERNELS:
                    for has_kpm, varlen in attention_variants(kind):
                        for rows in ((16, 64) if kind == "decode" else (1,)):
                            for c in fa.kernel_configs(kind, D, dtype, arch, rows=rows, has_kpm=has_kpm,
                                                       varlen=varlen):
                                specs.append(attention_spec(kind, D, dtype, arch, c, has_kpm=has_kpm, varlen=varlen))
    return specs


def attention_variants(kind: str) -> list:
    """(has_kpm, varlen) pairs the launchers compile for one kernel kind."""
    return ([(False, False)] + [(True, False)] * (kind in ATTN_KPM_KERNELS)
            + [(False, True)] * (kind in ATTN_VARLEN_KERNELS))


def _dot_dtype(ty: str):
    return tl.float16 if ty == "fp16" else tl.bfloat16


def _tile(c) -> str:
    return f"{c.block_m}x{c.block_n}x{c.block_k}_w{c.num_warps}s{c.num_stages}"


def int8_specs() -> List[dict]:
    """W8A8 prefill and decode with the fused epilogue (fp16 output, bias; EPILOGUE off shares the main loop)."""
    fn = _int8_matmul_kernel
    specs = []
    for arch in DEFAULT_TARGETS:
        for kind in ("w8a8", "w8a8_decode"):
            for c in matmul_configs(kind, arch):
                ce = dict(stride_ak=1, stride_bk=1, stride_cn=1, HAS_BIAS=True, EPILOGUE=True, BLOCK_M=c.block_m,
                          BLOCK_N=c.block_n, BLOCK_K=c.block_k, GROUP_M=c.group_m)
                ptrs = {"a_ptr": "*i8", "b_ptr": "*i8", "c_ptr": "*fp16", "a_scale_ptr": "*fp32",
                        "b_scale_ptr": "*fp32", "bias_ptr": "*fp16"}
                specs.append(_spec(f"int8_mm.{kind}_{_tile(c)}", fn, ptrs, ce, c, arch,
                                   [*ptrs, "N", "K", "stride_am", "stride_bn", "stride_cm"],
                                   weights=c.block_k * c.block_n))
    return specs


def int8_wo_specs() -> List[dict]:
    """int8 weight-only prefill (full epilogue) and decode (split-K fp32 partials), fp16 and bf16 activations."""
    fn = _int8_weight_only_kernel
    specs = []
    for arch in DEFAULT_TARGETS:
        for kind in ("wo", "wo_decode"):
            for c in matmul_configs(kind, arch):
                for ty in ("fp16", "bf16"):
                    split = kind == "wo_decode"
                    ce = dict(stride_xk=1, stride_wk=1, stride_on=1, HAS_BIAS=not split, SPLIT_K=4 if split else 1,
                              DOT_DTYPE=_dot_dtype(ty), DOT_PREC="ieee",
                              BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, GROUP_M=c.group_m)
                    ptrs = {"x_ptr": f"*{ty}", "w_ptr": "*i8", "s_ptr": "*fp32", "bias_ptr": f"*{ty}",
                            "out_ptr": "*fp32" if split else f"*{ty}"}
                    specs.append(_spec(f"int8_wo_mm.{kind}_{ty}_{_tile(c)}", fn, ptrs, ce, c, arch,
                                       [*ptrs, "N", "K", "stride_xm", "stride_wn", "stride_os", "stride_om",
                                        "K_SPLIT"], weights=c.block_k * c.block_n))
    return specs


def fp8_specs() -> List[dict]:
    """The e4m3 GEMM with its epilogue (bf16 output, bias) for sm_89 (the sm80 table's fp8 rows with the launchers'
    stage cap; Ada's e4m3 mma.sync: QMMA in the SASS) and sm_90 (Hopper's fp8 wgmma: QGMMA)."""
    fn = _fp8_matmul_kernel
    specs = []
    for arch in (89, 90):
        for c in matmul_configs("fp8", arch):
            ce = dict(stride_ak=1, stride_bk=1, stride_cn=1, HAS_BIAS=True, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
                      BLOCK_K=c.block_k, GROUP_M=c.group_m)
            ptrs = {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "c_ptr": "*bf16", "a_scale_ptr": "*fp32",
                    "b_scale_ptr": "*fp32", "bias_ptr": "*bf16"}
            specs.append(_spec(f"fp8_mm.fp8_{_tile(c)}", fn, ptrs, ce, c, arch,
                               [*ptrs, "N", "K", "stride_am", "stride_bn", "stride_cm"],
                               weights=c.block_k * c.block_n))
    return specs


def per_token_quant_specs() -> List[dict]:
    """The per-token activation quantizer, fp16 and bf16 inputs."""
    fn = _quantize_per_token_kernel
    specs = []
    for arch in DEFAULT_TARGETS:
        for c in matmul_configs("quant", arch):
            for ty in ("fp16", "bf16"):
                ptrs = {"x_ptr": f"*{ty}", "q_ptr": "*i8", "s_ptr": "*fp32"}
                ce = dict(stride_xk=1, stride_qk=1, BLOCK_K=c.block_k)
                specs.append(_spec(f"per_token_quant.{ty}_k{c.block_k}_w{c.num_warps}", fn, ptrs, ce, c, arch,
                                   [*ptrs, "K", "stride_xm", "stride_qm"]))
    return specs


GEMV_IPW_BUDGET = 5.0  # SASS instructions per weight of the one-row int4 kernel: above it, issue-bound, not DRAM-bound
INT4_GROUP_SIZES = (32, 64, 128)  # block_k capped at 32 and 64, and the table's own (G >= 128 compiles like 128)
# groups that are not powers of two >= 32 take the API-layout prefill kernel ("i4"): 96 straddles its 64-wide K tiles
# (scales gathered per column pair), 192 holds three of them (the group-scaled branch)
INT4_ODD_GROUP_SIZES = (96, 192)


def int4_specs() -> List[dict]:
    """int4 per path (one row, decode, prefill) x candidate x group-size bucket x fp16/bf16 activations; decode and
    one-row specs write split-K fp32 partials, prefill specs run the full epilogue with bias."""
    specs = []
    for arch in DEFAULT_TARGETS:
        for M, kind, groups in ((2, "i4_decode", INT4_GROUP_SIZES), (512, "i4", INT4_ODD_GROUP_SIZES)):
            split = kind == "i4_decode"
            for G in groups:
                for c in int4_mm.int4_configs(M, G, arch):
                    for ty in ("fp16", "bf16"):
                        ptrs = {"x_ptr": f"*{ty}", "w_ptr": "*u8", "scales_ptr": f"*{ty}", "zeros_ptr": f"*{ty}",
                                "bias_ptr": f"*{ty}", "out_ptr": "*fp32" if split else f"*{ty}"}
                        ce = dict(stride_xk=1, stride_wk=1, stride_sg=1, stride_zg=1, stride_on=1, GROUP_SIZE=G,
                                  HAS_BIAS=not split, SPLIT_K=4 if split else 1, EVEN_K=True,
                                  DOT_DTYPE=_dot_dtype(ty),
                                  DOT_PREC="ieee", BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
                                  GROUP_M=c.group_m)
                        specs.append(_spec(f"int4_mm.{kind}_{ty}_g{G}_{_tile(c)}", int4_mm._int4_matmul_kernel,
                                           ptrs, ce, c, arch,
                                           [*ptrs, "N", "K", "stride_xm", "stride_wn", "stride_sn", "stride_zn",
                                            "stride_os", "stride_om", "K_SPLIT"], weights=c.block_k * c.block_n))
        for G in INT4_GROUP_SIZES:  # the prefill kernel on the K-plane layout: out^T tiles, weight operand in registers
            # G = 32 with an odd number of 32-column planes in K: the last tile's high plane is masked ("_tail")
            for even_k in ((True, False) if G == int4_mm.PLANE else (True,)):
                for c in int4_mm.int4_configs(512, G, arch):
                    for ty in ("fp16", "bf16"):
                        ptrs = {"x_ptr": f"*{ty}", "xs_ptr": "*fp32", "w_ptr": "*u8", "scales_ptr": f"*{ty}",
                                "zeros_ptr": f"*{ty}", "bias_ptr": f"*{ty}", "out_ptr": f"*{ty}"}
                        ce = dict(stride_xk=1, stride_xsm=1, stride_wk=1, stride_sn=1, stride_zn=1, stride_on=1,
                                  GROUP_SIZE=G,
                                  PLANE=int4_mm.PLANE, HAS_BIAS=True, EVEN_K=even_k, DOT_DTYPE=_dot_dtype(ty),
                                  DOT_PREC="ieee", BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
                                  GROUP_M=c.group_m)
                        specs.append(_spec(f"int4_mm.i4_prefill_{ty}_g{G}{'' if even_k else '_tail'}_{_tile(c)}",
                                           int4_mm._int4_prefill_kernel, ptrs, ce, c, arch,
                                           [*ptrs, "N", "K", "stride_xm", "stride_xsg", "stride_wn", "stride_sg",
                                            "stride_zg", "stride_om"], weights=c.block_k * c.block_n,
                                           register_a=True))
        for G in INT4_GROUP_SIZES:  # the one-row kernel on the GEMV layout: split-K reduced in the kernel
            for c in int4_mm.int4_configs(1, G, arch):
                for ty in ("fp16", "bf16"):
                    ptrs = {"x_ptr": f"*{ty}", "wq_ptr": "*i32", "scales_ptr": f"*{ty}", "zeros_ptr": f"*{ty}",
                            "bias_ptr": f"*{ty}", "out_ptr": f"*{ty}", "part_ptr": "*fp32", "count_ptr": "*i32"}
                    ce = dict(stride_xk=1, GROUP_SIZE=G, HAS_BIAS=True, SPLIT_K=4, BLOCK_N=c.block_n,
                              BLOCK_K=c.block_k)
                    specs.append(_spec(f"int4_mm.i4_gemv_{ty}_g{G}_{c.block_n}x{c.block_k}_w{c.num_warps}"
                                       f"s{c.num_stages}", int4_mm._int4_gemv_kernel, ptrs, ce, c, arch,
                                       [*ptrs, "N", "K", "stride_wk", "stride_sg", "stride_zg", "K_SPLIT"],
                                       weights=c.block_k * c.block_n, ipw_budget=GEMV_IPW_BUDGET))
    return specs


W4A8_GROUP_SIZES = (32, 64, 128, 256)  # block_k capped at 32 and 64; spans of 128 and 256 columns (G >= 256: 256)


def w4a8_specs() -> List[dict]:
    """W4A8 prefill with its full epilogue (fp16 scales, zeros, bias and output), per candidate x group-size bucket:
    int8 activations for sm_80 and sm_90, e4m3 ones for sm_89 and sm_90 (the fp8 tensor cores). Instructions per
    weight count the main loop over one span (SPAN // BLOCK_K unrolled K tiles)."""
    specs = []
    for kind, a_type, archs in (("w4a8", "i8", DEFAULT_TARGETS), ("w4a8_e4m3", "fp8e4nv", (89, 90))):
        for arch in archs:
            for G in W4A8_GROUP_SIZES:
                span = min(G, w4a8_mm.MAX_SPAN)
                for c in w4a8_mm.w4a8_configs(G, arch, kind):
                    ptrs = {"a_ptr": f"*{a_type}", "a_scale_ptr": "*fp32", "w_ptr": "*u8", "scales_ptr": "*fp16",
                            "zeros_ptr": "*fp16", "bias_ptr": "*fp16", "out_ptr": "*fp16"}
                    ce = dict(stride_ak=1, stride_wk=1, stride_sg=1, stride_zg=1, stride_on=1, GROUP_SIZE=G,
                              SPAN=span, HAS_BIAS=True, A_FP8=a_type != "i8", BLOCK_M=c.block_m, BLOCK_N=c.block_n,
                              BLOCK_K=c.block_k, GROUP_M=c.group_m)
                    specs.append(_spec(f"w4a8_mm.{kind}_g{G}_{_tile(c)}", w4a8_mm._w4a8_matmul_kernel, ptrs, ce, c,
                                       arch, [*ptrs, "N", "K", "stride_am", "stride_wn", "stride_sn", "stride_zn",
                                              "stride_om"], weights=span * c.block_n))
    return specs


NORM_WIDTHS = (128, 768, 4096, 8192)  # model widths whose BLOCK_D buckets (128, 1024, 4096, 8192) the report compiles


def norm_specs() -> List[dict]:
    """The fused RMSNorm and LayerNorm (with and without a bias), forward and backward, fp16 and bf16, for the BLOCK_D
    and warps their launchers pick at each of NORM_WIDTHS (the launchers' own heuristic, no configs.csv rows)."""
    specs = []
    kernels = [("rms_norm", "fwd", fused_rms_norm._rms_norm_fwd_kernel, {}),
               ("rms_norm", "bwd", fused_rms_norm._rms_norm_bwd_kernel, {})]
    for has_bias in (True, False):
        kernels += [("layer_norm", "fwd", fused_layer_norm._layer_norm_fwd_kernel, dict(HAS_BIAS=has_bias)),
                    ("layer_norm", "bwd", fused_layer_norm._layer_norm_bwd_kernel, dict(HAS_BIAS=has_bias))]
    for arch in DEFAULT_TARGETS:
        for D in NORM_WIDTHS:
            bd = fused_rms_norm._block_d(D)
            c = MatmulConfig(0, 0, 0, num_warps=fused_rms_norm._warps(bd), num_stages=1)
            for op, way, fn, flags in kernels:
                for ty in ("fp16", "bf16"):
                    ptrs = {n: "*fp32" if n in ("mean_ptr", "rstd_ptr", "dw_ptr", "db_ptr") else f"*{ty}"
                            for n in fn.arg_names if n.endswith("_ptr")}
                    ce = dict(flags, BLOCK_D=bd, **(dict(ROWS=fused_rms_norm.FWD_ROWS) if way == "fwd" else {}))
                    bias = "" if op == "rms_norm" else "_bias" if flags["HAS_BIAS"] else "_nobias"
                    specs.append(_spec(f"{op}.{way}_{ty}{bias}_d{bd}_w{c.num_warps}", fn, ptrs, ce, c, arch,
                                       [*ptrs, "D"] + [n for n in fn.arg_names if n.startswith("stride_")],
                                       shipped_forward=way == "fwd", floats=("eps",)))
    return specs


# the report's groups: one per op file (the two fused norms share one)
SPEC_GROUPS = {"flash_attention": attention_specs, "int8_mm": int8_specs, "int8_wo_mm": int8_wo_specs,
               "per_token_quant": per_token_quant_specs, "int4_mm": int4_specs, "fp8_mm": fp8_specs,
               "w4a8_mm": w4a8_specs, "fused_norms": norm_specs}
MODULES = tuple(SPEC_GROUPS)


def all_specs() -> List[dict]:
    return [s for build in SPEC_GROUPS.values() for s in build()]


def _load_specs(modules) -> tuple:
    """[(module, index, spec)] for every spec of the named groups, and the failures (unknown names, import errors)."""
    rows, failures = [], []
    for name in modules:
        if name not in SPEC_GROUPS:
            failures.append(f"unknown module {name!r} (one of {', '.join(MODULES)})")
            continue
        try:
            specs = SPEC_GROUPS[name]()
        except Exception as e:  # noqa: BLE001 - an import or lookup error is a failure to report
            failures.append(f"{_PKG}.{name}: building its specs failed: {e!r}")
            continue
        rows += [(name, i, spec) for i, spec in enumerate(specs)]
    return rows, failures


def _interpreted(rows) -> bool:
    from triton.runtime.jit import JITFunction
    return any(not isinstance(spec["fn"], JITFunction) for _, _, spec in rows)


_SPEC_CACHE: dict = {}


def _cached_spec(module: str, index: int) -> dict:
    if module not in _SPEC_CACHE:
        _SPEC_CACHE[module] = SPEC_GROUPS[module]()
    return _SPEC_CACHE[module][index]


# ======================================================================================================================
# Compile and report
# ======================================================================================================================
def ptxas_usage(ptx: str, arch: int) -> dict:
    """Run the bundled ptxas -v on PTX; returns registers, spill_stores, spill_loads, stack (bytes)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        # the flags of triton's own make_cubin step (regAllocOptLevel=2 works around a ptxas 13 bug there)
        cmd = [get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}",
               src, "-o", os.path.join(d, "k.cubin")]
        res = subprocess.run(cmd, capture_output=True, text=True)
    log = res.stderr + res.stdout
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed ({res.returncode}): {log[-2000:]}")
    usage = parse_ptxas_log(log)
    if usage is None:
        raise RuntimeError(f"no resource report in the ptxas log: {log[-2000:]}")
    return usage


def parse_ptxas_log(log: str) -> Optional[dict]:
    """registers, stack, spill_stores, spill_loads from a `ptxas -v` log (one kernel); None if there is none."""
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not regs or not spill:
        return None
    return dict(registers=int(regs.group(1)), stack=int(spill.group(1)), spill_stores=int(spill.group(2)),
                spill_loads=int(spill.group(3)))


_PARAM = re.compile(r"ld\.param\.[bsu]32\s+(%r\d+),\s*\[\w+_param_(\d+)\]")
_MOV32 = re.compile(r"mov\.[bsu]32\s+(%r\d+),\s*(%r\d+);")
_MUL32 = re.compile(r"(?:mul|mad)\.lo\.[su]32\s+%r\d+,\s*([^;]+);")


def narrow_stride_products(ptx: str, spec: dict) -> List[str]:
    """The stride arguments of `spec` that its PTX multiplies in 32 bits (`mul.lo.s32` / `mad.lo.s32` with an operand
    read from the stride's parameter): an index times a stride must be widened first, or an offset past 2^31 wraps
    and the kernel reads and writes out of bounds. Parameters are numbered over the non-constexpr arguments."""
    runtime = [n for n in spec["fn"].arg_names if spec["signature"][n] != "constexpr"]
    reg_param = {}
    for line in ptx.splitlines():
        m = _PARAM.search(line)
        if m and int(m.group(2)) < len(runtime) and runtime[int(m.group(2))].startswith("stride_"):
            reg_param[m.group(1)] = runtime[int(m.group(2))]
            continue
        m = _MOV32.search(line)
        if m and m.group(2) in reg_param:
            reg_param[m.group(1)] = reg_param[m.group(2)]
    found = []
    for line in ptx.splitlines():
        m = _MUL32.search(line)
        if m:
            found += [reg_param[r] for r in re.findall(r"%r\d+", m.group(1)) if r in reg_param]
    return sorted(set(found))


_SASS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*?);")
_LOAD_BITS = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}


_RS_OPERANDS = re.compile(r"\sR\d+,\s*R\d+,\s*gdesc")  # wgmma's accumulator, A in registers, B's descriptor


def sass_summary(sass: str) -> dict:
    """From `cuobjdump -sass`: the instructions of the largest loop (the span of the longest backward branch), the
    widest global load in bits (LDG, or LDGSTS: the cp.async of pipelined tiles; "tma" for tensor-memory loads) and
    the tensor-core instruction family (HGMMA/IGMMA/QGMMA = wgmma, HMMA/IMMA/QMMA = mma.sync, "" = none); a wgmma
    whose left operand is registers (`HGMMA.64x128x16.F32 R24, R88, gdesc[UR12], R24`, CUTLASS's "RS") rather than a
    shared-memory descriptor (`R24, gdesc[UR4], RZ`: "SS") is reported with ":RS"."""
    ins = [(int(a, 16), op, rest) for a, op, rest in _SASS.findall(sass)]
    loop = 0
    for addr, op, rest in ins:
        m = re.match(r"\s*(0x[0-9a-f]+)", rest)
        if op.startswith("BRA") and m and int(m.group(1), 16) < addr:
            loop = max(loop, (addr - int(m.group(1), 16)) // 16 + 1)
    widest = 0
    for _, op, _ in ins:
        if op.startswith(("LDG.", "LDGSTS.")) or op in ("LDG", "LDGSTS"):
            widest = max(widest, max([_LOAD_BITS[p] for p in op.split(".")[1:] if p in _LOAD_BITS] or [32]))
    tma = any(op.startswith("UTMALDG") for _, op, _ in ins)
    mma = sorted({op.split(".")[0] + (":RS" if _RS_OPERANDS.search(rest) else "") for _, op, rest in ins
                  if op.split(".")[0] in ("HGMMA", "IGMMA", "QGMMA", "HMMA", "IMMA", "QMMA")})
    return dict(loop_instrs=loop, widest_load=("tma" if tma else "") + (str(widest) if widest else ""),
                mma="/".join(mma))


def _sass(cubin: bytes) -> str:
    import triton
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-sass", path], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"cuobjdump failed ({res.returncode}): {res.stderr[-500:]}")
    return res.stdout


def compile_one(module: str, index: int, arch: int) -> dict:
    """Compile spec `index` of `module` for one target; returns a report row (error set on failure)."""
    return compile_spec(_cached_spec(module, index), arch, module)


def compile_spec(spec: dict, arch: int, module: str = "") -> dict:
    """Compile one spec dict for one target; returns a report row (error set on failure)."""
    row = dict(module=module, name=spec["name"], target=f"sm_{arch}", num_warps=spec["num_warps"],
               num_stages=spec["num_stages"], registers="", spill_stores="", spill_loads="", shared="",
               compile_s="", shipped_forward=bool(spec.get("shipped_forward", False)), row=spec.get("row"), error="",
               narrow="", ipw="", widest_load="", mma="", ipw_budget=spec.get("ipw_budget"),
               register_a=bool(spec.get("register_a", False)))
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        fn = spec["fn"]
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in spec.get("divisible_by_16", ())}
        src = ASTSource(fn, signature=spec["signature"], constexprs=spec["constexprs"], attrs=attrs)
        # triton runs ptxas -v itself when it makes the cubin; with dump_ptxas_log it prints that log, so the
        # resource report costs no second ptxas run (it does when the cubin came from a warm cache: --cache)
        triton.knobs.nvidia.dump_ptxas_log = True
        log = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(log):
            ck = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
        row["compile_s"] = round(time.perf_counter() - t0, 2)
        row["shared"] = int(ck.metadata.shared)
        usage = parse_ptxas_log(log.getvalue()) or ptxas_usage(ck.asm["ptx"], arch)
        row.update(registers=usage["registers"], spill_stores=usage["spill_stores"], spill_loads=usage["spill_loads"])
        row["narrow"] = " ".join(narrow_stride_products(ck.asm["ptx"], spec))
        sass = sass_summary(_sass(ck.asm["cubin"]))
        row.update(widest_load=sass["widest_load"], mma=sass["mma"])
        if spec.get("weights"):  # instructions per thread per main-loop iteration / weights per thread in it
            row["ipw"] = round(sass["loop_instrs"] * 32 * spec["num_warps"] / spec["weights"], 2)
    except Exception as e:  # noqa: BLE001 - a failed compile is a report row, not a crash of the whole run
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
    return row


def _parse(argv):
    ap = argparse.ArgumentParser(prog="python -m tinyformer.kernels.aot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default=",".join(map(str, DEFAULT_TARGETS)),
                    help="comma-separated CUDA compute capabilities (default 80,90)")
    ap.add_argument("--modules", default=",".join(MODULES), help="the op files whose kernels to compile")
    ap.add_argument("--filter", default="", help="only specs whose name contains this text")
    ap.add_argument("--limit", type=int, default=0, help="at most this many specs per target (0 = all)")
    ap.add_argument("--csv", default="", help="also write the rows to this CSV file")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    ap.add_argument("--cache", action="store_true",
                    help="reuse triton's compile cache (default: a fresh temporary one, so compile times are real)")
    ap.add_argument("--write-configs", nargs="?", const=configs.PATH, default="", metavar="PATH",
                    help="write the measurements into configs.csv (or PATH), refreshing the rows compiled")
    return ap.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # @triton.jit decides interpreter-or-compiler when a module is imported, so the kernels must be imported
        # in a process where TRITON_INTERPRET is not set: run again in one.
        print("aot: TRITON_INTERPRET is set; kernels must be compiled, not interpreted: re-running without it",
              flush=True)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", f"{_PKG}.aot", *argv], env=env)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, set to silence its warning
    try:
        import triton  # noqa: F401
    except ImportError:
        print("aot: triton is not installed; nothing to compile", file=sys.stderr)
        return 1

    targets = [int(t) for t in args.targets.split(",") if t.strip()]
    modules = [m.strip() for m in args.modules.split(",") if m.strip()]
    rows, failures = _load_specs(modules)
    if _interpreted(rows):
        print("aot: the kernels were imported under the interpreter in this process; re-running in a clean one",
              flush=True)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", f"{_PKG}.aot", *argv], env=env)

    jobs = []
    for arch in targets:
        family = FAMILY_TARGETS.get(arch, (arch,))
        picked = [(m, i, t) for m, i, s in rows for t in s.get("targets", targets)
                  if args.filter in s["name"] and t in family]
        if args.limit:
            picked = picked[:args.limit]
        jobs += picked
    if not jobs:
        print(f"aot: no spec matches (filter {args.filter!r}, targets {targets})"
              + "".join(f"\nFAILED: {f}" for f in failures))
        return 1

    saved_cache = os.environ.get("TRITON_CACHE_DIR")
    tmp_cache = None if args.cache else tempfile.TemporaryDirectory(prefix="tinyformer-aot-")
    if tmp_cache is not None:  # a fresh cache: real compile times, nothing stale
        os.environ["TRITON_CACHE_DIR"] = tmp_cache.name
    t0 = time.perf_counter()
    try:
        if args.jobs > 1 and len(jobs) > 1:
            import multiprocessing as mp
            with mp.get_context("fork").Pool(min(args.jobs, len(jobs))) as pool:
                results = pool.starmap(compile_one, jobs, chunksize=1)
        else:
            results = [compile_one(*j) for j in jobs]
    finally:
        if tmp_cache is not None:
            tmp_cache.cleanup()
            if saved_cache is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = saved_cache
    wall = time.perf_counter() - t0

    cols = ("target", "name", "num_warps", "num_stages", "registers", "spill_stores", "spill_loads", "shared",
            "ipw", "widest_load", "mma", "compile_s")
    head = ("target", "kernel", "warps", "stages", "regs", "spill_st", "spill_ld", "shared_B", "instr/w", "ld_bits",
            "mma", "compile_s")
    width = max([len("kernel")] + [len(r["name"]) for r in results])
    fmt = "{:<7} {:<%d} {:>5} {:>6} {:>5} {:>8} {:>8} {:>8} {:>7} {:>7} {:>11} {:>9}  {}" % width
    print(fmt.format(*head, "status"))
    errors = spill_errors = spill_warnings = 0
    for r in results:
        status = "ok"
        if r["error"]:
            status, errors = "FAILED: " + r["error"], errors + 1
        elif r["narrow"]:
            status, errors = "FAILED: 32-bit index x stride: " + r["narrow"], errors + 1
        elif r["ipw_budget"] is not None and (r["ipw"] == "" or r["ipw"] > r["ipw_budget"]):
            status, errors = f"FAILED: {r['ipw']} instructions per weight, budget {r['ipw_budget']}", errors + 1
        elif r["register_a"] and r["target"] == "sm_90" and not r["mma"].startswith("HGMMA:RS"):
            status, errors = f"FAILED: wgmma's left operand is not in registers ({r['mma']})", errors + 1
        elif (r["spill_stores"] or 0) > 0 or (r["spill_loads"] or 0) > 0:
            if r["shipped_forward"]:
                status, spill_errors = "SPILLS (shipped forward config: error)", spill_errors + 1
            else:
                status, spill_warnings = "spills (warning)", spill_warnings + 1
        r["status"] = status
        print(fmt.format(*[r[c] for c in cols], status))
    for f in failures:
        print("FAILED:", f)
    compiled_for = ",".join("sm_%d" % a for a in sorted({j[2] for j in jobs}))
    print(f"aot: {len(results)} compiles for {compiled_for} in {wall:.1f} s wall "
          f"({args.jobs} jobs); {errors + len(failures)} failed, {spill_errors} shipped forward configs spill, "
          f"{spill_warnings} other configs spill (warnings)")
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["module", *cols, "shipped_forward", "status", "error"],
                               extrasaction="ignore")
            w.writeheader()
            w.writerows(results)
        print(f"aot: wrote {args.csv}")
    table = list(configs.read())
    refreshed = configs.refresh(table, results)
    if args.write_configs:
        configs.write(refreshed, args.write_configs)
        print(f"aot: refreshed the measured columns of {len({r['row'] for r in results if r['row'] is not None})} "
              f"rows of {args.write_configs}")
    elif not args.filter and not args.limit and set(modules) == set(MODULES) and set(targets) == set(DEFAULT_TARGETS):
        stale = sum(1 for old, new in zip(table, refreshed) if old != new)
        if stale:
            print(f"aot: {stale} rows of configs.csv differ from these measurements (another triton or ptxas?); "
                  f"`python -m {_PKG}.aot --write-configs` refreshes them")
    return 1 if (errors or failures or spill_errors) else 0


if __name__ == "__main__":
    sys.exit(main())
