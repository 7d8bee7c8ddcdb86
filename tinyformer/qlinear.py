"""Quantized linear layers that a model's `Linear`s are swapped for: int8 weight-only (W8A16), W8A8 (int8 weights
and dynamically quantized int8 activations), int4 weight-only (group-wise, two codes per byte), W4A8 (those int4
weights and dynamically quantized int8 activations, for prefill), FP8 (e4m3 weights and dynamically quantized e4m3
activations).

Each holds integer codes and float scales (and zero points) as buffers, so `model.save` writes them to safetensors
and config.json records which module got which scheme; `tinyformer.load` swaps the same modules in (on the meta
device) before assigning the saved tensors. The math is in `tinyformer.kernels` (Triton on GPU, torch's int8/int4
CPU kernels on CPU); the codes come from the pure primitives in `tinyformer.kernels.quant`. `LowRankLinear` (two
thin float linears, from tinyformer.compress.lowrank) is recorded and rebuilt the same way, with its rank.

References: Dettmers et al. 2022 (LLM.int8(): per-channel absmax int8 weights); Xiao et al. 2023 (SmoothQuant:
W8A8 with per-token activation scales); Frantar et al. 2022 (GPTQ) and Lin et al. 2023 (AWQ): group-wise
asymmetric int4 weights; Micikevicius et al. 2022 (FP8 formats: e4m3 with per-channel / per-token scales).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyformer import ops
from tinyformer.kernels import pack_int4, reference
from tinyformer.kernels.quant import choose_qparams, n_groups, quantize
from tinyformer.model import Linear

SCHEMES = ("int8", "w8a8", "int4", "w4a8", "fp8", "lowrank")


class QuantLinear(nn.Module):
    """Base: a quantized y = x W^T + b over any leading dims. Subclasses define `matmul(x2d)`."""

    scheme = ""

    def __init__(self, n_out: int, n_in: int, bias: bool, dtype=torch.float32):
        super().__init__()
        self.n_out, self.n_in = n_out, n_in
        self.register_buffer("bias", torch.zeros(n_out, dtype=dtype) if bias else None)

    def forward(self, x):
        lead = x.shape[:-1]
        y = self.matmul(x.reshape(-1, self.n_in))  # (M, N), M = prod(lead)
        return y.reshape(*lead, self.n_out)

    def spec(self) -> dict:
        return {"scheme": self.scheme}

    def extra_repr(self):
        return f"in={self.n_in}, out={self.n_out}, bias={self.bias is not None}, {self.spec()}"


class PerChannelLinear(QuantLinear):
    """Base of the per-output-channel schemes: codes (N, K) of `code_dtype` and a float32 scale (N,), w = q * scale;
    subclasses define `codes(weight) -> (q, scale)`."""

    code_dtype = torch.int8

    def __init__(self, n_out, n_in, bias, dtype=torch.float32):
        super().__init__(n_out, n_in, bias, dtype)
        self.register_buffer("weight", torch.zeros(n_out, n_in, dtype=self.code_dtype))  # (N, K) codes
        self.register_buffer("scale", torch.ones(n_out, dtype=torch.float32))  # (N,)

    @classmethod
    def from_weight(cls, weight, bias=None):
        m = cls(*weight.shape, bias is not None, bias.dtype if bias is not None else torch.float32)
        q, scale = cls.codes(weight.detach())
        m.weight.copy_(q)
        m.scale.copy_(scale)
        if bias is not None:
            m.bias.copy_(bias.detach())
        return m


class Int8Linear(PerChannelLinear):
    """Int8 weight-only (W8A16): symmetric per-output-channel int8 codes, w = q * scale."""

    scheme = "int8"

    @staticmethod
    def codes(weight):
        scale, zero = choose_qparams(weight, 8, group_size=-1, symmetric=True)
        return quantize(weight, scale, zero, 8, group_size=-1), scale

    def matmul(self, x):
        return ops.int8_linear(x, self.weight, self.scale, self.bias)


class W8A8Linear(Int8Linear):
    """W8A8: the int8 weights of Int8Linear times activations quantized per token at run time; int32 accumulation.
    smooth=True adds SmoothQuant's per-input-channel divisor s (K,) where it could not be folded into a preceding
    norm or linear: the layer computes (x / s) @ (codes * scale)^T, the codes quantizing W diag(s)."""

    scheme = "w8a8"

    def __init__(self, n_out, n_in, bias, dtype=torch.float32, smooth: bool = False):
        super().__init__(n_out, n_in, bias, dtype)
        self.register_buffer("smooth", torch.ones(n_in) if smooth else None)  # (K,) or None

    def matmul(self, x):
        if self.smooth is not None:
            x = x / self.smooth.to(x.dtype)
        return ops.int8_linear(x, self.weight, self.scale, self.bias, activations=True)

    def spec(self):
        return {"scheme": self.scheme, "smooth": True} if self.smooth is not None else super().spec()


class Int4Linear(QuantLinear):
    """Int4 weight-only: asymmetric codes 0..15 per group of `group_size` inputs, w = (q - zero) * scale, packed two
    codes per byte (low nibble = even input).

    When group_size does not divide the in-features K, the last group is shorter (kernels.quant's rule) and the
    buffers hold K_pad = n_groups * group_size columns (the padding's codes: the group's zero point, rounded) and the
    forward pads x with zeros to K_pad, as the int4 kernels take whole groups: the padding adds nothing."""

    scheme = "int4"
    activations = False  # W4A8Linear: prefill on int8 tensor cores, activations quantized per token

    def __init__(self, n_out, n_in, bias, group_size: int = 128, dtype=torch.float32):
        super().__init__(n_out, n_in, bias, dtype)
        if not isinstance(group_size, int) or group_size <= 0 or group_size % 2:
            raise ValueError(f"int4: group_size must be a positive even int, got {group_size!r}")
        self.group_size = group_size
        G = n_groups(n_in, group_size)
        self.k_pad = G * group_size
        self.register_buffer("weight_packed", torch.zeros(n_out, self.k_pad // 2, dtype=torch.uint8))  # (N, Kp/2)
        self.register_buffer("scales", torch.ones(n_out, G))  # (N, Kp/G)
        self.register_buffer("zeros", torch.zeros(n_out, G))  # (N, Kp/G)

    @classmethod
    def from_codes(cls, codes, scales, zeros, group_size, bias=None):
        """From uint8 codes (N, K) in 0..15 and their (N, ceil(K/G)) scales and zero points (RTN, GPTQ or AWQ)."""
        m = cls(*codes.shape, bias is not None, group_size, bias.dtype if bias is not None else torch.float32)
        pad = m.k_pad - m.n_in
        if pad:  # the ragged last group's padding: its zero point's code (clamped; float zeros rounded)
            fill = zeros[:, -1:].round().clamp(0, 15).to(codes.dtype).expand(-1, pad)  # (N, pad)
            codes = torch.cat((codes, fill), dim=1)  # (N, K) -> (N, Kp)
        m.weight_packed.copy_(pack_int4(codes))
        m.scales.copy_(scales)
        m.zeros.copy_(zeros)
        if bias is not None:
            m.bias.copy_(bias.detach())
        return m

    @classmethod
    def from_weight(cls, weight, bias=None, group_size: int = 128):
        scales, zeros = choose_qparams(weight.detach(), 4, group_size=group_size, symmetric=False)
        codes = quantize(weight.detach(), scales, zeros, 4, group_size=group_size)
        return cls.from_codes(codes, scales, zeros, group_size, bias)

    def matmul(self, x):
        if self.k_pad != self.n_in:
            x = F.pad(x, (0, self.k_pad - self.n_in))  # (M, K) -> (M, Kp)
        return ops.int4_linear(x, self.weight_packed, self.scales, self.zeros, self.group_size, self.bias,
                               activations=self.activations)

    def spec(self):
        return {"scheme": self.scheme, "group_size": self.group_size}


class W4A8Linear(Int4Linear):
    """W4A8: the int4 weights of Int4Linear times activations quantized per token at run time, for prefill (more
    than 16 rows, power-of-two groups >= 32: `ops.int4_linear(activations=True)`, the int4 codes on int8 tensor
    cores); decode steps and training stay weight-only. Made by `W4A8Linear.from_weight` / `from_codes`."""

    scheme = "w4a8"
    activations = True


class FP8Linear(PerChannelLinear):
    """FP8: e4m3 weights with a per-output-channel scale (absmax / 448), times activations quantized to e4m3 per
    row at run time; fp32 accumulation (`ops.fp8_linear`: the e4m3 tensor cores on sm_89+ with the triton backend,
    the reference elsewhere)."""

    scheme = "fp8"
    code_dtype = torch.float8_e4m3fn

    @staticmethod
    def codes(weight):
        return reference.quantize_fp8(weight)

    def matmul(self, x):
        return ops.fp8_linear(x, self.weight, self.scale, self.bias)


class LowRankLinear(nn.Module):
    """A weight factored into two thin float linears, y = b(a(x)): `a` (rank, in) without bias, `b` (out, rank) with
    the original bias (tinyformer.compress.lowrank makes them). Both are ordinary `Linear`s, so quantize_ and prune_
    can act on them afterwards; the record then holds "...wq": lowrank before "...wq.a": int8 (parent first, as
    named_modules lists them), which is the order `swap_in_empty` needs."""

    scheme = "lowrank"

    def __init__(self, n_out: int, n_in: int, bias: bool, rank: int):
        super().__init__()
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"lowrank: rank must be a positive int, got {rank!r}")
        self.n_out, self.n_in, self.rank = n_out, n_in, rank
        self.a = Linear(n_in, rank, bias=False)  # weight (r, in)
        self.b = Linear(rank, n_out, bias=bias)  # weight (out, r)

    @classmethod
    def from_factors(cls, A, B, bias=None):
        """From A (r, in) and B (out, r), so that the weight is B @ A (and the bias `bias`)."""
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(f"lowrank: expected A (r, in) and B (out, r), got {tuple(A.shape)} and {tuple(B.shape)}")
        m = cls(B.shape[0], A.shape[1], bias is not None, A.shape[0])
        m.a.weight = nn.Parameter(A.detach().clone().contiguous())
        m.b.weight = nn.Parameter(B.detach().clone().to(A.dtype).contiguous())
        if bias is not None:
            m.b.bias = nn.Parameter(bias.detach().clone().to(A.dtype))
        return m

    def forward(self, x):
        return self.b(self.a(x))  # (..., in) -> (..., r) -> (..., out)

    def spec(self) -> dict:
        return {"scheme": self.scheme, "rank": self.rank}

    def extra_repr(self):
        return f"in={self.n_in}, out={self.n_out}, rank={self.rank}"


MODULES = {"int8": Int8Linear, "w8a8": W8A8Linear, "int4": Int4Linear, "w4a8": W4A8Linear, "fp8": FP8Linear,
           "lowrank": LowRankLinear}


def _set(model, name, module):
    parent, _, child = name.rpartition(".")
    parent = model.get_submodule(parent) if parent else model
    if child in parent._parameters or child in vars(parent):  # a Parameter, or a plain attribute (lm_head = None):
        delattr(parent, child)  # torch will not put a module in their place
    setattr(parent, child, module)


def empty_from_spec(spec: dict, n_out: int, n_in: int, bias: bool):
    if spec.get("scheme") not in MODULES:
        raise ValueError(f"unknown quantization scheme {spec.get('scheme')!r}; expected one of {', '.join(SCHEMES)}")
    kw = {"group_size": spec["group_size"]} if spec["scheme"] in ("int4", "w4a8") else {}
    if spec["scheme"] == "lowrank":
        kw = {"rank": spec["rank"]}
    if spec["scheme"] == "w8a8" and spec.get("smooth"):
        kw = {"smooth": True}
    return MODULES[spec["scheme"]](n_out, n_in, bias, **kw)


def swap_in_empty(model, quantization: dict) -> None:
    """Before loading a quantized checkpoint: replace each recorded Linear by an empty quantized module of its shape."""
    for name, spec in quantization.items():
        if name == "lm_head" and not isinstance(model.lm_head, nn.Module):  # a quantized output head (V, C)
            cfg = model.config
            _set(model, name, empty_from_spec(spec, cfg.vocab_size, cfg.d_model, False))
            continue
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the checkpoint quantizes {name!r}, which this model does not have") from None
        n_out, n_in = lin.weight.shape
        _set(model, name, empty_from_spec(spec, n_out, n_in, lin.bias is not None))
