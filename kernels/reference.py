"""Pure-torch references of tinyformer's kernels: the explicit math, one function per kernel.

These are what the Triton kernels are tested against, what the benchmarks compare with, and what runs where neither
Triton nor a torch fast path (`cpu.py`) applies. Signatures match the ops in `tinyformer.kernels` (docs/API.md).
The argument checks shared by the references, the launchers and the CPU paths live here too: each function validates
its arguments, so a wrong shape is a ValueError/TypeError naming the argument, never a silent broadcast.

References:
- Attention: Vaswani et al. 2017, "Attention Is All You Need" (softmax(QK^T * scale) V); grouped-query heads from
  Ainslie et al. 2023 (GQA); bottom-right causal alignment as in FlashAttention-2 (Dao 2023). Packed sequences
  (documents confined to themselves) take flash-attn's `cu_seqlens` convention (flash_attn_varlen_func: cumulative
  offsets of the documents in the flattened tokens).
- int8: absmax int8 with per-row activation and per-channel weight scales, int32 accumulation (Dettmers et al. 2022,
  "LLM.int8()"); dynamic per-token activation quantization (Xiao et al. 2023, "SmoothQuant").
- int4 layout: two 4-bit codes per byte, low nibble = even column, asymmetric group-wise quantization as in GPTQ
  (Frantar et al. 2022) / AWQ (Lin et al. 2023).

Legend: B batch, Hq query heads, Hkv key/value heads, Tq query length, Tk key length, D head dim,
M rows of activations, N output features, K input features, G group size.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ----------------------------------------------------------------------------------------------------------------------
# argument checks shared by the references and the Triton launchers
def _need(cond: bool, msg, exc=ValueError):
    """Raise exc(msg) unless cond. msg is a string or, where it formats shapes or dtypes, a lambda that builds it:
    these checks run on every kernel call (a decode step makes hundreds), so a message is formatted only on failure."""
    if not cond:
        raise exc(msg() if callable(msg) else msg)


KERNEL_HEAD_DIMS = (16, 256)  # head dims the Triton kernel supports; the torch paths take any


def check_attention_args(q, k, v, key_padding_mask=None, kernel: bool = True, cu_seqlens=None):
    """Validate attention inputs; returns (B, Hq, Hkv, Tq, Tk, D). kernel=True also checks the Triton kernel's
    head-dim range (the torch paths accept any head dim). cu_seqlens: see `check_cu_seqlens`."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _need(isinstance(t, torch.Tensor), lambda: f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
        _need(t.dim() == 4, lambda: f"{name} must be 4-D (B, H, T, D), got shape {tuple(t.shape)}")
        _need(t.dtype in FLOAT_DTYPES, lambda: f"{name} must be float32/float16/bfloat16, got {t.dtype}", TypeError)
    _need(k.dtype == q.dtype and v.dtype == q.dtype,
          lambda: f"q, k, v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}", TypeError)
    _need(k.device == q.device and v.device == q.device,
          lambda: f"q, k, v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    B, Hq, Tq, D = q.shape
    _need(k.shape == v.shape,
          lambda: f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    Bk, Hkv, Tk, Dk = k.shape
    _need(Bk == B, lambda: f"k batch {Bk} does not match q batch {B}")
    _need(Dk == D, lambda: f"k head dim {Dk} does not match q head dim {D}")
    lo, hi = KERNEL_HEAD_DIMS
    _need(not kernel or lo <= D <= hi, lambda: f"head dim D must be in {lo}..{hi}, got {D}")
    _need(Hkv >= 1 and Hq % Hkv == 0, lambda: f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv})")
    _need(Tq >= 1 and Tk >= 1, lambda: f"sequence lengths must be >= 1, got Tq={Tq}, Tk={Tk}")
    if key_padding_mask is not None:
        _need(isinstance(key_padding_mask, torch.Tensor), "key_padding_mask must be a torch.Tensor", TypeError)
        _need(key_padding_mask.dtype == torch.bool,
              lambda: f"key_padding_mask must be bool (True = attend), got {key_padding_mask.dtype}", TypeError)
        _need(tuple(key_padding_mask.shape) == (B, Tk),
              lambda: f"key_padding_mask must have shape (B, Tk) = {(B, Tk)}, got {tuple(key_padding_mask.shape)}")
        _need(key_padding_mask.device == q.device,
              lambda: f"key_padding_mask is on {key_padding_mask.device}, q on {q.device}")
    if cu_seqlens is not None:
        _need(key_padding_mask is None, "cu_seqlens and key_padding_mask cannot be combined: a row's padding is its "
                                        "last document in cu_seqlens")
        _need(Tq == Tk, lambda: f"cu_seqlens needs self-attention (Tq == Tk), got Tq={Tq}, Tk={Tk}")
        check_cu_seqlens(cu_seqlens, B, Tq, q.device)
    return B, Hq, Hkv, Tq, Tk, D


_checked_cu: list = [None]  # (weak ref, version, B, T) of the last cu_seqlens that passed: a model's layers share one,
# and on CUDA each value check is a device-to-host copy


def check_cu_seqlens(cu_seqlens, B: int, T: int, device=None):
    """Validate packed-sequence offsets (flash-attn's cu_seqlens): int32/int64, 1-D (n_docs + 1,), starting at 0,
    ending at B * T, non-decreasing, with every row boundary (a multiple of T) among them, so no document crosses
    rows of the (B, T) batch (a row's trailing padding is one more document). Raises ValueError."""
    _need(isinstance(cu_seqlens, torch.Tensor),
          lambda: f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    _need(cu_seqlens.dtype in (torch.int32, torch.int64) and cu_seqlens.dim() == 1 and cu_seqlens.numel() >= 2,
          lambda: f"cu_seqlens must be a 1-D int32/int64 tensor (n_docs + 1,), got {cu_seqlens.dtype} of shape "
                  f"{tuple(cu_seqlens.shape)}")
    _need(device is None or cu_seqlens.device == device,
          lambda: f"cu_seqlens is on {cu_seqlens.device}, q on {device}")
    version = None if cu_seqlens.is_inference() else cu_seqlens._version  # inference tensors have none: no memo
    last = _checked_cu[0]
    if version is not None and last is not None and last[0]() is cu_seqlens and last[1:] == (version, B, T):
        return
    c = cu_seqlens.detach().to("cpu", torch.int64)
    _need(c[0].item() == 0, lambda: f"cu_seqlens must start at 0, got {c[0].item()}")
    _need(c[-1].item() == B * T, lambda: f"cu_seqlens must end at B * T = {B * T}, got {c[-1].item()}")
    _need(bool((c[1:] >= c[:-1]).all()), lambda: f"cu_seqlens must be non-decreasing, got {c.tolist()}")
    rows = torch.arange(0, B * T + 1, T)  # (B + 1,) row boundaries
    missing = rows[~torch.isin(rows, c)]
    _need(missing.numel() == 0, lambda: f"cu_seqlens must hold every row boundary (multiples of T = {T}): a document "
                                        f"cannot cross rows; missing {missing.tolist()}")
    if version is not None:
        _checked_cu[0] = (weakref.ref(cu_seqlens), version, B, T)


def document_ids(cu_seqlens, B: int, T: int):
    """(B, T) int64: the index in cu_seqlens of each token's document (no host sync: a search on the device)."""
    pos = torch.arange(B * T, device=cu_seqlens.device, dtype=cu_seqlens.dtype)  # (B * T,) flat token index
    return (torch.searchsorted(cu_seqlens, pos, right=True) - 1).view(B, T)  # (B * T,) -> (B, T)


def document_mask(cu_seqlens, B: int, T: int, causal: bool):
    """(B, 1, T, T) bool, True = may attend: query and key in one document (and, causal, key j <= query i)."""
    ids = document_ids(cu_seqlens, B, T)
    mask = ids[:, None, :, None] == ids[:, None, None, :]  # (B, 1, T, T)
    if causal:
        mask = mask & torch.ones(T, T, dtype=torch.bool, device=mask.device).tril()
    return mask


def attention_mask(Tq: int, Tk: int, causal: bool, key_padding_mask=None, device=None):
    """Boolean mask (B or 1, 1, Tq, Tk), True = may attend. Causal is bottom-right aligned: query i sees keys
    j <= i + (Tk - Tq), so a decode step (Tq=1) sees the whole cache. Returns None when nothing is masked."""
    mask = None
    if causal:
        i = torch.arange(Tq, device=device)[:, None]
        j = torch.arange(Tk, device=device)[None, :]
        mask = (j <= i + (Tk - Tq))[None, None]  # (1, 1, Tq, Tk)
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, None, :]  # (B, 1, 1, Tk)
        mask = pad if mask is None else mask & pad
    return mask


def attention(q, k, v, causal: bool = False, scale: Optional[float] = None, key_padding_mask=None,
              upcast: bool = True, cu_seqlens=None):
    """softmax(q k^T * scale + mask) v with GQA heads; a query row that may see no key gives 0.

    upcast=True computes in float32 (float64 stays float64) and casts back to q's dtype; upcast=False computes in
    q's own dtype ("plain torch at the same precision", the yardstick for kernel error). cu_seqlens: packed documents
    (`check_cu_seqlens`), each attending only to itself (causal within it, or bidirectional)."""
    B, Hq, Hkv, Tq, Tk, D = check_attention_args(q, k, v, key_padding_mask, kernel=False, cu_seqlens=cu_seqlens)
    scale = D ** -0.5 if scale is None else scale
    dtype = q.dtype
    if upcast and dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    if Hq != Hkv:  # each group of Hq // Hkv query heads shares one k/v head
        k = k.repeat_interleave(Hq // Hkv, dim=1)  # (B, Hq, Tk, D)
        v = v.repeat_interleave(Hq // Hkv, dim=1)  # (B, Hq, Tk, D)
    s = (q @ k.transpose(-2, -1)) * scale  # (B, Hq, Tq, Tk)
    if cu_seqlens is not None:
        mask = document_mask(cu_seqlens, B, Tq, causal)
    else:
        mask = attention_mask(Tq, Tk, causal, key_padding_mask, q.device)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    if mask is not None:  # rows with no visible key: softmax gives NaN; define the output as 0
        p = p.masked_fill(~mask.any(-1, keepdim=True), 0.0)
    return (p @ v).to(dtype)  # (B, Hq, Tq, D)


# ----------------------------------------------------------------------------------------------------------------------
# int8 matmul (W8A8)
def check_int8_matmul_args(a, b, a_scale, b_scale, bias=None, dtype=torch.int8):
    """Validate int8_matmul inputs (and fp8_matmul's: dtype float8_e4m3fn); returns (M, N, K)."""
    for name, t in (("a", a), ("b", b), ("a_scale", a_scale), ("b_scale", b_scale)):
        _need(isinstance(t, torch.Tensor), lambda: f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
    _need(a.dtype == dtype, lambda: f"a must be {str(dtype)[6:]}, got {a.dtype}", TypeError)
    _need(b.dtype == dtype, lambda: f"b must be {str(dtype)[6:]}, got {b.dtype}", TypeError)
    _need(a.dim() == 2, lambda: f"a must be 2-D (M, K), got shape {tuple(a.shape)}")
    _need(b.dim() == 2, lambda: f"b must be 2-D (N, K) (the nn.Linear weight layout), got shape {tuple(b.shape)}")
    M, K = a.shape
    N, Kb = b.shape
    _need(Kb == K, lambda: f"a is (M, K) = {tuple(a.shape)} and b is (N, K) = {tuple(b.shape)}: K differs")
    _need(a_scale.dtype == torch.float32, lambda: f"a_scale must be float32, got {a_scale.dtype}", TypeError)
    _need(b_scale.dtype == torch.float32, lambda: f"b_scale must be float32, got {b_scale.dtype}", TypeError)
    _need(tuple(a_scale.shape) == (M,), lambda: f"a_scale must have shape (M,) = ({M},), got {tuple(a_scale.shape)}")
    _need(tuple(b_scale.shape) == (N,), lambda: f"b_scale must have shape (N,) = ({N},), got {tuple(b_scale.shape)}")
    if bias is not None:
        _need(isinstance(bias, torch.Tensor), "bias must be a torch.Tensor", TypeError)
        _need(tuple(bias.shape) == (N,), lambda: f"bias must have shape (N,) = ({N},), got {tuple(bias.shape)}")
    for name, t in (("b", b), ("a_scale", a_scale), ("b_scale", b_scale), ("bias", bias)):
        if t is not None:
            _need(t.device == a.device, lambda: f"{name} is on {t.device}, a on {a.device}")
    return M, N, K


def check_out_dtype(out_dtype):
    _need(out_dtype in (torch.float32, torch.float16, torch.bfloat16),
          lambda: f"out_dtype must be torch.float32, torch.float16 or torch.bfloat16, got {out_dtype}", TypeError)


def quantize_per_token(x):
    """Dynamic per-token (per-row) symmetric int8 quantization of activations x (..., K): scale = absmax(row) / 127
    (1.0 for an all-zero row), q = clamp(round(x / scale), -127, 127), round half to even. Returns (q int8 (..., K),
    scale float32 (...)). SmoothQuant's dynamic per-token activation scheme; the reference of the fused kernel."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("x must be a float tensor")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., K)")
    xf = x.float()
    scale = xf.abs().amax(dim=-1) / 127.0  # (...)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(xf / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def int8_matmul_int32(a, b):
    """Exact a @ b.T of int8 (M, K) x (N, K) as int64 (no overflow possible for any K that fits in memory)."""
    return a.to(torch.int64) @ b.to(torch.int64).T  # (M, N)


def int8_matmul(a, b, a_scale, b_scale, bias=None, out_dtype=torch.float32):
    """(a @ b.T) * a_scale[:, None] * b_scale[None, :] (+ bias), int accumulation exact."""
    check_int8_matmul_args(a, b, a_scale, b_scale, bias)
    acc = int8_matmul_int32(a, b).to(torch.float32)  # (M, N); exact below 2**24, the int32 range rounds like fp32
    out = acc * a_scale[:, None] * b_scale[None, :]
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(out_dtype)


# ----------------------------------------------------------------------------------------------------------------------
# FP8 (e4m3) matmul with per-row and per-column scales
FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def quantize_fp8(x, dim: int = -1):
    """Symmetric e4m3 quantization with one scale per slice along `dim` reduced: scale = absmax / 448 (1 for an
    all-zero slice), q = (x / scale) rounded to e4m3 (round to nearest even, saturating at 448). x (..., K) with dim=-1
    gives per-row (per-token) scales (...,), the input side; a weight (N, K) likewise gives per-output-channel ones.
    Returns (q float8_e4m3fn, scale float32)."""
    amax = x.detach().abs().amax(dim=dim).to(torch.float32)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (x.to(torch.float32) / scale.unsqueeze(dim)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def fp8_matmul(a, b, a_scale, b_scale, bias=None, out_dtype=torch.bfloat16):
    """(a @ b.T) * a_scale[:, None] * b_scale[None, :] (+ bias) for e4m3 a (M, K) and b (N, K): each product of two
    e4m3 numbers is exact in fp32, the sums are fp32 (as in the tensor cores' fp32 accumulation)."""
    check_int8_matmul_args(a, b, a_scale, b_scale, bias, dtype=torch.float8_e4m3fn)
    check_out_dtype(out_dtype)
    out = (a.to(torch.float32) @ b.to(torch.float32).T) * a_scale[:, None] * b_scale[None, :]  # (M, N)
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(out_dtype)


# ----------------------------------------------------------------------------------------------------------------------
# int8 weight-only matmul (W8A16)
def check_int8_weight_only_args(x, w, w_scale, bias=None):
    """Validate int8_weight_only_matmul inputs; returns (M, N, K)."""
    for name, t in (("x", x), ("w_int8", w), ("w_scale", w_scale)):
        _need(isinstance(t, torch.Tensor), lambda: f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
    _need(x.dtype in (torch.float32, torch.float16, torch.bfloat16),
          lambda: f"x must be float32/float16/bfloat16, got {x.dtype}", TypeError)
    _need(x.dim() == 2, lambda: f"x must be 2-D (M, K), got shape {tuple(x.shape)}")
    _need(w.dtype == torch.int8, lambda: f"w_int8 must be int8, got {w.dtype}", TypeError)
    _need(w.dim() == 2, lambda: f"w_int8 must be 2-D (N, K) (the nn.Linear weight layout), got shape {tuple(w.shape)}")
    M, K = x.shape
    N, Kw = w.shape
    _need(Kw == K, lambda: f"x is (M, K) = {tuple(x.shape)} and w_int8 is (N, K) = {tuple(w.shape)}: K differs")
    _need(w_scale.is_floating_point(), lambda: f"w_scale must be float, got {w_scale.dtype}", TypeError)
    _need(tuple(w_scale.shape) == (N,), lambda: f"w_scale must have shape (N,) = ({N},), got {tuple(w_scale.shape)}")
    if bias is not None:
        _need(isinstance(bias, torch.Tensor) and bias.is_floating_point(), "bias must be a float tensor", TypeError)
        _need(tuple(bias.shape) == (N,), lambda: f"bias must have shape (N,) = ({N},), got {tuple(bias.shape)}")
    for name, t in (("w_int8", w), ("w_scale", w_scale), ("bias", bias)):
        if t is not None:
            _need(t.device == x.device, lambda: f"{name} is on {t.device}, x on {x.device}")
    return M, N, K


def int8_weight_only_matmul(x, w_int8, w_scale, bias=None):
    """Reference of the W8A16 matmul: x @ (w_int8 * w_scale[:, None]).T (+ bias), computed in float32, returned in
    x's dtype."""
    check_int8_weight_only_args(x, w_int8, w_scale, bias)
    w = w_int8.to(torch.float32) * w_scale.to(torch.float32)[:, None]  # (N, K)
    out = x.to(torch.float32) @ w.T  # (M, N)
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(x.dtype)


def int8_weight_only_matmul_backward(dy, w_int8, w_scale):
    """The input gradient of int8_weight_only_matmul for a frozen weight (QLoRA's base): dx = dy (M, N) @
    (w_int8 * w_scale[:, None]) (N, K), computed in float32, returned in dy's dtype."""
    w = w_int8.to(torch.float32) * w_scale.to(torch.float32)[:, None]  # (N, K)
    return (dy.to(torch.float32) @ w).to(dy.dtype)  # (M, K)


# ----------------------------------------------------------------------------------------------------------------------
# int4 weight-only matmul
def pack_int4(q):
    """uint8 codes (N, K) in 0..15 -> uint8 (N, K // 2): byte j holds code 2j (low nibble) and 2j+1 (high nibble)."""
    _need(isinstance(q, torch.Tensor), lambda: f"q must be a torch.Tensor, got {type(q).__name__}", TypeError)
    _need(q.dtype == torch.uint8, lambda: f"q must be uint8, got {q.dtype}", TypeError)
    _need(q.dim() == 2, lambda: f"q must be 2-D (N, K), got shape {tuple(q.shape)}")
    _need(q.shape[1] % 2 == 0, lambda: f"K must be even to pack two codes per byte, got K={q.shape[1]}")
    _need(q.numel() == 0 or int(q.max()) <= 15,
          lambda: f"codes must be in 0..15, got max {int(q.max()) if q.numel() else 0}")
    return q[:, 0::2] | (q[:, 1::2] << 4)  # (N, K // 2)


def unpack_int4(packed):
    """uint8 (N, K // 2) -> uint8 codes (N, K), the inverse of pack_int4."""
    _need(isinstance(packed, torch.Tensor), lambda: f"packed must be a torch.Tensor, got {type(packed).__name__}",
          TypeError)
    _need(packed.dtype == torch.uint8, lambda: f"packed must be uint8, got {packed.dtype}", TypeError)
    _need(packed.dim() == 2, lambda: f"packed must be 2-D (N, K // 2), got shape {tuple(packed.shape)}")
    low, high = packed & 0xF, packed >> 4
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], 2 * packed.shape[1])  # (N, K//2, 2) -> (N, K)


def check_int4_matmul_args(x, w_packed, scales, zeros, group_size, bias=None, x_name="x"):
    """Validate int4_matmul inputs (and w4a8_matmul's, whose int8 activations `x_name` "a" has checked); returns
    (M, N, K)."""
    for name, t in ((x_name, x), ("w_packed", w_packed), ("scales", scales), ("zeros", zeros)):
        _need(isinstance(t, torch.Tensor), lambda: f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
    _need(x_name != "x" or x.dtype in FLOAT_DTYPES, lambda: f"x must be float32/float16/bfloat16, got {x.dtype}",
          TypeError)
    _need(x.dim() == 2, lambda: f"{x_name} must be 2-D (M, K), got shape {tuple(x.shape)}")
    _need(w_packed.dtype == torch.uint8, lambda: f"w_packed must be uint8, got {w_packed.dtype}", TypeError)
    _need(w_packed.dim() == 2, lambda: f"w_packed must be 2-D (N, K // 2), got shape {tuple(w_packed.shape)}")
    M, K = x.shape
    N, K2 = w_packed.shape
    _need(K2 * 2 == K, lambda: f"w_packed is (N, K // 2) = {tuple(w_packed.shape)} but {x_name} has K={K}")
    _need(isinstance(group_size, int) and group_size > 0 and group_size % 2 == 0,
          lambda: f"group_size must be a positive even int, got {group_size!r}")
    _need(K % group_size == 0, lambda: f"K={K} must be a multiple of group_size={group_size}")
    G = K // group_size
    for name, t in (("scales", scales), ("zeros", zeros)):
        _need(t.dtype in FLOAT_DTYPES, lambda: f"{name} must be float, got {t.dtype}", TypeError)
        _need(tuple(t.shape) == (N, G),
              lambda: f"{name} must have shape (N, K // group_size) = {(N, G)}, got {tuple(t.shape)}")
    if bias is not None:
        _need(isinstance(bias, torch.Tensor), "bias must be a torch.Tensor", TypeError)
        _need(tuple(bias.shape) == (N,), lambda: f"bias must have shape (N,) = ({N},), got {tuple(bias.shape)}")
    for name, t in (("w_packed", w_packed), ("scales", scales), ("zeros", zeros), ("bias", bias)):
        if t is not None:
            _need(t.device == x.device, lambda: f"{name} is on {t.device}, {x_name} on {x.device}")
    return M, N, K


def dequantize_int4(w_packed, scales, zeros, group_size):
    """w[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G], in float32, shape (N, K)."""
    q = unpack_int4(w_packed).to(torch.float32)  # (N, K)
    N, K = q.shape
    q = q.view(N, K // group_size, group_size)  # (N, K/G, G)
    w = (q - zeros.float()[..., None]) * scales.float()[..., None]
    return w.reshape(N, K)  # (N, K)


def int4_matmul(x, w_packed, scales, zeros, group_size, bias=None):
    """x @ dequant(w).T (+ bias), computed in float32, returned in x's dtype."""
    check_int4_matmul_args(x, w_packed, scales, zeros, group_size, bias)
    w = dequantize_int4(w_packed, scales, zeros, group_size)
    out = x.to(torch.float32) @ w.T  # (M, N)
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(x.dtype)


def int4_matmul_backward(dy, w_packed, scales, zeros, group_size):
    """The input gradient of int4_matmul for a frozen weight (QLoRA's base): dx = dy (M, N) @ dequant(w) (N, K),
    computed in float32, returned in dy's dtype."""
    w = dequantize_int4(w_packed, scales, zeros, group_size)  # (N, K)
    return (dy.to(torch.float32) @ w).to(dy.dtype)  # (M, K)


# ----------------------------------------------------------------------------------------------------------------------
# W4A8: int4 weights (the int4 layout above) times int8 activations quantized per token
def check_w4a8_matmul_args(a, w_packed, a_scale, scales, zeros, group_size, bias=None):
    """Validate w4a8_matmul inputs; returns (M, N, K)."""
    _need(isinstance(a, torch.Tensor), lambda: f"a must be a torch.Tensor, got {type(a).__name__}", TypeError)
    _need(a.dtype in (torch.int8, torch.float8_e4m3fn), lambda: f"a must be int8 (activations from "
          f"quantize_per_token) or float8_e4m3fn (quantize_fp8), got {a.dtype}", TypeError)
    M, N, K = check_int4_matmul_args(a, w_packed, scales, zeros, group_size, bias, x_name="a")
    _need(isinstance(a_scale, torch.Tensor), "a_scale must be a torch.Tensor", TypeError)
    _need(a_scale.dtype == torch.float32, lambda: f"a_scale must be float32, got {a_scale.dtype}", TypeError)
    _need(tuple(a_scale.shape) == (M,), lambda: f"a_scale must have shape (M,) = ({M},), got {tuple(a_scale.shape)}")
    _need(a_scale.device == a.device, lambda: f"a_scale is on {a_scale.device}, a on {a.device}")
    return M, N, K


def w4a8_matmul(a, w_packed, a_scale, scales, zeros, group_size, bias=None, out_dtype=torch.float32):
    """The exact math of W4A8, with q the codes of w_packed (N, K) and g the groups of group_size columns:

        out[m, n] = a_scale[m] * sum_g scales[n, g] * (sum_{k in g} a[m, k] q[n, k] - zeros[n, g] sum_{k in g} a[m, k])
                    (+ bias[n])

    which is (a * a_scale[:, None]) @ dequant(w).T, the integer group sums grouped so that a kernel computes them on
    integer tensor cores (codes 0..15 are exact in int8, and in e4m3 for float8_e4m3fn activations) and applies each
    group's scale and zero point once to them. Here every sum is exact (int8: integers below 2^53; e4m3: multiples of
    2^-9 below 2^40, in fp64) and the rest is fp64, rounded once to out_dtype (float64 keeps it unrounded, for
    tests)."""
    M, N, K = check_w4a8_matmul_args(a, w_packed, a_scale, scales, zeros, group_size, bias)
    _need(out_dtype in FLOAT_DTYPES, lambda: f"out_dtype must be a float dtype, got {out_dtype}", TypeError)
    n_g = K // group_size
    q = unpack_int4(w_packed).to(torch.float64).view(N, n_g, group_size)  # (N, K/G, G)
    a64 = a.to(torch.float64).view(M, n_g, group_size)  # (M, K/G, G)
    s, z = scales.to(torch.float64), zeros.to(torch.float64)  # (N, K/G)
    out = torch.zeros(M, N, dtype=torch.float64, device=a.device)
    for g in range(n_g):  # one group at a time: (M, N) of memory, not (K/G, M, N)
        dots = a64[:, g] @ q[:, g].T  # (M, G) @ (G, N) -> (M, N), exact (integers for int8 activations)
        rows = a64[:, g].sum(-1, keepdim=True)  # (M, 1), exact
        out += s[:, g] * (dots - z[:, g] * rows)
    out *= a_scale.to(torch.float64)[:, None]  # (M, N)
    if bias is not None:
        out = out + bias.to(torch.float64)
    return out.to(out_dtype)


# ----------------------------------------------------------------------------------------------------------------------
# training ops: RMSNorm, SwiGLU, rotary embedding, linear + cross-entropy
def rms_norm(x, weight, eps: float = 1e-6):
    """x / sqrt(mean(x^2) + eps) over the last dim in float32, rounded to x's dtype, times weight (Zhang & Sennrich
    2019; the rounding of Llama's reference implementation)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def layer_norm(x, weight, bias=None, eps: float = 1e-5):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dim, biased variance (Ba et al. 2016), computed in
    float32 (float64 stays float64) and rounded once to x's dtype: torch's F.layer_norm rule."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)  # biased variance, as LayerNorm defines it
    y = (xf - mean) * torch.rsqrt(var + eps) * weight.to(xf.dtype)
    if bias is not None:
        y = y + bias.to(xf.dtype)
    return y.to(x.dtype)


def swiglu(gate, up):
    """silu(gate) * up, each rounded to the inputs' dtype as torch's eager ops do (Shazeer 2020)."""
    return torch.nn.functional.silu(gate) * up


def rope(x, cos, sin):
    """Rotate the pairs (x[i], x[i + Dh/2]) of x (B, H, T, Dh) by the angles in cos, sin (B or 1, 1, T, Dh):
    x * cos + rotate_half(x) * sin, with rotate_half(x) = (-x[Dh/2:], x[:Dh/2]); in float32 whatever x's dtype
    (Su et al. 2021, in Hugging Face's "rotate half" layout)."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)  # (B, H, T, Dh/2) each
    return (xf * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


def linear_cross_entropy(h, weight, target, ignore_index: int = -100):
    """Mean cross-entropy of the logits h @ weight.T (computed in fp32) against target, over the targets that are not
    ignore_index. h (N, C), weight (V, C), target (N,) int64."""
    logits = h.float() @ weight.float().T  # (N, V)
    return torch.nn.functional.cross_entropy(logits, target, ignore_index=ignore_index)
