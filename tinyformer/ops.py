"""The dispatch layer: every attention, product and norm of a tinyformer model goes through here, and here alone it
is decided which kernel runs it for the tensors' device, dtype and shape. Three backends:

- "reference": the explicit math of `tinyformer.kernels.reference` (softmax(QK^T)V spelled out): for reading and
  for checking the others.
- "torch": torch's fused ops (F.scaled_dot_product_attention, F.linear) and its packed int8/int4 CPU kernels: the
  default on CPU. Without autograd (decoding, evaluation) a CPU product of a few rows multiplies by a weight laid out
  once for its kernel (`tinyformer.kernels.cpu`: oneDNN's blocked bf16, torch's int8/int4 packs).
- "triton": tinyformer's Triton kernels (`tinyformer.kernels`): the default on CUDA when Triton is installed.
  Float matmuls stay on cuBLAS (F.linear); the Triton matmuls are the low-bit ones, used by quantized linears.

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

from tinyformer import kernels
from tinyformer.kernels import cpu, quant, reference
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


def attention(q, k, v, causal: bool = False, key_padding_mask=None, dropout_p: float = 0.0, scale=None):
    """q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D) -> (B, Hq, Tq, D). Contract of tinyformer.kernels.attention."""
    backend = get_backend(q.device)
    lo, hi = reference.KERNEL_HEAD_DIMS
    if backend == "triton" and not lo <= q.shape[-1] <= hi:
        backend = "torch"  # the kernel's head-dim range; SDPA takes any
    if dropout_p > 0.0 or backend == "torch":
        if q.dtype == torch.bfloat16 and q.device.type == "cpu" and q.requires_grad:
            # training under CPU bf16 autocast: torch's CPU flash-attention backward is ~4x slower in bf16 than in
            # fp32 (baby GPT: 12.4 vs 2.8 ms a step), so attention runs in fp32 and the output goes back to bf16
            with torch.autocast("cpu", enabled=False):
                out = cpu.sdpa_attention(q.float(), k.float(), v.float(), causal, scale, key_padding_mask,
                                               dropout_p=dropout_p)
            return out.to(q.dtype)
        return cpu.sdpa_attention(q, k, v, causal, scale, key_padding_mask, dropout_p=dropout_p)
    if backend == "reference":
        return reference.attention(q, k, v, causal, scale, key_padding_mask, upcast=False)
    return kernels.attention(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask)


BF16_UPCAST_ROWS = 16  # rows from which a bf16 product runs in fp32 on a CPU without oneDNN bf16 (`onednn_bf16`;
# aten's bf16 matmul costs a GEMV a row there)


def linear(x, weight, bias=None):
    """x (..., K) @ weight (N, K)^T + bias (N,) -> (..., N)."""
    backend = get_backend(x.device)
    if backend == "reference":
        y = x @ weight.T
        return y + bias if bias is not None else y
    if x.device.type == "cpu" and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
        y = cpu.linear_bf16(x, weight, bias)  # inference: the weight in oneDNN's blocked layout, made once
        if y is not None:  # (compiled with freezing, Inductor lays weights out itself)
            return y
    if (x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.numel() >= BF16_UPCAST_ROWS * x.shape[-1]
            and not onednn_bf16()):  # bf16 in and out, fp32 products (aten's bf16 ones accumulate in fp32 too)
        b = bias.float() if bias is not None else None
        return F.linear(x.float(), weight.float(), b).to(torch.bfloat16)
    return F.linear(x, weight, bias)


def layer_norm(x, weight, bias=None, eps: float = 1e-5):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dim (Ba et al. 2016)."""
    if get_backend(x.device) != "reference":
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)  # biased variance, as LayerNorm defines it
    y = (x - mean) * torch.rsqrt(var + eps) * weight
    return y + bias if bias is not None else y


def rms_norm(x, weight, eps: float = 1e-6):
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, computed in float32 (Zhang & Sennrich 2019)."""
    if get_backend(x.device) != "reference":
        return F.rms_norm(x.float(), x.shape[-1:], None, eps).to(x.dtype) * weight
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def int8_linear(x, weight, scale, bias=None, activations: bool = False):
    """x (M, K) float @ (int8 weight (N, K) * scale (N,)).T (+ bias) in x's dtype: weight-only (W8A16), or W8A8 with
    x quantized per token to int8 (exact int32 accumulation). torch backend on CPU: torch's packed int8 kernel
    (bf16 activations) / torch._int_mm. The weights are a quantized linear's own, valid by construction: the CPU
    paths skip the per-call checks (at a decode step they cost more than the product)."""
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
    if backend == "torch" and x.device.type == "cpu":
        return cpu.int8_weight_only_unchecked(x, weight, scale, bias)
    return reference.int8_weight_only_matmul(x, weight, scale, bias)


def int4_linear(x, w_packed, scales, zeros, group_size: int, bias=None):
    """x (M, K) float @ dequant(int4 w).T (+ bias) in x's dtype (contract of tinyformer.kernels.int4_matmul). torch
    backend on CPU: torch's packed int4 kernel (bf16), repacked once per weight; no per-call checks (as above)."""
    backend = get_backend(x.device)
    if backend == "triton":
        return kernels.int4_matmul(x, w_packed, scales, zeros, group_size, bias)
    if backend == "torch" and x.device.type == "cpu":
        return cpu.int4_matmul_unchecked(x, w_packed, scales, zeros, group_size, bias)
    return reference.int4_matmul(x, w_packed, scales, zeros, group_size, bias)
