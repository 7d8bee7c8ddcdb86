"""Quantization primitives: choose scales and zero points, quantize, dequantize. Pure torch, no Triton, no modules.

These are the small functions every quantization method is built from (torchao's choose_qparams / quantize /
dequantize split): round-to-nearest here, GPTQ and AWQ later (they change which scales are chosen and how rounding
errors are compensated, not these rules). The int8 and int4 kernels consume exactly the codes and parameters made here.

The rules (one place, reused everywhere):
- A code q and its parameters give back the value  w = (q - zero) * scale  (API.md's int4 rule; zero = 0 for
  symmetric int8, so w = q * scale there). zero is a float tensor holding an integer value (GPTQ/AWQ round the zero
  point so that 0.0 is represented exactly).
- Storage is fixed by `bits`: bits == 8 -> int8 codes in -128..127 (the W8A8 / int8 weight-only kernels take int8);
  bits < 8 -> uint8 codes in 0 .. 2**bits - 1 (int4: 0..15, packed two per byte by `pack_int4`).
- symmetric=True: the range is [-absmax, absmax].
    int8: signed codes in -127..127, scale = absmax / 127, zero = 0 (LLM.int8 / SmoothQuant absmax quantization;
          -128 is never produced, so the grid is symmetric around 0).
    bits < 8: unsigned codes, zero = 2**(bits-1) (8 for int4), scale = 2 * absmax / (2**bits - 1) (GPTQ's symmetric
          mode: the 16 codes span [-absmax, absmax]; the largest code clamps at +7 * scale, within scale / 2 of absmax).
  symmetric=False: the range is [min(w_min, 0), max(w_max, 0)] (0 always inside, as in GPTQ),
    scale = (hi - lo) / (qmax - qmin), zero = clamp(qmin - round(lo / scale), qmin, qmax).
- Granularity, for a 2-D weight (N, K) (rows = output channels, as nn.Linear stores them):
    group_size=None -> per tensor: scale and zero are 0-d tensors;
    group_size=-1   -> per channel (per row): shape (N,);
    group_size=G>0  -> per group of G consecutive columns of a row: shape (N, ceil(K / G)) (API.md's int4 layout
                       when G divides K). When G does not divide K the last group of each row is shorter (K mod G
                       columns), as in GPTQ's reference code: SmolLM2's 576 inputs at G = 128 are 4 groups of 128 and
                       one of 64. It is computed on the row padded with copies of its last value (`group_view`),
                       which change neither that group's min, max nor absmax; the codes of the padding are dropped.
- quantize: q = clamp(round(w / scale) + zero, qmin, qmax), round half to even (torch.round). Every w inside the
  range comes back by dequantize within scale / 2.
- A group whose values are all zero (absmax 0, or so small that scale underflows) gets scale 1.0: its codes are zero
  (q = zero), it dequantizes to exactly 0, and no division by zero happens.

References: Dettmers et al. 2022, "LLM.int8()" (absmax int8, per-token/per-channel scales); Xiao et al. 2023,
"SmoothQuant" (W8A8 with per-token dynamic activation scales); Frantar et al. 2022, "GPTQ" and Lin et al. 2023, "AWQ"
(asymmetric group-wise 4-bit weights with integer zero points); torchao's quant_primitives (the API split).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .reference import quantize_per_token as quantize_per_token_int8  # activations: the fused kernel's reference

__all__ = ["qrange", "n_groups", "group_view", "choose_qparams", "quantize", "dequantize", "quantize_per_token_int8",
           "sqnr"]


def qrange(bits: int) -> Tuple[int, int, torch.dtype]:
    """(qmin, qmax, storage dtype) of the codes: int8 -128..127 for bits == 8, uint8 0..2**bits-1 below."""
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in 2..8, got {bits!r}")
    if bits == 8:
        return -128, 127, torch.int8
    return 0, 2 ** bits - 1, torch.uint8


def n_groups(k: int, group_size: int) -> int:
    """Groups of `group_size` columns in a row of k: ceil(k / group_size), the last one shorter when it does not
    divide."""
    return -(-k // group_size)


def group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """w (N, K) as (N, n_groups, G), the ragged last group padded with copies of the row's last value (so its min, max
    and absmax are its own); a view when G divides K."""
    N, K = w.shape
    pad = n_groups(K, group_size) * group_size - K
    if pad:
        w = torch.cat((w, w[:, -1:].expand(N, pad)), dim=1)  # (N, K) -> (N, K + pad)
    return w.reshape(N, -1, group_size)  # (N, K/G, G)


def _grouped(w: torch.Tensor, group_size: Optional[int]) -> torch.Tensor:
    """View w so that the last dim is one quantization group: per tensor (1, numel), per channel (N, K),
    per group (N, ceil(K / G), G) (padded, see group_view)."""
    if group_size is None:
        return w.reshape(1, -1)  # (1, numel)
    if w.dim() != 2:
        raise ValueError(f"per-channel / per-group quantization needs a 2-D (N, K) tensor, got shape {tuple(w.shape)}")
    if group_size == -1:
        return w  # (N, K)
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be None (per tensor), -1 (per channel) or a positive int, "
                         f"got {group_size!r}")
    return group_view(w, group_size)


def _ungrouped(g: torch.Tensor, shape) -> torch.Tensor:
    """The inverse of _grouped: the grouped values back to `shape`, the padding of a ragged last group dropped."""
    if len(shape) == 2 and g.dim() == 3:
        return g.reshape(shape[0], -1)[:, :shape[1]]  # (N, K/G, G) -> (N, K)
    return g.reshape(shape)


def _param_shape(w_shape, group_size: Optional[int]):
    """Shape of scale / zero: () per tensor, (N,) per channel, (N, ceil(K / G)) per group."""
    if group_size is None:
        return ()
    if group_size == -1:
        return (w_shape[0],)
    return (w_shape[0], n_groups(w_shape[1], group_size))


def choose_qparams(w: torch.Tensor, bits: int, group_size: Optional[int] = None, symmetric: bool = True):
    """Round-to-nearest scale and zero point for w. Returns (scale, zero), both float32, shaped () per tensor,
    (N,) per channel (group_size=-1) or (N, ceil(K / G)) per group. Rules in the module docstring."""
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        got = w.dtype if isinstance(w, torch.Tensor) else type(w).__name__
        raise TypeError(f"w must be a float tensor, got {got}")
    qmin, qmax, _ = qrange(bits)
    g = _grouped(w.float(), group_size)  # (..., group)
    if symmetric:
        absmax = g.abs().amax(dim=-1)  # (...)
        if bits == 8:
            scale = absmax / 127.0
            zero = torch.zeros_like(scale)
        else:
            scale = absmax * (2.0 / (qmax - qmin))
            zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        lo = g.amin(dim=-1).clamp(max=0.0)  # (...)
        hi = g.amax(dim=-1).clamp(min=0.0)
        scale = (hi - lo) / float(qmax - qmin)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = (qmin - torch.round(lo / safe)).clamp(qmin, qmax)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero group: scale 1, codes = zero, exact 0
    shape = _param_shape(w.shape, group_size)
    return scale.reshape(shape), zero.reshape(shape)


def _expand(p: torch.Tensor, w_shape, group_size: Optional[int]) -> torch.Tensor:
    """scale / zero broadcast against the grouped view of w (see _grouped)."""
    expected = _param_shape(w_shape, group_size)
    if tuple(p.shape) != tuple(expected):
        raise ValueError(f"scale/zero must have shape {tuple(expected)} for w {tuple(w_shape)} and "
                         f"group_size={group_size}, got {tuple(p.shape)}")
    if group_size is None:
        return p.reshape(1, 1)
    return p[..., None]  # (N, 1) or (N, K/G, 1)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
             group_size: Optional[int] = None) -> torch.Tensor:
    """q = clamp(round(w / scale) + zero, qmin, qmax); int8 codes for bits == 8, uint8 below. Same shape as w."""
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError("w must be a float tensor")
    qmin, qmax, dtype = qrange(bits)
    g = _grouped(w.float(), group_size)
    s = _expand(scale.float(), w.shape, group_size)
    z = _expand(zero.float(), w.shape, group_size)
    q = (torch.round(g / s) + z).clamp(qmin, qmax)
    return _ungrouped(q.to(dtype), w.shape)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               group_size: Optional[int] = None) -> torch.Tensor:
    """w = (q - zero) * scale in float32, same shape as codes."""
    if not isinstance(codes, torch.Tensor) or codes.is_floating_point():
        raise TypeError("codes must be an integer tensor (int8 or uint8)")
    g = _grouped(codes.float(), group_size)
    s = _expand(scale.float(), codes.shape, group_size)
    z = _expand(zero.float(), codes.shape, group_size)
    return _ungrouped((g - z) * s, codes.shape)


def sqnr(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(sum ref^2 / sum (ref - approx)^2) (torchao compute_error)."""
    ref, approx = ref.double(), approx.double()
    noise = (ref - approx).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum() / noise))
