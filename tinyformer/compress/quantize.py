"""Quantization of a model's linear layers, in place: round-to-nearest, GPTQ, AWQ, SmoothQuant (W8A8) and
quantization-aware training, all ending in the real int8 / int4 modules of `tinyformer.qlinear`.

One verb, `quantize_(model, bits, group_size=128, method=..., calib=None, activations=False, ...)`, over pure
primitives that take one weight (N, K) and what calibration knows about its inputs (`calib.InputStats`):

- `qparams` / `rtn`: scale and zero point per output channel (int8, symmetric, codes -127..127) or per group of
  `group_size` inputs (int4, asymmetric by default; `symmetric=True`; `float_zero=True` keeps the zero point
  unrounded, so that the grid [min, max] of each group is hit exactly: this recovers a GGUF Q4_1 grid, the
  "zero_point_domain=FLOAT" of torchao's int4 layout; SmolLM2-135M's Q4_1 weights at g32: perplexity -0.01% with
  it, +22.5% with the integer zero point). `clip` shrinks each group's range by a ratio (AWQ's clip).
- `gptq` (Frantar et al. 2022, Algorithm 1): quantize the columns one at a time and spread each column's rounding
  error over the columns not yet quantized through the Cholesky factor of H^-1, H = 2/n sum x x^T (the result does
  not depend on H's scale: the damping is relative). Dead inputs (H_jj = 0) get H_jj = 1 and weight 0; damping
  `percdamp * mean(diag H)`; lazy batch updates in blocks of `blocksize` columns; group parameters chosen when a group
  starts, from the already-updated weights (the paper's scheme), their range by `awq_clip`'s search when `clip`
  (quantize_'s default; GPTQ's reference Quantizer has the idea as its `mse` option). `act_order` quantizes columns
  by decreasing H_jj; our int4 layout keeps groups contiguous in the original column order, so with act_order the
  group parameters are computed up front from the original weight ("static groups", as AutoGPTQ/GPTQModel's
  static_groups option). SmolLM2-135M (benchmarks/compression.py, all linears at group 128, RTN +32.8% perplexity):
  min..max ranges +25.5%, with act_order +19.0% (a few input channels carry most of H); with the clip search +13.2%,
  +13.6% with act_order as well.
- `awq_search` (Lin et al. 2023, section 3.2): the input channels of W are scaled by s = s_x^alpha (normalised by
  sqrt(max s * min s)), alpha on a grid of `n_grid` points in [0, 1); the s whose quantized weight Q(W diag(s))
  diag(s)^-1 has the lowest output error tr(dW H dW^T) wins (alpha = 0 is s = 1, plain RTN, so the chosen s is never
  worse on the calibration data). s_x is the RMS of each input channel, sqrt(sum x_j^2 / n): InputStats keeps sum x^2,
  not sum |x| (the paper's mean |x|). `awq_clip`: then a grid of range ratios 1, 0.95, ..., 0.55 per (row, group),
  each judged by that group's own error dw_g H_gg dw_g^T (the block diagonal of H; AWQ's auto_clip measures the same
  thing on the calibration inputs).
- `smoothquant_scale` (Xiao et al. 2023, eq. 4): s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), which moves the
  activation outliers into the weights before W8A8's per-token activation quantization.
- Folding (`input_groups`, `fold_scale_`): the linears that read one input share one s. x / s is folded into what
  produces x, so the float model computes the same function: the preceding norm's weight and bias (q/k/v after norm1,
  w1/w3 after norm2, cross-attention q after its norm, in pre-norm blocks only: in post-norm blocks that input is
  also the residual); the output rows of wv for wo (with GQA, one s per key/value channel: the query heads sharing a
  key/value head share their scales); the rows of w3 (up) for w2 in SwiGLU, of w1 for ReLU (relu(a / s) = relu(a) / s
  for s > 0). GELU is not scale-equivariant: nothing is folded there. What cannot be folded: AWQ quantizes it with
  s = 1 (RTN, still with the clip search); SmoothQuant gives its W8A8Linear a `smooth` buffer (x / s at run time).
- QAT (Jacob et al. 2018; Bengio et al. 2013 for the straight-through estimator): `prepare_qat_` swaps each Linear
  for a `FakeQuantLinear` whose forward uses dequant(quant(W)) (parameters recomputed from the current W every step)
  and whose backward passes the gradient straight through to W; `qat_finetune` trains the model on the calibration
  ids (next-token loss; encoders: mean squared error to the float model's hidden states); `convert_qat_` swaps in
  the real Int8Linear / Int4Linear with exactly the fake-quant grid.

GPTQ, AWQ and SmoothQuant run block by block with `calib.blockwise`: each block's statistics are gathered on the
outputs of the already-quantized blocks before it. What is quantized: every float `Linear` of the transformer blocks.
Token embeddings and the output head (usually tied to them) stay in float unless head=True: then the head becomes an
`Int8Linear` (per output row, symmetric RTN) in lm_head's place, as llama.cpp's 4-bit files of SmolLM2-135M keep
their tied token_embd in Q8_0; a tied embedding stays float for the lookup (one row a token), so the int8 head is a
second copy (+28 MB for SmolLM2, whose fp32 head is 113 MB: the largest single product of a decode step).
Where group_size does not divide a layer's in-features, its last group is shorter (`kernels.quant.group_view`;
GPTQ's reference code does the same): SmolLM2-135M's 576-wide inputs at group 128 are four groups of 128 and one of 64.

References: Frantar, Ashkboos, Hoefler, Alistarh 2022, "GPTQ" (arXiv:2210.17323) and IST-DASLab/gptq; Lin et al.
2023, "AWQ" (arXiv:2306.00978) and mit-han-lab/llm-awq; Xiao et al. 2023, "SmoothQuant" (arXiv:2211.10438); Jacob et
al. 2018, "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference"; torchao's
quantize_ (the API shape).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyformer import ops
from tinyformer.compress.calib import InputStats, blockwise, check_calib
from tinyformer.kernels import w4a8_mm
from tinyformer.kernels.quant import choose_qparams, dequantize, group_view, n_groups, qrange, quantize
from tinyformer.model import Linear, Norm
from tinyformer.qlinear import FP8Linear, Int4Linear, Int8Linear, W4A8Linear, W8A8Linear, _set

__all__ = ["quantize_", "qparams", "rtn", "gptq", "output_error", "awq_search", "awq_clip", "smoothquant_scale",
           "InputGroup", "input_groups", "fold_scale_", "fake_quantize", "FakeQuantLinear", "prepare_qat_",
           "convert_qat_", "qat_finetune", "METHODS"]

METHODS = ("rtn", "gptq", "awq", "smoothquant", "qat")
DATA_METHODS = ("gptq", "awq", "smoothquant", "qat")


# ----------------------------------------------------------------------------------------------------------------------
# round-to-nearest
def _granularity(bits: int, group_size: int) -> int:
    """int8 is per output channel (-1), int4 per group."""
    return -1 if bits == 8 else group_size


def _check_weight(w, bits: int, group_size: int) -> int:
    """Validate a weight for quantization; returns the granularity (-1 per channel, else the group size)."""
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError(f"w must be a float tensor, got {w.dtype if isinstance(w, torch.Tensor) else type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"w must be a 2-D weight (N, K), got shape {tuple(w.shape)}")
    qrange(bits)  # bits in 2..8
    gs = _granularity(bits, group_size)
    if gs != -1 and (not isinstance(gs, int) or isinstance(gs, bool) or gs <= 0):
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    return gs


def qparams(w: torch.Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = False,
            float_zero: bool = False, clip: Optional[torch.Tensor] = None):
    """(scale, zero) float32 of w (N, K): (N,) for int8 (always symmetric, per channel), (N, ceil(K / G)) for int4.
    `clip` (the shape of scale): the range [lo, hi] of each group is shrunk to [clip * lo, clip * hi] first.
    `float_zero`: asymmetric over [min, max] of the group with zero = -min / scale, not rounded (needs asymmetric)."""
    gs = _check_weight(w, bits, group_size)
    w = w.detach().float()
    if clip is not None:
        N, K = w.shape
        shape = (N,) if gs == -1 else (N, n_groups(K, gs))
        if tuple(clip.shape) != shape:
            raise ValueError(f"clip must have the shape of the scales, {shape}, got {tuple(clip.shape)}")
        g = group_view(w, K if gs == -1 else gs)  # (N, K/G, G); one group per row when per channel
        r = clip.float().reshape(N, -1, 1)  # (N, K/G, 1)
        lo, hi = g.amin(-1, keepdim=True).clamp(max=0), g.amax(-1, keepdim=True).clamp(min=0)
        if float_zero:
            lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        w = torch.minimum(torch.maximum(g, lo * r), hi * r).reshape(N, -1)[:, :K]  # (N, K/G, G) -> (N, K)
    if bits == 8 or not float_zero:
        return choose_qparams(w, bits, group_size=gs, symmetric=symmetric or bits == 8)
    g = group_view(w, gs)  # (N, K/G, G)
    lo, hi = g.amin(-1), g.amax(-1)  # (N, K/G)
    _, qmax, _ = qrange(bits)
    scale = (hi - lo) / qmax
    flat = lo.abs().where(lo != 0, torch.ones_like(lo))  # a constant group: one code, value lo, exactly
    scale = torch.where(scale > 0, scale, flat)
    return scale, -lo / scale


def rtn(w: torch.Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = False, float_zero: bool = False,
        clip: Optional[torch.Tensor] = None):
    """Round-to-nearest: (codes, scale, zero) of w (N, K); int8 codes (N, K) in -127..127 with scale (N,) and zero 0,
    or uint8 codes 0..15 with (N, ceil(K / G)) scales and zeros. dequantize(codes, scale, zero, G) gives the weight
    back."""
    scale, zero = qparams(w, bits, group_size, symmetric, float_zero, clip)
    gs = _granularity(bits, group_size)
    if not float_zero or bits == 8:
        return quantize(w.detach().float(), scale, zero, bits, group_size=gs), scale, zero
    N, K = w.shape
    g = group_view(w.detach().float(), gs)  # (N, K/G, G)
    qmin, qmax, dtype = qrange(bits)
    codes = _round(g, scale[..., None], zero[..., None], qmin, qmax, True)
    return codes.to(dtype).reshape(N, -1)[:, :K], scale, zero  # codes (N, K/G, G) -> (N, K)


def _round(w, scale, zero, qmin, qmax, float_zero):
    """The nearest code: round(w / scale) + zero for an integer zero point (kernels.quant.quantize's rule, ties to
    even), round(w / scale + zero) for a float one."""
    q = torch.round(w / scale + zero) if float_zero else torch.round(w / scale) + zero
    return q.clamp(qmin, qmax)


def dequant(codes, scale, zero, bits: int, group_size: int) -> torch.Tensor:
    """The float32 weight (N, K) the codes stand for."""
    return dequantize(codes, scale, zero, group_size=_granularity(bits, group_size))


def output_error(dw: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(dW H dW^T) = sum over calibration rows x of ||dW x||^2 when H = sum x x^T: the output error of a weight
    change dW (N, K). `hessian` (K, K), or its diagonal (K,) for the diagonal approximation; computed in the
    hessian's dtype (a sum of non-negative terms: float32 is accurate enough for comparisons)."""
    h = hessian
    dw = dw.to(h.dtype)
    if h.dim() == 1:
        return float((dw * dw * h).sum())
    return float(((dw @ h) * dw).sum())


# ----------------------------------------------------------------------------------------------------------------------
# GPTQ
@torch.no_grad()
def gptq(w: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = False,
         float_zero: bool = False, percdamp: float = 0.01, blocksize: int = 128, act_order: bool = False,
         clip: bool = False, n_grid: int = 20):
    """GPTQ codes of w (N, K) given H = sum x x^T (K, K) of its inputs: (codes, scale, zero) as `rtn` returns them.
    Each row is quantized independently with the same H, so linears that read the same input can be stacked.
    `clip`: each group's range comes from `awq_clip`'s search (on the weights the group has when its parameters are
    chosen, judged by H's diagonal block), not from its min and max (GPTQ's reference Quantizer has the same idea
    as its `mse` option, judged there by the weights alone)."""
    gs = _check_weight(w, bits, group_size)
    N, K = w.shape
    if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (K, K):
        got = tuple(hessian.shape) if isinstance(hessian, torch.Tensor) else type(hessian).__name__
        raise ValueError(f"hessian must be a (K, K) = {(K, K)} tensor for a weight {tuple(w.shape)}, got {got}")
    W = w.detach().float().clone()  # (N, K), updated in place as columns are quantized
    H = hessian.detach().to(W.device, torch.float64, copy=True)  # (K, K)
    dead = torch.diag(H) == 0  # inputs that are always zero: their weights never matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    qmin, qmax, dtype = qrange(bits)
    if bits == 8:
        qmin = -qmax  # symmetric int8: -127..127, as rtn
    if gs == -1 or act_order:  # per-channel parameters, or static groups: chosen from the original weight
        ratio = awq_clip(W, H, bits, group_size, symmetric, float_zero, n_grid) if clip else None
        scale, zero = qparams(W, bits, group_size, symmetric, float_zero, ratio)
    else:  # group parameters chosen as each group starts (below)
        scale = torch.ones(N, n_groups(K, gs), device=W.device)
        zero = torch.zeros(N, n_groups(K, gs), device=W.device)
    scale2, zero2 = (scale[:, None], zero[:, None]) if gs == -1 else (scale, zero)  # (N, 1) or (N, K/G)
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else torch.arange(K, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]  # columns in quantization order
    H += percdamp * torch.diag(H).mean() * torch.eye(K, dtype=H.dtype, device=H.device)
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))  # (K, K) H^-1
    U = torch.linalg.cholesky(Hinv, upper=True).float()  # (K, K) upper: row i holds the updates from column i
    Q = torch.zeros(N, K, device=W.device)  # codes, in quantization order
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        W1 = W[:, i1:i2].clone()  # (N, B) this block, updated column by column
        Err1 = torch.zeros_like(W1)  # (N, B) scaled errors, for the lazy update of the columns after the block
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])  # the column's original index
            if gs > 0 and not act_order and col % gs == 0:  # a group starts: parameters from its current columns
                cur = torch.cat((W1[:, i:], W[:, i2:]), dim=1)[:, :gs]  # (N, G), fewer for a ragged last group
                Hg = H[col:col + cur.shape[1], col:col + cur.shape[1]]  # (G, G): columns in original order here
                ratio = awq_clip(cur, Hg, bits, gs, symmetric, float_zero, n_grid) if clip else None
                s, z = qparams(cur, bits, gs, symmetric, float_zero, ratio)  # (N, 1) each
                scale[:, col // gs], zero[:, col // gs] = s[:, 0], z[:, 0]
            g = 0 if gs == -1 else col // gs
            s, z = scale2[:, g], zero2[:, g]  # (N,)
            x = W1[:, i]
            q = _round(x, s, z, qmin, qmax, float_zero)
            Q[:, i1 + i] = q
            err = (x - (q - z) * s) / U1[i, i]  # (N,)
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]  # (N, B - i)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # (N, K - i2): the block's errors reach the later columns at once
    codes = torch.empty_like(Q)
    codes[:, perm] = Q  # back to the original column order
    return codes.to(dtype), scale, zero


# ----------------------------------------------------------------------------------------------------------------------
# AWQ and SmoothQuant scales
def _tie(v: torch.Tensor, heads, reduce: str) -> torch.Tensor:
    """v over attention-output channels (H * Dh,) made equal within each group of query heads that share a key/value
    head (reduce "max" or "mean" over the group), so that one scale per key/value channel can fold into wv's rows."""
    if heads is None:
        return v
    H, Hkv, Dh = heads
    g = v.reshape(Hkv, H // Hkv, Dh)  # (Hkv, rep, Dh): head h uses key/value head h // rep
    r = g.amax(1, keepdim=True) if reduce == "max" else g.mean(1, keepdim=True)  # (Hkv, 1, Dh)
    return r.expand_as(g).reshape(H * Dh)  # (Hkv, rep, Dh) -> (H * Dh,)


def _check_stats(stats, k: int):
    if not isinstance(stats, InputStats):
        raise TypeError(f"stats must be a calib.InputStats, got {type(stats).__name__}")
    if stats.n <= 0 or stats.sq_norm.shape[0] != k:
        raise ValueError(f"stats must hold statistics of {k} input channels from at least one row")


@torch.no_grad()
def awq_search(w: torch.Tensor, stats: InputStats, bits: int = 4, group_size: int = 128, symmetric: bool = False,
               float_zero: bool = False, n_grid: int = 20, heads=None):
    """AWQ's scale search for w (N, K) (the stacked linears reading one input): returns (s (K,), alpha, {alpha: error})
    with the s = s_x^alpha / sqrt(max * min) that minimises the output error of Q(W diag(s)) diag(s)^-1. The error
    uses H = stats.hessian / n, or its diagonal when the statistics hold no Hessian. `heads` = (H, Hkv, Dh) ties the
    scales of query heads that share a key/value head (for wo, folded into wv)."""
    N, K = w.shape
    _check_stats(stats, K)
    W = w.detach().float()
    h = ((stats.hessian if stats.hessian is not None else stats.sq_norm) / stats.n).to(W.device, torch.float32)
    x_scale = _tie(stats.sq_norm.float().to(W.device) / stats.n, heads, "mean").sqrt().clamp(min=1e-4)  # (K,) RMS
    best, errors = None, {}
    for i in range(n_grid):
        alpha = i / n_grid
        s = x_scale.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        wq = dequant(*rtn(W * s, bits, group_size, symmetric, float_zero), bits, group_size) / s  # (N, K)
        errors[alpha] = output_error(wq - W, h)
        if best is None or errors[alpha] < best[2]:
            best = (s, alpha, errors[alpha])
    return best[0], best[1], errors


@torch.no_grad()
def awq_clip(w: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = False,
             float_zero: bool = False, n_grid: int = 20, max_shrink: float = 0.5) -> torch.Tensor:
    """AWQ's clip search: per (row, group) the range ratio r in 1, 1 - 1/n_grid, ... > 1 - max_shrink whose RTN weight
    has the lowest error dw_g H_gg dw_g^T (H_gg the group's diagonal block of H (K, K) or of a diagonal (K,)).
    Returns the ratios, shaped like the scales ((N,) for int8, (N, ceil(K / G)) for int4), to pass as `clip`."""
    N, K = w.shape
    gs = _granularity(bits, group_size)
    G = K if gs == -1 else gs
    n = n_groups(K, G)
    W = w.detach().float()
    h = hessian.to(W.device).float()
    Hb = torch.zeros(n, G, G, device=W.device)  # (K/G, G, G) diagonal blocks; a ragged last one zero-padded
    for j in range(n):
        blk = h[j * G:(j + 1) * G]  # (g,) or (g, K), g <= G
        g = blk.shape[0]
        Hb[j, :g, :g] = torch.diag(blk) if h.dim() == 1 else blk[:, j * G:j * G + g]
    shape = (N,) if gs == -1 else (N, n)
    best_err = torch.full((N, n), float("inf"), device=W.device)
    best_r = torch.ones(N, n, device=W.device)
    for i in range(max(1, int(round(max_shrink * n_grid)))):
        r = 1.0 - i / n_grid
        ratio = torch.full(shape, r, device=W.device)
        dw = (dequant(*rtn(W, bits, group_size, symmetric, float_zero, clip=ratio), bits, group_size) - W)
        dw = F.pad(dw, (0, n * G - K)).reshape(N, n, G)  # (N, K) -> (N, K/G, G), a ragged last group zero-padded
        err = torch.einsum("ngi,gij,ngj->ng", dw, Hb, dw)  # (N, K/G)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_r = torch.where(better, torch.full_like(best_r, r), best_r)
    return best_r.reshape(shape)  # (N, K/G), or (N,) per channel


def smoothquant_scale(w: torch.Tensor, absmax: torch.Tensor, alpha: float = 0.5, heads=None) -> torch.Tensor:
    """SmoothQuant's s (K,) for w (N, K) (the stacked linears reading one input) and max|X_j| (K,):
    s_j = max|X_j|^alpha / max_i |W_ij|^(1 - alpha); 1 where either is zero (a dead channel)."""
    K = w.shape[1]
    if absmax.shape != (K,):
        raise ValueError(f"absmax must be (K,) = ({K},), got {tuple(absmax.shape)}")
    x = _tie(absmax.float().to(w.device), heads, "max")
    wmax = _tie(w.detach().float().abs().amax(0), heads, "max")  # (K,)
    s = x.pow(alpha) / wmax.pow(1 - alpha)
    ok = (x > 0) & (wmax > 0)
    return torch.where(ok, s, torch.ones_like(s)).clamp(1e-5, 1e5)


# ----------------------------------------------------------------------------------------------------------------------
# which linears read one input, and folding x / s into what produces x
@dataclass
class InputGroup:
    names: tuple  # the linears (names inside the block) that read the same input
    fold: Optional[str] = None  # the Norm (kind "norm") or Linear (kind "rows") that produces that input; None
    kind: Optional[str] = None  # "norm" | "rows" | None
    heads: Optional[tuple] = None  # (H, Hkv, Dh) when the input is attention output and fold is wv


def input_groups(block) -> list:
    """The InputGroups of a Block, row-folded groups (wo, w2) before the groups whose linears they change (q/k/v,
    w1/w3), so that every scale search sees the weights as they will be quantized."""
    groups = []
    for a, norm in (("attn", "norm1"), ("cross_attn", "norm_cross")):
        attn = getattr(block, a)
        if attn is None:
            continue
        groups.append(InputGroup((f"{a}.wo",), f"{a}.wv", "rows", (attn.n_head, attn.n_kv_head, attn.head_dim)))
        pre = (norm, "norm") if block.pre else (None, None)
        if attn.cross:  # q reads the decoder stream, k and v the encoder memory (shared by every block)
            groups.append(InputGroup((f"{a}.wq",), *pre))
            groups.append(InputGroup((f"{a}.wk", f"{a}.wv")))
        else:
            groups.append(InputGroup((f"{a}.wq", f"{a}.wk", f"{a}.wv"), *pre))
    mlp = block.mlp
    src = {"swiglu": "mlp.w3", "relu": "mlp.w1"}.get(mlp.act)  # GELU is not scale-equivariant
    groups.append(InputGroup(("mlp.w2",), src, "rows" if src else None))
    groups.append(InputGroup(("mlp.w1", "mlp.w3") if mlp.w3 is not None else ("mlp.w1",),
                             *(("norm2", "norm") if block.pre else (None, None))))
    return groups


def _float(block, name) -> bool:
    try:
        return type(block.get_submodule(name)) is Linear
    except AttributeError:
        return False


def _plan(block, stats: dict) -> list:
    """[(InputGroup, foldable)] covering every float linear of the block that has statistics: a group is foldable when
    all its members and its fold target are float Linears (a member swapped for something else would be changed by a
    fold without its columns being scaled); leftovers (e.g. the thin linears of a factored weight) come alone."""
    out, seen = [], set()
    for g in input_groups(block):
        names = tuple(n for n in g.names if n in stats and _float(block, n))
        if not names:
            continue
        whole = len(names) == len(g.names)
        foldable = whole and g.kind is not None and (g.kind == "norm" or _float(block, g.fold))
        out.append((InputGroup(names, g.fold, g.kind, g.heads) if foldable else InputGroup(names), foldable))
        seen.update(names)
    out += [(InputGroup((n,)), False) for n in stats if n not in seen and _float(block, n)]
    return out


@torch.no_grad()
def fold_scale_(block, group: InputGroup, s: torch.Tensor):
    """Make the group's linears read x / s and hold W diag(s): the producing norm's weight and bias (or the producing
    linear's output rows and bias) are divided by s and each linear's input columns multiplied by s, so the block
    computes the same function. Returns the block."""
    if group.kind not in ("norm", "rows"):
        raise ValueError(f"group {group.names} has nothing to fold into (kind {group.kind!r})")
    s = s.detach().float()
    src = block.get_submodule(group.fold)
    s_src = s  # (K,): one divisor per produced channel
    if group.kind == "norm" and not isinstance(src, Norm):
        raise TypeError(f"{group.fold} must be a Norm, got {type(src).__name__}")
    if group.kind == "rows" and type(src) is not Linear:
        raise TypeError(f"{group.fold} must be a float Linear, got {type(src).__name__}")
    if group.kind == "rows" and group.heads is not None:
        H, Hkv, Dh = group.heads
        g = s.reshape(Hkv, H // Hkv, Dh)  # (Hkv, rep, Dh): head h reads key/value head h // rep
        if not torch.equal(g, g[:, :1].expand_as(g)):
            raise ValueError("s must be equal across the query heads that share a key/value head (GQA)")
        s_src = g[:, 0].reshape(Hkv * Dh)  # (Hkv * Dh,): one per wv output row
    src.weight.div_((s_src[:, None] if group.kind == "rows" else s_src).to(src.weight.dtype))  # rows: (N, 1)
    if src.bias is not None:
        src.bias.div_(s_src.to(src.bias.dtype))
    for name in group.names:
        lin = block.get_submodule(name)
        lin.weight.mul_(s[None, :].to(lin.weight.dtype))
    return block


# ----------------------------------------------------------------------------------------------------------------------
# quantized modules from codes
def _module(codes, scale, zero, bits, group_size, bias, activations=False, smooth=None):
    """Int8Linear / W8A8Linear (optionally with a smoothing divisor) / Int4Linear / W4A8Linear holding the given
    codes."""
    dtype = bias.dtype if bias is not None else torch.float32
    b = bias.detach() if bias is not None else None
    if bits == 4:
        return (W4A8Linear if activations else Int4Linear).from_codes(codes, scale, zero, group_size, b)
    cls = W8A8Linear if activations else Int8Linear
    kw = {"smooth": True} if smooth is not None else {}
    m = cls(codes.shape[0], codes.shape[1], bias is not None, dtype, **kw)
    m.weight.copy_(codes)
    m.scale.copy_(scale)
    if b is not None:
        m.bias.copy_(b)
    if smooth is not None:
        m.smooth.copy_(smooth)
    return m


def _swap(block, names, make):
    """Split the stacked quantization of `names` (rows in order) into one module per linear."""
    start = 0
    for name in names:
        lin = block.get_submodule(name)
        n = lin.weight.shape[0]
        _set(block, name, make(slice(start, start + n), lin).to(lin.weight.device))
        start += n


def _stack(block, names):
    return torch.cat([block.get_submodule(n).weight.detach().float() for n in names])  # (sum N, K)


# ----------------------------------------------------------------------------------------------------------------------
# quantization-aware training
class _FakeQuant(torch.autograd.Function):
    """Forward: dequant(quant(w)) with parameters from the current w. Backward: the straight-through estimator
    (the gradient reaches w unchanged; with min/max parameters no weight is ever outside the range to be clipped)."""

    @staticmethod
    def forward(ctx, w, bits, group_size, symmetric, float_zero):
        return dequant(*rtn(w, bits, group_size, symmetric, float_zero), bits, group_size).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None


def fake_quantize(w, bits: int = 4, group_size: int = 128, symmetric: bool = False, float_zero: bool = False):
    """dequant(quant(w)) whose gradient is the identity (straight-through)."""
    return _FakeQuant.apply(w, bits, group_size, symmetric, float_zero)


class FakeQuantLinear(Linear):
    """A Linear whose forward uses the fake-quantized weight; it shares the original Parameters, so optimizers and
    state dicts see the float weight (a saved prepared model loads as the float model)."""

    def __init__(self, lin: Linear, bits: int, group_size: int, symmetric: bool = False, float_zero: bool = False):
        nn.Module.__init__(self)
        self.weight, self.bias, self.init_std = lin.weight, lin.bias, lin.init_std
        self.bits, self.group_size, self.symmetric, self.float_zero = bits, group_size, symmetric, float_zero

    def forward(self, x):
        w = fake_quantize(self.weight, self.bits, self.group_size, self.symmetric, self.float_zero)
        return ops.linear(x, w, self.bias)

    def to_quantized(self):
        """The real Int8Linear / Int4Linear with the grid this layer fakes."""
        codes, scale, zero = rtn(self.weight, self.bits, self.group_size, self.symmetric, self.float_zero)
        return _module(codes, scale, zero, self.bits, self.group_size, self.bias).to(self.weight.device)

    def extra_repr(self):
        return f"{super().extra_repr()}, bits={self.bits}, group_size={self.group_size}"


def prepare_qat_(model, bits: int = 4, group_size: int = 128, symmetric: bool = False, float_zero: bool = False):
    """Swap every float Linear for a FakeQuantLinear. Returns the model."""
    _check_scheme(bits, group_size, symmetric, float_zero)
    for name, lin in _float_linears(model):
        _set(model, name, FakeQuantLinear(lin, bits, group_size, symmetric, float_zero))
    return model


@torch.no_grad()
def convert_qat_(model):
    """Swap every FakeQuantLinear for its real quantized module. Returns the model."""
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]:
        _set(model, name, m.to_quantized())
    return model


def _qat_loss(model, batch, teacher):
    arch = model.config.arch
    if arch == "decoder":
        (ids,) = batch
        logits = model(ids[:, :-1])  # (B, T-1, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
    if arch == "encoder-decoder":
        src, tgt = batch
        logits = model(src, tgt[:, :-1])  # (B, T-1, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), tgt[:, 1:].flatten())
    with torch.no_grad():
        target = teacher(*batch)  # (B, T, C)
    return F.mse_loss(model(*batch).float(), target.float())


def qat_finetune(model, calib, steps: int = 100, lr: float = 1e-5, batch_size: int = 8, seed: int = 0,
                 teacher=None, weight_decay: float = 0.0, grad_clip: float = 1.0) -> list:
    """A short fine-tune of (a prepared) model on the calibration rows: AdamW over every parameter, random batches of
    `batch_size` rows, next-token cross-entropy (decoders, encoder-decoders with calib = (src, tgt)); encoders match
    `teacher`'s hidden states (mean squared error). Returns the losses."""
    parts = check_calib(model, calib)
    if model.config.arch == "encoder" and teacher is None:
        raise ValueError("qat_finetune on an encoder needs teacher= (the float model) to match its hidden states")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if parts[0].shape[1] < 2:
        raise ValueError("calib rows need at least 2 tokens for a next-token loss")
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.train()
    losses = []
    try:
        for _ in range(steps):
            rows = torch.randint(0, parts[0].shape[0], (min(batch_size, parts[0].shape[0]),), generator=gen)
            loss = _qat_loss(model, [p[rows].to(device) for p in parts], teacher)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        model.train(was_training)
    return losses


# ----------------------------------------------------------------------------------------------------------------------
# the verb
def _float_linears(model):
    return [(n, m) for n, m in model.named_modules() if type(m) is Linear]


def _check_scheme(bits, group_size, symmetric, float_zero):
    if bits not in (8, 4) or isinstance(bits, bool):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    if bits == 4 and (not isinstance(group_size, int) or group_size <= 0 or group_size % 2):
        raise ValueError(f"group_size must be a positive even int, got {group_size!r}")
    if float_zero and (symmetric or bits == 8):
        raise ValueError("float_zero=True needs an asymmetric int4 grid (bits=4, symmetric=False)")


def _check_number(name, value, lo, hi, kind=float, hi_open=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or isinstance(value, int))
    if not ok or not (lo <= value and (value < hi if hi_open else value <= hi)):
        raise ValueError(f"{name} must be a{'n int' if kind is int else ' number'} in [{lo}, {hi}"
                         f"{')' if hi_open else ']'}, got {value!r}")


@torch.no_grad()
def quantize_(model, bits: int = 8, group_size: int = 128, method: str = "rtn", calib=None,
              activations: bool = False, *, symmetric: bool = False, float_zero: bool = False,
              act_order: bool = False, percdamp: float = 0.01, blocksize: int = 128, n_grid: int = 20,
              clip: bool = True, alpha: float = 0.5, steps: int = 100, lr: float = 1e-5, batch_size: int = 8,
              seed: int = 0, progress: bool = False, head: bool = False, dtype: str | None = None):
    """Quantize every float Linear of the model's blocks in place and return the model; head=True also the output
    head (int8 per output row, whatever `bits`; a tied embedding keeps its float copy for the lookup).

    bits=8: int8 per output channel (symmetric); with activations=True, W8A8 (method "rtn" or "smoothquant").
    bits=4: int4 per group of `group_size` inputs, asymmetric unless symmetric=True (float_zero: unrounded zero point);
    with activations=True, W4A8 (methods "rtn", "gptq", "awq"; prefill on the int8 tensor cores, decode weight-only).
    method: "rtn" | "gptq" (act_order, percdamp, blocksize, clip, n_grid) | "awq" (n_grid, clip) |
    "smoothquant" (alpha) | "qat" (steps, lr, batch_size, seed); every method but "rtn" needs calib, token ids (N, T)
    (a pair (src, tgt) for encoder-decoders). batch_size is also the calibration batch of the block-by-block methods.
    clip (GPTQ and AWQ): each group's range from `awq_clip`'s search instead of its min..max; on SmolLM2-135M at
    group 128 it took GPTQ from +25.5% to +13.2% perplexity (RTN: +32.8%; benchmarks/compression.py).
    dtype="fp8": e4m3 weights (per output channel) and e4m3 activations (per token, at run time), method "rtn";
    `bits` and `group_size` do not apply. On CUDA sm_89+ the product runs on the fp8 tensor cores."""
    if dtype is not None:
        if dtype != "fp8":
            raise ValueError(f"dtype must be None or 'fp8', got {dtype!r}")
        if method != "rtn" or activations:
            raise ValueError("dtype='fp8' quantizes weights and activations by RTN: leave method and activations")
        if head and isinstance(model.lm_head, nn.Module):
            raise ValueError("head=True: the output head is already quantized")
        targets = _float_linears(model)
        if not targets:
            raise ValueError("the model has no float Linear layers to quantize (already quantized?)")
        for name, lin in targets:
            _set(model, name, FP8Linear.from_weight(lin.weight, lin.bias).to(lin.weight.device))
        return _quantize_head_(model) if head else model
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    _check_scheme(bits, group_size, symmetric, float_zero)
    if activations and bits == 4 and (method not in ("rtn", "gptq", "awq") or not w4a8_mm.supports_group(group_size)):
        raise ValueError("activations=True with bits=4 (W4A8) takes method 'rtn', 'gptq' or 'awq' and a power-of-two "
                         f"group_size >= 32; got {method!r}, group_size={group_size!r}")
    if activations and bits == 8 and method not in ("rtn", "smoothquant"):
        raise ValueError(f"activations=True (W8A8) works with method 'rtn' or 'smoothquant', not {method!r}")
    if method == "smoothquant" and not activations:
        raise ValueError("method='smoothquant' is for W8A8: pass bits=8, activations=True")
    _check_number("percdamp", percdamp, 0.0, 1.0)
    _check_number("blocksize", blocksize, 1, 1 << 20, int)
    _check_number("n_grid", n_grid, 1, 1000, int)
    _check_number("alpha", alpha, 0.0, 1.0)
    _check_number("steps", steps, 0, 1 << 30, int)
    _check_number("batch_size", batch_size, 1, 1 << 20, int)
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if method in DATA_METHODS:
        if calib is None:
            raise ValueError(f"method={method!r} needs calibration data: pass calib= token ids (N, T)"
                             + (" as a pair (input_ids, decoder_input_ids)"
                                if model.config.arch == "encoder-decoder" else ""))
        check_calib(model, calib)
    if head and isinstance(model.lm_head, nn.Module):
        raise ValueError("head=True: the output head is already quantized")
    targets = _float_linears(model)
    if not targets:
        raise ValueError("the model has no float Linear layers to quantize (already quantized?)")
    scheme = dict(bits=bits, group_size=group_size, symmetric=symmetric, float_zero=float_zero)
    if method == "qat":
        teacher = copy.deepcopy(model).eval() if model.config.arch == "encoder" else None
        prepare_qat_(model, **scheme)
        with torch.enable_grad():
            model.qat_losses = qat_finetune(model, calib, steps, lr, batch_size, seed, teacher)
        convert_qat_(model)
        return _quantize_head_(model) if head else model
    opts = dict(percdamp=percdamp, blocksize=blocksize, act_order=act_order, n_grid=n_grid, clip=clip, alpha=alpha,
                activations=activations)
    if method in ("gptq", "awq", "smoothquant"):
        fn = {"gptq": _gptq_block, "awq": _awq_block, "smoothquant": _smoothquant_block}[method]
        blockwise(model, calib, lambda block, stats: fn(block, stats, scheme, opts), batch_size,
                  hessian=method != "smoothquant", progress=progress)
    for name, lin in _float_linears(model):  # rtn, and any float linear outside the blocks
        codes, scale, zero = rtn(lin.weight, **scheme)
        q = _module(codes, scale, zero, bits, group_size, lin.bias, activations)
        _set(model, name, q.to(lin.weight.device))
    return _quantize_head_(model) if head else model


def _quantize_head_(model):
    """The output head (lm_head, or the tied embedding) as an Int8Linear in lm_head's place."""
    w = model.lm_head if model.lm_head is not None else model.wte  # (V, C)
    codes, scale, zero = rtn(w, bits=8)
    _set(model, "lm_head", _module(codes, scale, zero, 8, -1, None).to(w.device))
    return model


def _gptq_block(block, stats, scheme, opts):
    for group, _ in _plan(block, stats):
        codes, scale, zero = gptq(_stack(block, group.names), stats[group.names[0]].hessian, **scheme,
                                  percdamp=opts["percdamp"], blocksize=opts["blocksize"], act_order=opts["act_order"],
                                  clip=opts["clip"], n_grid=opts["n_grid"])
        _swap(block, group.names,
              lambda rows, lin: _module(codes[rows], scale[rows], zero[rows], scheme["bits"], scheme["group_size"],
                                        lin.bias, opts["activations"]))


def _awq_block(block, stats, scheme, opts):
    plan = _plan(block, stats)
    scales = {}
    for group, foldable in plan:  # 1. search and fold, row-folded groups first (input_groups' order)
        if foldable:
            s, _, _ = awq_search(_stack(block, group.names), stats[group.names[0]], **scheme, n_grid=opts["n_grid"],
                                 heads=group.heads)
            fold_scale_(block, group, s)
            scales[group.names] = s
    for group, _ in plan:  # 2. clip search and quantize the scaled weights
        st = stats[group.names[0]]
        h = (st.hessian if st.hessian is not None else st.sq_norm).float() / st.n
        s = scales.get(group.names)
        if s is not None:  # the weight is W diag(s) and its input x / s: H becomes diag(1/s) H diag(1/s)
            h = h / (s[:, None] * s[None, :]) if h.dim() == 2 else h / (s * s)
        W = _stack(block, group.names)
        ratio = awq_clip(W, h, **scheme, n_grid=opts["n_grid"]) if opts["clip"] else None
        codes, scale, zero = rtn(W, **scheme, clip=ratio)
        _swap(block, group.names,
              lambda rows, lin: _module(codes[rows], scale[rows], zero[rows], scheme["bits"], scheme["group_size"],
                                        lin.bias, opts["activations"]))


def _smoothquant_block(block, stats, scheme, opts):
    plan = _plan(block, stats)
    smooth = {}
    for group, foldable in plan:  # fold where possible, else keep s as the module's run-time divisor
        W = _stack(block, group.names)
        s = smoothquant_scale(W, stats[group.names[0]].absmax, opts["alpha"], group.heads)
        if foldable:
            fold_scale_(block, group, s)
        else:
            smooth[group.names] = s
    for group, _ in plan:
        s = smooth.get(group.names)
        W = _stack(block, group.names)
        W = W * s[None, :] if s is not None else W
        codes, scale, zero = rtn(W, 8)
        _swap(block, group.names,
              lambda rows, lin: _module(codes[rows], scale[rows], zero[rows], 8, -1, lin.bias, activations=True,
                                        smooth=s))
