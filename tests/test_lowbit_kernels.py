"""Tests of the low-bit kernels: quantization primitives (kernels/quant.py), int8 W8A8 / weight-only and the per-token
quantizer (kernels/int8_mm.py), int4 weight-only (kernels/int4_mm.py), and their CPU fast paths.

On a machine without a GPU the Triton kernels run under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
so problems stay <= 256 and shapes are ragged (not multiples of the 16/64-wide tiles), so a missing mask shows up as
a wrong number (the interpreter does not catch out-of-bounds loads). Integer accumulation is compared EXACTLY with
the int64 reference; float results against the fp32 reference with tolerances per dtype, next to the dtype in each
parametrize list, scaled by |x| @ |w|^T (the size of the rounding error a dot product can have). Quantization quality
is an SQNR in dB (torchao's compute_error). The CPU fast paths (torch._int_mm, torch's packed int8/int4 kernels) are
called directly, and one subprocess checks the public dispatch without the interpreter.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyformer.kernels import int4_mm, int8_mm, quant, reference

INTERPRETED = int8_mm.INTERPRET and int4_mm.INTERPRET
DEV = "cuda" if torch.cuda.is_available() else "cpu"
FAST = settings(max_examples=80, deadline=None, derandomize=True)  # interpreter: ~10-100 ms per kernel call
QUICK = settings(max_examples=60, deadline=None, derandomize=True)  # pure torch
GROUPS = [32, 64, 128]

needs_triton = pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRETED),
                                  reason="Triton kernels need CUDA or TRITON_INTERPRET=1 set before import")


def assert_close(out, ref, rtol, atol, name="out"):
    """|out - ref| <= rtol * |ref| + atol elementwise (atol may be a tensor); on failure report the count and the first
    mismatching indices with their values."""
    out, ref = out.double(), ref.double()
    atol = atol.double() if isinstance(atol, torch.Tensor) else torch.as_tensor(atol, dtype=torch.float64)
    err = (out - ref).abs()
    bad = err > rtol * ref.abs() + atol
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        detail = ", ".join(f"{tuple(i)}: got {out[tuple(i)].item():.6g} want {ref[tuple(i)].item():.6g}" for i in idx)
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.numel()} mismatch (max err {err.max().item():.3g});"
                             f" first: {detail}")


def rand_int8(*shape, gen=None):
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=gen)


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ======================================================================================================================
# quant.py: choose_qparams / quantize / dequantize
# ======================================================================================================================
GRANULARITIES = [None, -1, 2, 32, 64, 128]  # per tensor, per channel, per group


@QUICK
@given(N=st.integers(1, 12), groups=st.integers(1, 3), bits=st.sampled_from([8, 4]),
       group_size=st.sampled_from(GRANULARITIES), symmetric=st.booleans(), shift=st.sampled_from([0.0, 2.0, -3.0]),
       short=st.integers(0, 127), seed=st.integers(0, 2 ** 16))
def test_quant_round_trip_within_half_a_step(N, groups, bits, group_size, symmetric, shift, short, seed):
    G = group_size if group_size and group_size > 0 else 32
    K = groups * G - short % G  # short > 0: a ragged last group of G - short columns
    w = torch.randn(N, K, generator=gen(seed)) + shift  # shifted: asymmetric ranges
    scale, zero = quant.choose_qparams(w, bits, group_size, symmetric)
    expected_shape = () if group_size is None else (N,) if group_size == -1 else (N, groups)
    assert scale.shape == expected_shape and zero.shape == expected_shape
    assert (scale > 0).all() and torch.equal(zero, zero.round())  # integer zero points (0.0 is exact)
    q = quant.quantize(w, scale, zero, bits, group_size)
    qmin, qmax, dtype = quant.qrange(bits)
    assert q.dtype == dtype and q.shape == w.shape
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    if symmetric and bits == 8:
        assert int(q.min()) >= -127 and torch.equal(zero, torch.zeros_like(zero))  # symmetric int8 grid
    w_hat = quant.dequantize(q, scale, zero, group_size)
    # |w - w_hat| <= scale / 2 element by element (plus fp32 rounding of the division and product)
    step = quant.dequantize(torch.ones_like(q), scale, torch.zeros_like(zero), group_size)  # scale per element
    assert_close(w_hat, w, 0, step * (0.5 + 1e-5), "round trip")


@pytest.mark.parametrize("bits,symmetric", [(8, True), (8, False), (4, True), (4, False)])
@pytest.mark.parametrize("group_size", [None, -1, 32])
def test_quant_all_zero_groups_are_exact(bits, symmetric, group_size):
    w = torch.randn(4, 64)
    w[1] = 0.0  # an all-zero row (and so all-zero groups)
    scale, zero = quant.choose_qparams(w, bits, group_size, symmetric)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    w_hat = quant.dequantize(quant.quantize(w, scale, zero, bits, group_size), scale, zero, group_size)
    assert torch.isfinite(w_hat).all()
    assert torch.equal(w_hat[1], torch.zeros(64))
    wz = torch.zeros(3, 64)
    scale, zero = quant.choose_qparams(wz, bits, group_size, symmetric)
    assert torch.equal(quant.dequantize(quant.quantize(wz, scale, zero, bits, group_size), scale, zero, group_size),
                       wz)


def test_quant_symmetric_int4_uses_the_full_grid():
    w = torch.tensor([[-1.0, -0.5, 0.0, 0.5, 1.0, 0.25] * 6])  # (1, 36)
    scale, zero = quant.choose_qparams(w[:, :32], 4, 32, symmetric=True)
    assert zero.item() == 8.0 and scale.item() == pytest.approx(2 / 15)
    q = quant.quantize(w[:, :32], scale, zero, 4, 32)
    # -absmax -> -7.5 steps -> code 0 or 1 (the fp32 rounding of 2/15 decides the tie); +absmax clamps at 15
    assert int(q.min()) <= 1 and int(q.max()) == 15


@pytest.mark.parametrize("bits,group_size,symmetric,floor_db", [
    (8, -1, True, 38.0),  # int8 per channel: ~40 dB on a gaussian
    (8, None, True, 30.0),  # int8 per tensor: the outliers of 256K samples set the step
    (4, 128, False, 18.0),  # int4 asymmetric group 128 (GPTQ/AWQ layout): ~20 dB
    (4, 32, False, 20.0),  # smaller groups, better
    (4, 128, True, 17.0),
])
def test_quant_sqnr_floors(bits, group_size, symmetric, floor_db):
    w = torch.randn(256, 1024, generator=gen(0))
    scale, zero = quant.choose_qparams(w, bits, group_size, symmetric)
    db = quant.sqnr(w, quant.dequantize(quant.quantize(w, scale, zero, bits, group_size), scale, zero, group_size))
    print(f"SQNR int{bits} group={group_size} symmetric={symmetric}: {db:.2f} dB")
    assert db > floor_db


@pytest.mark.parametrize("symmetric", [False, True])
def test_quant_ragged_last_group_is_quantized_on_its_own_columns(symmetric):
    w = torch.randn(6, 100) + 1.0  # groups of 64: one of 64 columns, one of 36
    w[:, 99] = 9.0  # the row's last value: the padding copies it, which must not widen that group's range
    scale, zero = quant.choose_qparams(w, 4, 64, symmetric)
    assert scale.shape == (6, 2) and quant.n_groups(100, 64) == 2
    for cols, g in ((slice(0, 64), 0), (slice(64, 100), 1)):
        s, z = quant.choose_qparams(w[:, cols], 4, -1, symmetric)  # per row over exactly the group's columns
        assert torch.equal(scale[:, g], s) and torch.equal(zero[:, g], z)
    q = quant.quantize(w, scale, zero, 4, 64)
    assert q.shape == (6, 100)
    assert torch.equal(q[:, 64:], quant.quantize(w[:, 64:], scale[:, 1:], zero[:, 1:], 4, 36))
    assert quant.dequantize(q, scale, zero, 64).shape == (6, 100)


def test_quant_bad_arguments():
    w = torch.randn(4, 96)
    with pytest.raises(ValueError, match="group_size must be"):
        quant.choose_qparams(w, 4, 0)
    with pytest.raises(ValueError, match="bits"):
        quant.choose_qparams(w, 9)
    with pytest.raises(TypeError):
        quant.choose_qparams(w.to(torch.int8), 8)
    scale, zero = quant.choose_qparams(w, 4, 32)
    with pytest.raises(ValueError, match="shape"):
        quant.quantize(w, scale[:, :2], zero, 4, 32)
    with pytest.raises(ValueError, match="2-D"):
        quant.choose_qparams(torch.randn(2, 3, 32), 8, -1)


@QUICK
@given(M=st.integers(1, 9), K=st.integers(1, 300), scale=st.sampled_from([1e-3, 1.0, 50.0]),
       seed=st.integers(0, 2 ** 16))
def test_quantize_per_token_reference(M, K, scale, seed):
    x = torch.randn(M, K, generator=gen(seed)) * scale
    x[0] = 0.0  # an all-zero token
    q, s = quant.quantize_per_token_int8(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (M,)
    assert int(q.min()) >= -127 and s[0] == 1.0 and not q[0].any()
    assert_close(q.float() * s[:, None], x, 0, s[:, None] * (0.5 + 1e-5), "per-token round trip")


# ======================================================================================================================
# pack_int4 / unpack_int4
# ======================================================================================================================
@QUICK
@given(N=st.integers(1, 9), K2=st.integers(0, 40), seed=st.integers(0, 2 ** 16))  # N = 0: reference.unpack_int4 fails
def test_pack_unpack_round_trip(N, K2, seed):
    q = torch.randint(0, 16, (N, 2 * K2), dtype=torch.uint8, generator=gen(seed))
    packed = int4_mm.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (N, K2)
    assert torch.equal(int4_mm.unpack_int4(packed), q)
    if N and K2:  # the layout API.md fixes: column 2j in the low nibble, 2j + 1 in the high nibble
        assert int(packed[0, 0]) == int(q[0, 0]) | (int(q[0, 1]) << 4)
    b = torch.randint(0, 256, (N, K2), dtype=torch.uint8, generator=gen(seed + 1))
    assert torch.equal(int4_mm.pack_int4(int4_mm.unpack_int4(b)), b)


def test_pack_int4_is_the_reference_function():
    assert int4_mm.pack_int4 is reference.pack_int4 and int4_mm.unpack_int4 is reference.unpack_int4


@pytest.mark.parametrize("bad,exc,match", [
    (torch.tensor([[0, 16]], dtype=torch.uint8), ValueError, "0..15"),
    (torch.zeros(2, 3, dtype=torch.uint8), ValueError, "even"),
    (torch.zeros(2, 4, dtype=torch.int32), TypeError, "uint8"),
    (torch.zeros(8, dtype=torch.uint8), ValueError, "2-D"),
])
def test_pack_int4_rejects(bad, exc, match):
    with pytest.raises(exc, match=match):
        int4_mm.pack_int4(bad)


# ======================================================================================================================
# int8: W8A8 kernel, per-token quantizer, weight-only kernel (Triton; the interpreter on CPU)
# ======================================================================================================================
ragged = st.sampled_from([1, 2, 7, 16, 17, 33, 70, 100, 130])


@needs_triton
@FAST
@given(M=ragged, N=ragged, K=st.sampled_from([1, 15, 64, 100, 130, 200]), seed=st.integers(0, 2 ** 16))
def test_int8_accumulation_is_exact(M, N, K, seed):
    g = gen(seed)
    a, b = rand_int8(M, K, gen=g).to(DEV), rand_int8(N, K, gen=g).to(DEV)
    acc = int8_mm.int8_matmul_int32(a, b)
    assert acc.dtype == torch.int32
    assert torch.equal(acc.long().cpu(), reference.int8_matmul_int32(a, b).cpu())
    # unit scales, |acc| <= 200 * 2**14 < 2**24: the scaled fp32 output is the exact integer too
    ones_m, ones_n = torch.ones(M, device=DEV), torch.ones(N, device=DEV)
    assert torch.equal(int8_mm.int8_matmul(a, b, ones_m, ones_n).cpu(), reference.int8_matmul_int32(a, b).float().cpu())


@needs_triton
@FAST
@given(M=ragged, N=ragged, K=st.sampled_from([16, 77, 130, 256]), bias=st.booleans(),
       out=st.sampled_from([(torch.float32, 1e-6), (torch.float16, 1e-3), (torch.bfloat16, 8e-3)]),
       seed=st.integers(0, 2 ** 16))
def test_int8_matmul_scaled_epilogue(M, N, K, bias, out, seed):
    out_dtype, rtol = out  # rtol: fp32 ~ FMA contraction on a GPU; fp16 / bf16: one rounding of the output (1 ulp)
    g = gen(seed)
    a, b = rand_int8(M, K, gen=g).to(DEV), rand_int8(N, K, gen=g).to(DEV)
    a_scale = (torch.rand(M, generator=g) * 1e-2 + 1e-3).to(DEV)
    b_scale = (torch.rand(N, generator=g) * 1e-2 + 1e-3).to(DEV)
    bias_t = torch.randn(N, generator=g).to(DEV) if bias else None
    got = int8_mm.int8_matmul(a, b, a_scale, b_scale, bias_t, out_dtype=out_dtype)
    want = reference.int8_matmul(a, b, a_scale, b_scale, bias_t, out_dtype=out_dtype)
    assert got.dtype == out_dtype and got.shape == (M, N)
    assert_close(got.cpu(), want.cpu(), rtol, 1e-6, f"int8_matmul {out_dtype}")


def test_quantize_per_token_rounds_half_to_even():
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 126.5, -127.0]])  # absmax 127: scale 1, exact ties
    if DEV == "cuda" or INTERPRETED:
        q, s = int8_mm.quantize_per_token(x.to(DEV))
        assert s.item() == 1.0
        assert q.cpu().tolist() == [[127, 0, 2, 2, 0, -2, 126, -127]]
    q, s = quant.quantize_per_token_int8(x)
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, 126, -127]]


@needs_triton
@FAST
@given(shape=st.sampled_from([(1, 1), (1, 130), (7, 77), (33, 256), (2, 3, 100), (100, 1000)]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), scale=st.sampled_from([1e-3, 1.0, 30.0]),
       seed=st.integers(0, 2 ** 16))
def test_quantize_per_token_kernel_equals_reference(shape, dtype, scale, seed):
    x = (torch.randn(shape, generator=gen(seed)) * scale).to(dtype)
    x.view(-1, shape[-1])[0] = 0  # an all-zero token: scale 1, codes 0
    q, s = int8_mm.quantize_per_token(x.to(DEV))
    q_ref, s_ref = quant.quantize_per_token_int8(x)
    assert q.shape == x.shape and s.shape == x.shape[:-1] and q.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.equal(s.cpu(), s_ref)  # IEEE division both sides
    assert torch.equal(q.cpu(), q_ref)  # round half to even both sides


# activation dtypes with (rtol, atol relative to |x| @ |w|^T): fp32 accumulation-order rounding; fp16 / bf16: the
# weight rounded to the dot dtype plus one rounding of the output
ACT_DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 2e-3), (torch.bfloat16, 1.6e-2, 1e-2)]


def _magnitude(x, w):
    return (x.float().abs() @ w.float().abs().T).cpu()  # (M, N): scale of the rounding error of each dot product


@needs_triton
@FAST
@given(M=st.sampled_from([1, 3, 16, 17, 100]), N=st.sampled_from([1, 7, 70, 130]),
       K=st.sampled_from([1, 77, 130, 256]), act=st.sampled_from(ACT_DTYPES), bias=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_int8_weight_only_matmul(M, N, K, act, bias, seed):
    dtype, rtol, atol = act
    g = gen(seed)
    x = torch.randn(M, K, generator=g).to(dtype).to(DEV)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g).to(DEV)
    w_scale = (torch.rand(N, generator=g) * 1e-2 + 1e-3).to(DEV)
    bias_t = torch.randn(N, generator=g).to(dtype).to(DEV) if bias else None
    got = int8_mm.int8_weight_only_matmul(x, w, w_scale, bias_t)
    want = int8_mm.int8_weight_only_matmul_reference(x, w, w_scale, bias_t)
    assert got.dtype == dtype and got.shape == (M, N)
    w_deq = w.float() * w_scale[:, None]
    assert_close(got.cpu(), want.cpu(), rtol, atol * _magnitude(x, w_deq) + 1e-6, f"int8 weight-only {dtype}")


@needs_triton
def test_int8_w8a8_pipeline_tracks_fp32():
    """quantize_per_token -> int8_matmul against the fp32 matmul: the W8A8 error of SmoothQuant-style inference."""
    g = gen(1)
    x, w = torch.randn(20, 256, generator=g), torch.randn(70, 256, generator=g)
    w_scale, _ = quant.choose_qparams(w, 8, -1, symmetric=True)
    w_q = quant.quantize(w, w_scale, torch.zeros_like(w_scale), 8, -1)
    x_q, x_scale = int8_mm.quantize_per_token(x.to(DEV))
    y = int8_mm.int8_matmul(x_q, w_q.to(DEV), x_scale, w_scale.to(DEV))
    db = quant.sqnr(x @ w.T, y.cpu())
    assert db > 30, f"W8A8 SQNR {db:.1f} dB"


# ======================================================================================================================
# int4 weight-only (Triton; the interpreter on CPU)
# ======================================================================================================================
def make_int4(N, K, G, g, zero_float=False, dtype=torch.float32):
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=g)
    scales = (torch.rand(N, K // G, generator=g) * 0.05 + 0.005).to(dtype)
    zeros = torch.randint(0, 16, (N, K // G), generator=g).float()
    if zero_float:
        zeros = zeros + torch.rand(N, K // G, generator=g)
    return reference.pack_int4(q), scales, zeros.to(dtype)


@needs_triton
@FAST
@given(M=st.sampled_from([1, 2, 7, 16, 17, 100]), N=st.sampled_from([1, 7, 70, 130]), G=st.sampled_from(GROUPS),
       groups=st.integers(1, 4), act=st.sampled_from(ACT_DTYPES), bias=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_int4_matmul(M, N, G, groups, act, bias, seed):
    dtype, rtol, atol = act
    K = G * groups
    if M * N * K > 100 * 130 * 256:
        K = G  # keep interpreter cases small
    g = gen(seed)
    w_packed, scales, zeros = make_int4(N, K, G, g, dtype=dtype)
    x = torch.randn(M, K, generator=g).to(dtype)
    bias_t = torch.randn(N, generator=g).to(dtype) if bias else None
    got = int4_mm.int4_matmul(x.to(DEV), w_packed.to(DEV), scales.to(DEV), zeros.to(DEV), G,
                              bias_t.to(DEV) if bias else None)
    assert got.dtype == dtype and got.shape == (M, N)
    w = reference.dequantize_int4(w_packed, scales, zeros, G)  # (N, K) fp32
    want = x.float() @ w.T + (bias_t.float() if bias else 0)  # fp32 reference before the cast to x's dtype
    assert_close(got.cpu(), want, rtol, atol * _magnitude(x, w) + 1e-6, f"int4 {dtype} G={G}")


@needs_triton
@pytest.mark.parametrize("G", [2, 10, 26])  # groups that do not divide the K tile: the gathered scales path
@pytest.mark.parametrize("M", [1, 37])  # decode (split-K) and prefill
def test_int4_matmul_odd_group_sizes(G, M):
    g = gen(G + M)
    N, K = 33, 130
    K = K - K % G
    w_packed, scales, zeros = make_int4(N, K, G, g, zero_float=True)
    x = torch.randn(M, K, generator=g)
    got = int4_mm.int4_matmul(x.to(DEV), w_packed.to(DEV), scales.to(DEV), zeros.to(DEV), G).cpu()
    want = reference.int4_matmul(x, w_packed, scales, zeros, G)
    assert_close(got, want, 1e-5, 1e-5 * _magnitude(x, reference.dequantize_int4(w_packed, scales, zeros, G)))


@needs_triton
def test_int4_decode_path_splits_k_and_matches():
    """M <= 16 takes the 16-row split-K path; the split count is > 1 for K spanning several groups."""
    M, N, K, G = 3, 70, 256, 32
    p = int4_mm.plan(M, N, K, G, device=DEV)
    assert p["kind"] == "i4_decode" and p["splits"] > 1 and p["config"].block_m == 16
    assert int4_mm.plan(100, N, K, G, device=DEV)["kind"] == "i4"
    g = gen(3)
    w_packed, scales, zeros = make_int4(N, K, G, g)
    x = torch.randn(M, K, generator=g)
    got = int4_mm.int4_matmul(x.to(DEV), w_packed.to(DEV), scales.to(DEV), zeros.to(DEV), G).cpu()
    assert_close(got, reference.int4_matmul(x, w_packed, scales, zeros, G), 1e-5, 1e-4)


@needs_triton
@pytest.mark.parametrize("K,G", [(256, 32), (120, 10)])  # whole K tiles (unmasked loads) / a masked, gathered tail
def test_int4_one_row_kernel_splits_k_and_matches(K, G):
    """M = 1 takes the one-row CUDA-core kernel (its own tiles, split-K), with the bias added after the split sum."""
    N = 70
    p = int4_mm.plan(1, N, K, G, device=DEV)
    assert p["kind"] == "i4_gemv" and p["splits"] > 1
    g = gen(K + G)
    w_packed, scales, zeros = make_int4(N, K, G, g, zero_float=True)
    x, bias = torch.randn(1, K, generator=g), torch.randn(N, generator=g)
    got = int4_mm.int4_matmul(x.to(DEV), w_packed.to(DEV), scales.to(DEV), zeros.to(DEV), G, bias.to(DEV)).cpu()
    want = reference.int4_matmul(x, w_packed, scales, zeros, G, bias)
    assert_close(got, want, 1e-5, 1e-5 * _magnitude(x, reference.dequantize_int4(w_packed, scales, zeros, G)))


def test_int4_split_ranges_fit_every_autotune_candidate():
    """The autotuner may pick any candidate, and whole-tile (unmasked) loads must not cross a split's end: K_SPLIT is
    a multiple of every candidate's block_k, not only of the first one's."""
    MC = int8_mm.MatmulConfig
    cands = [MC(1, 64, 64, 4, 2), MC(1, 32, 128, 4, 2), MC(1, 128, 32, 8, 2)]
    for K in (128 * 7, 128 * 33, 4096):
        splits, k_split = int4_mm.int4_splits(1, 70, K, 32, cands, torch.device("cpu"))
        assert splits > 1 and k_split % 128 == 0 and (splits - 1) * k_split < K <= splits * k_split


# ======================================================================================================================
# Bad input: a clear ValueError/TypeError before any launch
# ======================================================================================================================
@pytest.fixture
def no_launch(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a kernel was launched")
    monkeypatch.setattr(int8_mm, "launch", refuse)
    monkeypatch.setattr(int4_mm, "launch", refuse)
    monkeypatch.setattr(int8_mm, "_launch_quantize_per_token", refuse)


def _int4_args(M=2, N=4, K=64, G=32):
    w_packed, scales, zeros = make_int4(N, K, G, gen(0))
    return [torch.randn(M, K), w_packed, scales, zeros, G]


INT4_BAD = [
    ("K odd", lambda a: [torch.randn(2, 63)] + a[1:], ValueError, "K // 2"),
    ("K not a multiple of group_size", lambda a: [torch.randn(2, 96), make_int4(4, 96, 32, gen(0))[0]] + a[2:4] + [64],
     ValueError, "multiple of group_size"),
    ("x int", lambda a: [a[0].to(torch.int32)] + a[1:], TypeError, "x must be"),
    ("w_packed int8", lambda a: [a[0], a[1].to(torch.int8)] + a[2:], TypeError, "w_packed must be uint8"),
    ("shapes do not chain", lambda a: [torch.randn(2, 128)] + a[1:], ValueError, "K // 2"),
    ("scales shape", lambda a: a[:2] + [a[2][:, :1]] + a[3:], ValueError, "scales must have shape"),
    ("zeros dtype", lambda a: a[:3] + [a[3].to(torch.int32)] + a[4:], TypeError, "zeros must be float"),
    ("group_size odd", lambda a: a[:4] + [3], ValueError, "group_size"),
]


@pytest.mark.parametrize("case", INT4_BAD, ids=[c[0] for c in INT4_BAD])
def test_int4_bad_input_raises_before_launch(no_launch, case):
    _, mutate, exc, match = case
    with pytest.raises(exc, match=match):
        int4_mm.int4_matmul(*mutate(_int4_args()))
    with pytest.raises(exc, match=match):
        int4_mm.prepack_int4_cpu(*mutate(_int4_args())[1:]).matmul(mutate(_int4_args())[0])


def _int8_args(M=3, N=5, K=16):
    return [rand_int8(M, K), rand_int8(N, K), torch.rand(M), torch.rand(N)]


INT8_BAD = [
    ("a float", lambda a: [a[0].float()] + a[1:], TypeError, "a must be int8"),
    ("b uint8", lambda a: [a[0], a[1].to(torch.uint8)] + a[2:], TypeError, "b must be int8"),
    ("K differs", lambda a: [a[0], rand_int8(5, 17)] + a[2:], ValueError, "K differs"),
    ("a_scale fp16", lambda a: a[:2] + [a[2].half(), a[3]], TypeError, "a_scale must be float32"),
    ("b_scale shape", lambda a: a[:3] + [torch.rand(4)], ValueError, "b_scale must have shape"),
    ("a 3-D", lambda a: [a[0][None]] + a[1:], ValueError, "2-D"),
]


@pytest.mark.parametrize("case", INT8_BAD, ids=[c[0] for c in INT8_BAD])
def test_int8_bad_input_raises_before_launch(no_launch, case):
    _, mutate, exc, match = case
    with pytest.raises(exc, match=match):
        int8_mm.int8_matmul(*mutate(_int8_args()))
    with pytest.raises(exc, match=match):
        int8_mm.int8_matmul_cpu(*mutate(_int8_args()))


def test_int8_other_bad_input_raises_before_launch(no_launch):
    a = _int8_args()
    with pytest.raises(TypeError, match="out_dtype"):
        int8_mm.int8_matmul(*a, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="bias must have shape"):
        int8_mm.int8_matmul(*a, bias=torch.rand(4))
    with pytest.raises(TypeError, match="int8"):
        int8_mm.int8_matmul_int32(a[0].float(), a[1])
    with pytest.raises(TypeError, match="x must be float"):
        int8_mm.quantize_per_token(a[0])
    x, w, s = torch.randn(3, 16), rand_int8(5, 16), torch.rand(5)
    with pytest.raises(TypeError, match="w_int8 must be int8"):
        int8_mm.int8_weight_only_matmul(x, w.to(torch.uint8), s)
    with pytest.raises(ValueError, match="K differs"):
        int8_mm.int8_weight_only_matmul(torch.randn(3, 17), w, s)
    with pytest.raises(ValueError, match="w_scale must have shape"):
        int8_mm.int8_weight_only_matmul(x, w, torch.rand(4))
    with pytest.raises(TypeError, match="x must be float"):
        int8_mm.int8_weight_only_matmul(x.long(), w, s)


# ======================================================================================================================
# CPU fast paths (torch._int_mm, _weight_int8pack_mm, _weight_int4pack_mm_for_cpu), called directly
# ======================================================================================================================
@QUICK
@given(M=st.sampled_from([1, 2, 4, 5, 17, 64]), N=st.sampled_from([1, 7, 70, 128]),
       K=st.sampled_from([1, 8, 16, 130, 256]), seed=st.integers(0, 2 ** 16))
def test_cpu_int_mm_path_is_exact(M, N, K, seed):  # M <= 4: row by row on the weight's view; M > 4: a (K, N) copy
    g = gen(seed)
    a, b = rand_int8(M, K, gen=g), rand_int8(N, K, gen=g)
    assert torch.equal(int8_mm.int8_matmul_int32_cpu(a, b).long(), reference.int8_matmul_int32(a, b))
    a_s, b_s, bias = torch.rand(M, generator=g), torch.rand(N, generator=g), torch.randn(N, generator=g)
    for out_dtype in (torch.float32, torch.bfloat16):  # the reference's epilogue: bit-exact
        assert torch.equal(int8_mm.int8_matmul_cpu(a, b, a_s, b_s, bias, out_dtype),
                           reference.int8_matmul(a, b, a_s, b_s, bias, out_dtype))


# bf16 tolerance: x, the scales and the output are rounded to bf16 (2**-8 relative each). K = 130: the reference
# fallback (torch's packed op crashes on K % 16 != 0); M = 130: the bf16 matmul path for many rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N,K", [(1, 64, 256), (5, 70, 96), (17, 48, 512), (3, 16, 130), (130, 24, 64)])
def test_cpu_int8_weight_only_path(dtype, M, N, K):
    g = gen(M + N + K)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    s = torch.rand(N, generator=g) * 1e-2 + 1e-3
    bias = torch.randn(N, generator=g).to(dtype)
    got = int8_mm.int8_weight_only_matmul_cpu(x, w, s, bias)
    want = int8_mm.int8_weight_only_matmul_reference(x, w, s, bias)
    assert got.dtype == dtype
    assert_close(got, want, 1.6e-2, 1.6e-2 * _magnitude(x, w.float() * s[:, None]), f"cpu int8 wo {dtype}")


def test_cpu_int8_weight_only_many_rows_without_onednn_bf16_runs_in_fp32(monkeypatch):
    """On a CPU without bf16 matmul hardware the many-row path multiplies in fp32 (6x faster there than aten's bf16
    matmul): fp32 activations then keep fp32 accuracy, which the bf16 path (2**-8 relative) would not."""
    monkeypatch.setattr(int8_mm, "onednn_bf16", lambda: False)
    g = gen(7)
    M, N, K = int8_mm.WO_DEQUANT_MIN_M + 2, 24, 64
    x = torch.randn(M, K, generator=g)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    s = torch.rand(N, generator=g) * 1e-2 + 1e-3
    bias = torch.randn(N, generator=g)
    got = int8_mm.int8_weight_only_matmul_cpu(x, w, s, bias)
    want = x.double() @ (w.double() * s.double()[:, None]).T + bias.double()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("G", GROUPS)
@pytest.mark.parametrize("M,N,groups", [(1, 64, 2), (7, 48, 3), (33, 16, 1)])
def test_cpu_int4_prepacked_matches_reference(dtype, G, M, N, groups):
    K = G * groups
    g = gen(M + N + G)
    w_packed, scales, zeros = make_int4(N, K, G, g)
    x = torch.randn(M, K, generator=g).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype)
    pre = int4_mm.prepack_int4_cpu(w_packed, scales, zeros, G)
    assert pre.fast
    got = pre.matmul(x, bias)
    w = reference.dequantize_int4(w_packed, scales, zeros, G)
    assert got.dtype == dtype
    assert_close(got, x.float() @ w.T + bias.float(), 1.6e-2, 1.6e-2 * _magnitude(x, w), f"cpu int4 {dtype}")


def test_cpu_int4_fallback_and_cache():
    g = gen(5)
    w_packed, scales, zeros = make_int4(70, 64, 32, g)  # N = 70: not a multiple of 16, torch's kernel refuses it
    x = torch.randn(3, 64, generator=g)
    pre = int4_mm.prepack_int4_cpu(w_packed, scales, zeros, 32)
    assert not pre.fast
    assert torch.equal(pre.matmul(x), reference.int4_matmul(x, w_packed, scales, zeros, 32))
    w_packed, scales, zeros = make_int4(32, 64, 32, g)
    first = int4_mm._prepacked(w_packed, scales, zeros, 32)
    assert int4_mm._prepacked(w_packed, scales, zeros, 32) is first  # repacked once per weight
    y0 = int4_mm.int4_matmul_cpu(x, w_packed, scales, zeros, 32)
    w_packed.bitwise_xor_(0x11)  # in place: every code changes, the version bumps, the cache repacks
    assert int4_mm._prepacked(w_packed, scales, zeros, 32) is not first
    y1 = int4_mm.int4_matmul_cpu(x, w_packed, scales, zeros, 32)
    want = reference.int4_matmul(x, w_packed, scales, zeros, 32)
    assert not torch.equal(y0, y1)
    assert_close(y1, want, 1.6e-2, 1.6e-2 * _magnitude(x, reference.dequantize_int4(w_packed, scales, zeros, 32)))


def test_public_dispatch_without_the_interpreter():
    """In a process without TRITON_INTERPRET, CPU tensors take the torch fast paths through the public functions."""
    code = textwrap.dedent("""
        import torch
        from tinyformer.kernels import int4_mm, int8_mm, reference
        assert not int8_mm.INTERPRET
        assert int8_mm.plan("w8a8", 1, 64, 64)["backend"] == "torch" and int4_mm.plan(1, 64, 64, 32)["kind"] == "cpu"
        a, b = torch.randint(-128, 128, (5, 64), dtype=torch.int8), torch.randint(-128, 128, (32, 64), dtype=torch.int8)
        sa, sb = torch.rand(5), torch.rand(32)
        assert torch.equal(int8_mm.int8_matmul(a, b, sa, sb), reference.int8_matmul(a, b, sa, sb))
        q, s = int8_mm.quantize_per_token(torch.randn(4, 64))
        assert q.dtype == torch.int8
        x = torch.randn(2, 64)
        y = int8_mm.int8_weight_only_matmul(x, b, sb)
        want = int8_mm.int8_weight_only_matmul_reference(x, b, sb)
        assert (y - want).abs().max() <= 2e-2 * want.abs().max(), "int8 weight-only"
        qq = torch.randint(0, 16, (32, 64), dtype=torch.uint8)
        wp, sc, z = reference.pack_int4(qq), torch.rand(32, 2) * 0.1, torch.randint(0, 16, (32, 2)).float()
        y = int4_mm.int4_matmul(x, wp, sc, z, 32)
        want = reference.int4_matmul(x, wp, sc, z, 32)
        assert (y - want).abs().max() <= 2e-2 * want.abs().max(), "int4"
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


# ======================================================================================================================
# Launch heuristic and AOT specs
# ======================================================================================================================
def test_configs_one_under_the_interpreter_several_on_gpus():
    for kind in ("w8a8", "w8a8_decode", "wo", "wo_decode", "quant", "i4", "i4_decode"):
        assert len(int8_mm.matmul_configs(kind, None)) == 1
        for arch in (80, 86, 90):
            cands = int8_mm.matmul_configs(kind, arch)
            assert cands and all(c.block_k >= 16 or kind == "quant" for c in cands)
    for G in GROUPS:
        assert all(c.block_k <= G for c in int4_mm.int4_configs(1, G, 90))
    with pytest.raises(ValueError):
        int8_mm.matmul_configs("nope", None)


def test_aot_specs_are_complete():
    specs = int8_mm.aot_specs() + int4_mm.aot_specs()
    assert len(specs) >= 20
    names = [s["name"] for s in specs]
    assert len(set(names)) == len(names)
    for s in specs:
        assert {"name", "fn", "signature", "constexprs", "num_warps", "num_stages"} <= set(s)
        arg_names = s["fn"].arg_names
        assert set(s["signature"]) == set(arg_names), s["name"]
        assert all(s["signature"][k] == "constexpr" for k in s["constexprs"]), s["name"]
        assert set(s.get("divisible_by_16", ())) <= set(arg_names) - set(s["constexprs"]), s["name"]


def test_cpu_int4_cache_does_not_keep_weights_alive():
    import gc
    import weakref
    w_packed, scales, zeros = make_int4(32, 64, 32, gen(6))
    int4_mm.int4_matmul_cpu(torch.randn(2, 64), w_packed, scales, zeros, 32)
    assert w_packed in int4_mm._PREPACKED
    n, ref = len(int4_mm._PREPACKED), weakref.ref(w_packed)
    del w_packed
    gc.collect()
    assert ref() is None and len(int4_mm._PREPACKED) == n - 1


@needs_triton
def test_autotuned_launch_path(monkeypatch):
    """The GPU launch path (triton.autotune over several candidates) under the interpreter, timed by a CPU clock: every
    candidate runs and the tuned results are right. Split-K decode tunes only candidates of its block_k."""
    import time

    def cpu_bench(fn, quantiles=None):
        t0 = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t0) * 1e3
        return [ms, ms, ms] if quantiles else ms

    table = {"w8a8": [int8_mm.MatmulConfig(64, 64, 64, 4, 1), int8_mm.MatmulConfig(32, 64, 32, 4, 1)],
             "wo": [int8_mm.MatmulConfig(64, 64, 64, 4, 1), int8_mm.MatmulConfig(32, 32, 64, 4, 1)],
             "i4": [int8_mm.MatmulConfig(64, 64, 64, 4, 1), int8_mm.MatmulConfig(32, 32, 64, 4, 1)],
             "i4_decode": [int8_mm.MatmulConfig(16, 64, 64, 4, 1), int8_mm.MatmulConfig(16, 32, 64, 4, 1)]}
    configs = lambda kind, arch: table.get(kind, [int8_mm._INTERPRET_TABLE[kind]])  # noqa: E731
    monkeypatch.setattr(int8_mm, "matmul_configs", configs)
    monkeypatch.setattr(int4_mm, "matmul_configs", configs)
    monkeypatch.setattr(int8_mm, "AUTOTUNE_DO_BENCH", cpu_bench)
    g = gen(9)
    a, b = rand_int8(40, 100, gen=g), rand_int8(70, 100, gen=g)
    assert torch.equal(int8_mm.int8_matmul_int32(a.to(DEV), b.to(DEV)).long().cpu(), reference.int8_matmul_int32(a, b))
    x, w, s = torch.randn(40, 100, generator=g), torch.randint(-127, 128, (70, 100), dtype=torch.int8), torch.rand(70)
    got = int8_mm.int8_weight_only_matmul(x.to(DEV), w.to(DEV), s.to(DEV)).cpu()
    assert_close(got, int8_mm.int8_weight_only_matmul_reference(x, w, s), 1e-5,
                 1e-5 * _magnitude(x, w.float() * s[:, None]))
    for M in (40, 3):
        w_packed, scales, zeros = make_int4(70, 128, 64, g)
        x = torch.randn(M, 128, generator=g)
        got = int4_mm.int4_matmul(x.to(DEV), w_packed.to(DEV), scales.to(DEV), zeros.to(DEV), 64).cpu()
        w4 = reference.dequantize_int4(w_packed, scales, zeros, 64)
        assert_close(got, reference.int4_matmul(x, w_packed, scales, zeros, 64), 1e-5, 1e-5 * _magnitude(x, w4))
    assert int8_mm.autotuned.cache_info().currsize >= 3
