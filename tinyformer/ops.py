"""The dispatch layer: every attention, product and norm of a tinyformer model goes through here, and here alone it
is decided which kernel runs it for the tensors' device, dtype and shape. Three backends:

- "reference": the explicit math of `tinyformer.kernels.reference` (softmax(QK^T)V spelled out): for reading and
  for checking the others.
- "torch": torch's fused ops (F.scaled_dot_product_attention, F.linear) and its packed int8/int4 CPU kernels: the
  default on CPU. Without autograd (decoding, evaluation) a CPU product of a few rows multiplies by a weight laid out
  once for its kernel (`tinyformer.kernels.cpu`: oneDNN's blocked bf16, torch's int8/int4 packs).
- "triton": tinyformer's Triton kernels (`tinyformer.kernels`): the default on CUDA when Triton is installed.
  Float matmuls stay on cuBLAS (F.linear); the Triton matmuls are the low-bit ones, used by quantized linears. In
  training (autograd on) RMSNorm, LayerNorm, SwiGLU, RoPE and the output head with its cross-entropy run fused kernels.

Choose with `set_backend(name)`, the `use_backend(name)` context manager, or the TINYFORMER_BACKEND environment
variable; "auto" (the default) picks per device. The kernels have no dropout, so attention with dropout_p > 0
always runs on SDPA.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os

import torch
import torch.nn.functional as F
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from tinyformer import kernels
from tinyformer.kernels import cpu, quant, reference, w4a8_mm
from tinyformer.kernels.matmul import DECODE_MAX_M as W4A8_MIN_M, with_input_grad
from tinyformer.kernels.device import onednn_bf16

BACKENDS = ("auto", "reference", "torch", "triton")
_backend = os.environ.get("TINYFORMER_BACKEND", "auto")
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    if name == "triton" and not HAS_TRITON:
        raise ValueError("backend 'triton' needs the triton package (Linux only); use 'torch' or 'reference'")
    return name


def set_backend(name: str) -> None:
    global _backend
    _backend = _check(name)


def get_backend(device: torch.device | str | None = None) -> str:
    """The backend in force for tensors on `device` ("auto" resolved)."""
    if _backend != "auto":
        return _backend
    device = torch.device(device) if device is not None else torch.device("cpu")
    return "triton" if device.type == "cuda" and HAS_TRITON else "torch"


@contextlib.contextmanager
def use_backend(name: str):
    global _backend
    previous, _backend = _backend, _check(name)
    try:
        yield
    finally:
        _backend = previous


CPU_BF16_ATTENTION_MIN_T = 512  # query positions from which CPU training attention stays in bf16: torch's bf16
# flash kernel overtakes the fp32 detour between 256 and 512 positions (timings in docs/finetune.md)


def attention(q, k, v, causal: bool = False, key_padding_mask=None, dropout_p: float = 0.0, scale=None,
              cu_seqlens=None):
    """q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D) -> (B, Hq, Tq, D). Contract of tinyformer.kernels.attention; cu_seqlens
    (packed documents, flash-attn's varlen offsets into the B * T tokens) confines each document to itself."""
    backend = get_backend(q.device)
    lo, hi = reference.KERNEL_HEAD_DIMS
    if backend == "triton" and not lo <= q.shape[-1] <= hi:
        backend = "torch"  # the kernel's head-dim range; SDPA takes any
    if dropout_p > 0.0 or backend == "torch":
        if (q.dtype == torch.bfloat16 and q.device.type == "cpu" and q.requires_grad
                and q.shape[-2] < CPU_BF16_ATTENTION_MIN_T):
            # training under CPU bf16 autocast on short sequences: torch's CPU flash attention's forward + backward
            # is 2-4x slower in bf16 than in fp32 there, so it runs in fp32 and the output goes back to bf16
            with torch.autocast("cpu", enabled=False):
                out = cpu.sdpa_attention(q.float(), k.float(), v.float(), causal, scale, key_padding_mask,
                                         dropout_p=dropout_p, cu_seqlens=cu_seqlens)
            return out.to(q.dtype)
        return cpu.sdpa_attention(q, k, v, causal, scale, key_padding_mask, dropout_p=dropout_p, cu_seqlens=cu_seqlens)
    if backend == "reference":
        return reference.attention(q, k, v, causal, scale, key_padding_mask, upcast=False, cu_seqlens=cu_seqlens)
    return kernels.attention(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                             cu_seqlens=cu_seqlens)


BF16_UPCAST_ROWS = 16  # rows from which a bf16 product runs in fp32 on a CPU without oneDNN bf16 (`onednn_bf16`;
# aten's bf16 matmul costs a GEMV a row there)


def linear(x, weight, bias=None):
    """x (..., K) @ weight (N, K)^T + bias (N,) -> (..., N)."""
    backend = get_backend(x.device)
    if backend == "reference":
        y = x @ weight.T
        return y + bias if bias is not None else y
    if x.device.type == "cpu" and not torch.is_grad_enabled() and torch.compiler.is_compiling() and \
            not cpu.folding() and x.numel() == x.shape[-1] and x.dtype != torch.float32:
        # one row, compiled, weights not frozen: a reduction Inductor streams the low-precision weight through once,
        # widened to fp32 (with frozen weights, Inductor multiplies by oneDNN's prepacked copy instead)
        y = (weight.float() * x.float().unsqueeze(-2)).sum(-1)  # (..., 1, K) * (N, K) summed over K -> (..., N)
        return (y + bias.float() if bias is not None else y).to(x.dtype)
    if x.device.type == "cpu" and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
        y = cpu.linear_bf16(x, (weight,), (bias,))  # inference: the weight in oneDNN's blocked layout, made once
        if y is not None:
            return y
    if (x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.numel() >= BF16_UPCAST_ROWS * x.shape[-1]
            and not onednn_bf16()):  # bf16 in and out, fp32 products (aten's bf16 ones accumulate in fp32 too)
        b = bias.float() if bias is not None else None
        return F.linear(x.float(), weight.float(), b).to(torch.bfloat16)
    return F.linear(x, weight, bias)


def linears(x, *modules):
    """The products of x (..., K) with linear layers that all read it (q/k/v; gate/up): `[m(x) for m in modules]`,
    as one product where the layers stack (`_stackable`): in training (and compiled with frozen weights, where
    Inductor folds the concatenation) over their concatenated float weights, one wider GEMM; outside autograd on the
    CPU over a stacked copy of their weights made once (at a decode step a kernel call costs a fixed overhead beside
    streaming its weight). Otherwise one call each.

    Adapted layers (LoRA: `scheme = "lora"`, a `base` and a `delta(x)`, tinyformer.finetune) take part through their
    bases, which stack as above, and each adds its own low-rank term."""
    if len(modules) > 1 and any(type(m).__dict__.get("scheme") == "lora" for m in modules) and not _hooked(modules):
        bases = [m.base if type(m).__dict__.get("scheme") == "lora" else m for m in modules]
        ys = linears(x, *bases)
        deltas = [m.delta(x) if m is not b else None for m, b in zip(modules, bases)]
        return [y if d is None else y + d.to(y.dtype) for y, d in zip(ys, deltas)]
    trains = torch.is_grad_enabled() and any(m.weight.requires_grad for m in modules if hasattr(m, "weight"))
    if (len(modules) > 1 and (trains or cpu.folding()) and _stackable(modules) == "float"
            and len({m.bias is None for m in modules}) == 1):  # training: one GEMM (frozen weights, a LoRA base:
        # one product each, which costs less than concatenating them again at every step)
        w = torch.cat([m.weight for m in modules])  # (sum N, K): fewer, wider products for forward and backward
        b = None if modules[0].bias is None else torch.cat([m.bias for m in modules])  # (sum N,)
        return linear(x, w, b).split([m.weight.shape[0] for m in modules], dim=-1)
    if len(modules) > 1 and x.device.type == "cpu" and not torch.is_grad_enabled() and get_backend(x.device) == "torch":
        plan = _make_stack_plan(modules) if torch.compiler.is_compiling() else _stack_plan(modules)
        ys = plan(x) if plan is not None else None
        if ys is not None:
            return ys
    return [m(x) for m in modules]


def _stackable(modules):
    """The scheme the layers share ("float", "int8", "int4", as each class declares for itself, not inherited), or
    None where they differ, declare none, or carry hooks (calibration's must see every layer's input)."""
    scheme = type(modules[0]).__dict__.get("scheme")
    if scheme not in ("float", "int8", "int4") or _hooked(modules) or any(type(m) is not type(modules[0])
                                                                          for m in modules):
        return None
    return scheme


def _hooked(modules) -> bool:
    """Whether a forward hook must see each of these layers called on its own."""
    return bool(_global_forward_hooks or _global_forward_pre_hooks or any(
        m._forward_hooks or m._forward_pre_hooks for m in modules))


_plans: dict | None = None  # within `frozen_weights`: ids of the layers -> (layers, their stacked product or None)


@contextlib.contextmanager
def frozen_weights():
    """Within, the model's weights stay as they are (generate's decode loop): the dispatch decides once per group of
    layers whether they stack, and finds each prepared layout by the identity of its tensors
    (`kernels.cpu.frozen_layouts`); at a decode step those checks cost as much as a product."""
    global _plans
    outer, _plans = _plans, _plans if _plans is not None else {}
    try:
        with cpu.frozen_layouts():
            yield
    finally:
        _plans = outer


def _stack_plan(modules):
    if _plans is None:
        return _make_stack_plan(modules)
    key = tuple(map(id, modules))
    if key not in _plans:
        _plans[key] = (modules, _make_stack_plan(modules))  # holding the layers keeps their ids theirs
    return _plans[key][1]


def _make_stack_plan(modules):
    """x -> [m(x) for m in modules] from one product (None where the kernel refuses the shape), or None where the
    layers do not stack."""
    scheme = _stackable(modules)
    if scheme is None:
        return None
    biases = tuple(m.bias for m in modules)
    if scheme == "float" and torch.compiler.is_compiling():  # Inductor fuses the rows' reductions itself
        return None
    if scheme == "float":
        weights = tuple(m.weight for m in modules)
        sizes = [w.shape[0] for w in weights]

        def product(x):
            y = cpu.linear_bf16(x, weights, biases)  # (..., sum N)
            return None if y is None else y.split(sizes, dim=-1)
        return product
    sizes, m0 = [m.n_out for m in modules], modules[0]
    if scheme == "int8":
        weights, scales = tuple(m.weight for m in modules), tuple(m.scale for m in modules)

        def rows(x2):
            return cpu.stacked_int8_weight_only(x2, weights, scales, biases)
    elif len({(m.group_size, m.k_pad) for m in modules}) == 1:
        codes = tuple(tuple(getattr(m, n) for m in modules) for n in ("weight_packed", "scales", "zeros"))
        pad = m0.k_pad - m0.n_in  # int4: x padded with zeros to whole groups

        def rows(x2):
            return cpu.stacked_int4(F.pad(x2, (0, pad)) if pad else x2, *codes, m0.group_size, biases)
    else:
        return None

    def product(x):
        y = rows(x.reshape(-1, x.shape[-1]))  # (..., K) -> (M, K) -> (M, sum N)
        return None if y is None else y.view(*x.shape[:-1], y.shape[-1]).split(sizes, dim=-1)
    return product


def layer_norm(x, weight, bias=None, eps: float = 1e-5):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dim, computed in float32 (Ba et al. 2016). triton,
    in training: the fused kernel (forward and backward, `kernels.layer_norm`), as rms_norm; otherwise torch's op."""
    backend = get_backend(x.device)
    if backend == "triton" and torch.is_grad_enabled() and weight.dtype == x.dtype and (
            bias is None or bias.dtype == x.dtype):
        return kernels.layer_norm(x, weight, bias, eps)
    if backend != "reference":
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    return reference.layer_norm(x, weight, bias, eps)


def rms_norm(x, weight, eps: float = 1e-6):
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, computed in float32 (Zhang & Sennrich 2019). triton, in
    training: the fused kernel (forward and backward, `kernels.rms_norm`); torch, in training:
    `kernels.cpu.rms_norm_train` (the same math, keeping x and 1 / rms for the backward); decoding keeps torch's op,
    which torch.compile fuses."""
    backend = get_backend(x.device)
    if backend == "triton" and torch.is_grad_enabled() and weight.dtype == x.dtype:
        return kernels.rms_norm(x, weight, eps)
    if backend != "reference" and _trains(x, weight):
        return cpu.rms_norm_train(x, weight, eps)  # the same math, keeping less for the backward
    if backend != "reference":
        return F.rms_norm(x.float(), x.shape[-1:], None, eps).to(x.dtype) * weight
    return reference.rms_norm(x, weight, eps)


def _trains(*tensors) -> bool:
    """Eager autograd through these tensors: where the ops keep activations for a backward (under torch.compile
    Inductor chooses what to keep itself)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors) and not torch.compiler.is_compiling()


def swiglu(gate, up):
    """silu(gate) * up (Shazeer 2020). triton, in training: the fused kernel (`kernels.swiglu`); torch, in training:
    `kernels.cpu.swiglu_train` (the same math, silu(gate) recomputed in the backward)."""
    backend = get_backend(gate.device)
    if backend == "triton" and torch.is_grad_enabled():
        return kernels.swiglu(gate, up)
    if backend == "torch" and _trains(gate, up):
        return cpu.swiglu_train(gate, up)  # the same math, keeping less for the backward
    return reference.swiglu(gate, up)


def rope(x, cos, sin):
    """x (B, H, T, Dh) rotated by the tables cos, sin (B or 1, 1, T, Dh), "rotate half" pairs, in float32 (Su et al.
    2021). triton, in training: the fused kernel (`kernels.rope`); a bf16 model's bf16 tables take the torch math."""
    if get_backend(x.device) == "triton" and torch.is_grad_enabled() and cos.dtype == sin.dtype == torch.float32:
        return kernels.rope(x, cos, sin)
    return reference.rope(x, cos, sin)


def linear_cross_entropy(h, weight, target, ignore_index: int = -100):
    """Mean cross-entropy of the logits h (N, C) @ weight (V, C)^T against target (N,), computed in float32 from
    logits in the product's dtype (under autocast, its dtype), without holding all N x V logits: triton, the fused
    kernel (`kernels.linear_cross_entropy`); torch, the same chunk loop in torch ops
    (`kernels.linear_cross_entropy_rows`), whose forward also computes the gradients; reference, the head's
    product, then F.cross_entropy."""
    backend = get_backend(h.device)
    if backend != "reference":
        fused = kernels.linear_cross_entropy if backend == "triton" else kernels.linear_cross_entropy_rows
        dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        if dtype == torch.bfloat16 and h.device.type == "cpu" and not onednn_bf16():
            dtype = torch.float32  # (aten's bf16 products cost a GEMV a row on such a CPU: see `linear`)
        if weight.dtype == h.dtype or torch.is_autocast_enabled(h.device.type):
            with torch.autocast(h.device.type, enabled=False):  # the products in autocast's dtype, as F.linear's
                return fused(h.to(dtype), weight.to(dtype), target, ignore_index)
    return F.cross_entropy(linear(h, weight).float(), target, ignore_index=ignore_index)


def _autocast_input(x):
    """x in autocast's dtype where autocast is on for its device and x is float32, as autocast casts F.linear's
    inputs: a low-bit product then runs and returns in that dtype like a float layer's (QLoRA's activations stay bf16,
    not widened to fp32 after every frozen base product)."""
    if x.dtype == torch.float32 and torch.is_autocast_enabled(x.device.type):
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x


def int8_linear(x, weight, scale, bias=None, activations: bool = False):
    """x (M, K) float @ (int8 weight (N, K) * scale (N,)).T (+ bias) in x's dtype (autocast's for a float32 x under
    autocast, as for every low-bit product here: `_autocast_input`): weight-only (W8A16), or W8A8 with
    x quantized per token to int8 (exact int32 accumulation). torch backend on CPU: torch's packed int8 kernel
    (bf16 activations) / torch._int_mm. The weights are a quantized linear's own, valid by construction: the CPU
    paths skip the per-call checks (at a decode step they cost more than the product). Weight-only: differentiable in
    x on every backend (QLoRA; `kernels.matmul.with_input_grad`, only when autograd needs it)."""
    x = _autocast_input(x)
    backend = get_backend(x.device)
    if backend == "triton":
        if activations:
            q, s = kernels.quantize_per_token(x)
            return kernels.int8_matmul(q, weight, s, scale, bias).to(x.dtype)
        return kernels.int8_weight_only_matmul(x, weight, scale, bias)
    if activations:
        q, s = quant.quantize_per_token_int8(x)
        mm = cpu.int8_matmul_cpu if backend == "torch" and x.device.type == "cpu" else reference.int8_matmul
        return mm(q, weight, s, scale, bias).to(x.dtype)
    on_cpu = backend == "torch" and x.device.type == "cpu"
    mm = cpu.int8_weight_only_unchecked if on_cpu else reference.int8_weight_only_matmul
    if torch.is_grad_enabled() and x.requires_grad:  # the check first: decoding builds no closures
        grad = cpu.int8_input_grad if on_cpu else reference.int8_weight_only_matmul_backward
        return with_input_grad(x, lambda x: mm(x, weight, scale, bias), lambda dy: grad(dy, weight, scale), bias)
    return mm(x, weight, scale, bias)


def fp8_linear(x, weight, scale, bias=None):
    """x (M, K) float, quantized to e4m3 per row at run time, @ (e4m3 weight (N, K) * scale (N,)).T (+ bias) in x's
    dtype, fp32 accumulation. triton: `kernels.fp8_matmul` (e4m3 tensor cores, sm_89+); otherwise its reference."""
    x = _autocast_input(x)
    q, s = reference.quantize_fp8(x)  # (M, K) e4m3, (M,) per-row scales
    mm = kernels.fp8_matmul if get_backend(x.device) == "triton" else reference.fp8_matmul
    return mm(q, weight, s, scale, bias, out_dtype=x.dtype)


def int4_linear(x, w_packed, scales, zeros, group_size: int, bias=None, activations: bool = False):
    """x (M, K) float @ dequant(int4 w).T (+ bias) in x's dtype (contract of tinyformer.kernels.int4_matmul). torch
    backend on CPU: torch's packed int4 kernel (bf16), repacked once per weight; no per-call checks (as above).
    Differentiable in x on every backend, as int8_linear. activations=True: W4A8 for prefill (more than 16 rows,
    power-of-two groups >= 32, no autograd), x quantized per token to int8 and multiplied on the integer tensor cores
    (`kernels.w4a8_matmul`; its reference off triton); decode steps stay weight-only."""
    x = _autocast_input(x)
    backend = get_backend(x.device)
    if activations and x.shape[0] > W4A8_MIN_M and w4a8_mm.supports_group(group_size) and not (
            torch.is_grad_enabled() and x.requires_grad):
        q, s = kernels.quantize_per_token(x) if backend == "triton" else quant.quantize_per_token_int8(x)
        mm = kernels.w4a8_matmul if backend == "triton" else reference.w4a8_matmul
        return mm(q, w_packed, s, scales, zeros, group_size, bias, out_dtype=x.dtype)
    if backend == "triton":
        return kernels.int4_matmul(x, w_packed, scales, zeros, group_size, bias)
    on_cpu = backend == "torch" and x.device.type == "cpu"
    mm = cpu.int4_matmul_unchecked if on_cpu else reference.int4_matmul
    if torch.is_grad_enabled() and x.requires_grad:
        grad = cpu.int4_input_grad if on_cpu else reference.int4_matmul_backward
        return with_input_grad(x, lambda x: mm(x, w_packed, scales, zeros, group_size, bias),
                               lambda dy: grad(dy, w_packed, scales, zeros, group_size), bias)
    return mm(x, w_packed, scales, zeros, group_size, bias)
