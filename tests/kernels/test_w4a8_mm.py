"""Tests of the W4A8 matmul (kernels/w4a8_mm.py): int4 weights times per-token int8 activations against the exact
reference (reference.w4a8_matmul: integer group sums, fp64 scaling) on ragged M, N and K for every output dtype, with
and without bias; the same with e4m3 activations, which take the reference below sm_89; groups larger than the kernel's span (flushed several times a group); the reference against the
float product it stands for; the quantize -> W4A8 pipeline against fp32 and W8A8; ops.int4_linear's W4A8 dispatch
for prefill only; bad input rejected before any launch. Every shipped GPU config runs once on a ragged shape in
test_configs.py. The interpreter runs the kernel without a GPU (tests/conftest.py)."""
import pytest
import torch
from helpers import assert_close
from kernel_inputs import DEV, gen, magnitude, make_int4, needs_triton, rand_int8

from tinyformer.kernels import quant, quantize_per_token, reference, w4a8_mm

# output dtypes with the relative tolerance of one rounding of the output; the fp32 scaling of exact integer sums is
# within ~1e-6 of the fp64 reference (atol below, relative to the magnitude of the products)
OUT_DTYPES = [(torch.float32, 1e-5), (torch.float16, 1e-3), (torch.bfloat16, 8e-3)]


def _operands(M, N, K, G, g, scale_dtype=torch.float32):
    a = rand_int8(M, K, gen=g)
    a[a == -128] = -127  # quantize_per_token's range
    a_scale = torch.rand(M, generator=g) * 0.02 + 1e-3
    w_packed, scales, zeros = make_int4(N, K, G, g, zero_float=True, dtype=scale_dtype)
    return a, a_scale, w_packed, scales, zeros


def _check(M, N, K, G, bias, out_dtype, rtol, seed, scale_dtype=torch.float32):
    g = gen(seed)
    a, a_scale, w_packed, scales, zeros = _operands(M, N, K, G, g, scale_dtype)
    bias_t = torch.randn(N, generator=g) if bias else None
    got = w4a8_mm.w4a8_matmul(*(t.to(DEV) for t in (a, w_packed, a_scale, scales, zeros)), G,
                              bias_t.to(DEV) if bias else None, out_dtype=out_dtype)
    assert got.dtype == out_dtype and got.shape == (M, N)
    want = reference.w4a8_matmul(a, w_packed, a_scale, scales, zeros, G, bias_t, out_dtype=torch.float64)
    mag = magnitude(a.float() * a_scale[:, None], reference.dequantize_int4(w_packed, scales, zeros, G))
    assert_close(got, want, atol=2e-6 * mag + 1e-6, rtol=rtol, name=f"w4a8 {out_dtype} M={M} N={N} K={K} G={G}")


@needs_triton
@pytest.mark.parametrize("out_dtype, rtol", OUT_DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("M, N, K, G", [(37, 70, 256, 32), (100, 130, 256, 128), (17, 7, 192, 64),
                                        (3, 33, 128, 64), (1, 70, 64, 64)])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_w4a8_matmul_matches_the_reference(M, N, K, G, bias, out_dtype, rtol):
    """Ragged M and N (partial tiles: rows and columns wrap, the store drops them), several groups and tiles per
    group (G = 128 with 64-wide tiles), prefill and small M."""
    _check(M, N, K, G, bias, out_dtype, rtol, seed=M * N + K + G + bias)


@needs_triton
@pytest.mark.parametrize("G", [256, 512])
def test_w4a8_groups_larger_than_a_span(G):
    """G = 512 > MAX_SPAN: the int32 partial is scaled every 256 columns with the same group's scale and zero (the
    same sum); G = 256: four 64-wide tiles per span. fp16 scales and zeros, as quantized checkpoints hold them."""
    assert w4a8_mm.MAX_SPAN < 512
    _check(20, 40, 2 * G, G, True, torch.float32, 1e-5, seed=G, scale_dtype=torch.float16)


@needs_triton
@pytest.mark.parametrize("out_dtype, rtol", OUT_DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("M, N, K, G", [(37, 70, 256, 32), (100, 130, 256, 128), (17, 7, 512, 512)])
def test_w4a8_with_e4m3_activations_matches_the_reference(M, N, K, G, out_dtype, rtol):
    """e4m3 activations (quantize_fp8 per token): the codes go through the fp8 MMA, the span sums are fp32 of exact
    products, so the kernel is within fp32 rounding of the exact fp64 reference; ragged M and N, a group longer than
    a span (G = 512)."""
    g = gen(M + N + K + G)
    a, a_scale = reference.quantize_fp8(torch.randn(M, K, generator=g) * 3)
    w_packed, scales, zeros = make_int4(N, K, G, g, zero_float=True)
    bias = torch.randn(N, generator=g)
    assert w4a8_mm.plan(M, N, K, G, device=DEV, a_dtype=torch.float8_e4m3fn)["backend"] == "triton"
    got = w4a8_mm.w4a8_matmul(*(t.to(DEV) for t in (a, w_packed, a_scale, scales, zeros)), G, bias.to(DEV),
                              out_dtype=out_dtype)
    assert got.dtype == out_dtype and got.shape == (M, N)
    want = reference.w4a8_matmul(a, w_packed, a_scale, scales, zeros, G, bias, out_dtype=torch.float64)
    mag = magnitude(a.float() * a_scale[:, None], reference.dequantize_int4(w_packed, scales, zeros, G))
    assert_close(got, want, atol=2e-6 * mag + 1e-6, rtol=rtol, name=f"w4a8 e4m3 {out_dtype} M={M} N={N} K={K} G={G}")


def test_e4m3_activations_stay_on_the_reference_below_sm89(monkeypatch):
    """sm_80 and sm_86 have no fp8 tensor cores: e4m3 activations take the reference there, int8 ones the kernel."""
    monkeypatch.setattr(w4a8_mm, "backend_of", lambda t, name: "triton")
    monkeypatch.setattr(w4a8_mm, "arch_of", lambda device: 80)
    a = torch.empty(0, device="meta")
    assert not w4a8_mm._triton_runs(a.to(torch.float8_e4m3fn)) and w4a8_mm._triton_runs(a.to(torch.int8))
    monkeypatch.setattr(w4a8_mm, "arch_of", lambda device: 89)
    assert w4a8_mm._triton_runs(a.to(torch.float8_e4m3fn))


def test_reference_is_the_scaled_float_product():
    """The grouping of the reference is only a regrouping: (a * a_scale) @ dequant(w).T (+ bias) in fp64."""
    g = gen(5)
    M, N, K, G = 9, 11, 96, 32
    a, a_scale, w_packed, scales, zeros = _operands(M, N, K, G, g)
    bias = torch.randn(N, generator=g)
    got = reference.w4a8_matmul(a, w_packed, a_scale, scales, zeros, G, bias, out_dtype=torch.float64)
    q = reference.unpack_int4(w_packed).double().view(N, K // G, G)  # (N, K/G, G) codes
    w = ((q - zeros.double()[..., None]) * scales.double()[..., None]).view(N, K)  # dequant(w) in fp64
    want = (a.double() * a_scale.double()[:, None]) @ w.T + bias.double()
    assert_close(got, want, atol=1e-12, rtol=1e-12, name="w4a8 reference")


@needs_triton
def test_w4a8_pipeline_tracks_fp32():
    """quantize_per_token -> w4a8_matmul against x @ dequant(w).T in fp32: the int8 activations cost what they cost
    in W8A8 (SQNR well above 30 dB), the weight's int4 rounding is not part of this error."""
    g = gen(1)
    x, w = torch.randn(40, 256, generator=g), torch.randn(70, 256, generator=g)
    s4, z4 = quant.choose_qparams(w, 4, 64, symmetric=False)
    w4 = reference.pack_int4(quant.quantize(w, s4, z4, 4, 64))
    a, a_scale = quantize_per_token(x.to(DEV))
    y = w4a8_mm.w4a8_matmul(a, w4.to(DEV), a_scale, s4.to(DEV), z4.to(DEV), 64)
    want = x @ reference.dequantize_int4(w4, s4, z4, 64).T
    db = quant.sqnr(want, y.cpu())
    assert db > 30, f"W4A8 SQNR {db:.1f} dB"


def test_int4_linear_takes_w4a8_for_prefill_only(monkeypatch):
    """ops.int4_linear(activations=True): prefill (M > 16) quantizes x per token and takes W4A8 (its reference on
    the CPU backends); decode rows, groups the kernel does not take and autograd keep the weight-only product."""
    from tinyformer import ops
    g = gen(2)
    N, K, G = 32, 128, 64
    w_packed, scales, zeros = make_int4(N, K, G, g)
    calls = []
    monkeypatch.setattr(reference, "w4a8_matmul",
                        lambda *a, _real=reference.w4a8_matmul, **k: calls.append(a[0].shape) or _real(*a, **k))
    with ops.use_backend("torch"):
        for M in (1, 16, 17, 40):
            x = torch.randn(M, K, generator=g)
            y = ops.int4_linear(x, w_packed, scales, zeros, G, activations=True)
            assert y.shape == (M, N) and y.dtype == x.dtype
            if M > 16:  # W4A8: the reference on the quantized activations
                q, s = quant.quantize_per_token_int8(x)
                assert torch.equal(y, reference.w4a8_matmul(q, w_packed, s, scales, zeros, G, out_dtype=x.dtype))
        assert calls == [(17, K)] * 2 + [(40, K)] * 2  # the dispatch's call, then the test's own
        x = torch.randn(40, K, generator=g, requires_grad=True)
        ops.int4_linear(x, w_packed, scales, zeros, G, activations=True).sum().backward()  # weight-only: has dx
        assert x.grad is not None and len(calls) == 4


# ----------------------------------------------------------------------------------------------------------------------
# bad input: a clear ValueError/TypeError before any launch
def _args():
    a, a_scale, w_packed, scales, zeros = _operands(3, 4, 64, 32, gen(0))
    return [a, w_packed, a_scale, scales, zeros, 32]


W4A8_BAD = [
    ("a float", lambda x: [x[0].float()] + x[1:], TypeError, "a must be int8 .* or float8_e4m3fn"),
    ("K differs", lambda x: [x[0][:, :32]] + x[1:], ValueError, "K // 2"),
    ("a_scale shape", lambda x: x[:2] + [x[2][:2]] + x[3:], ValueError, "a_scale must have shape"),
    ("a_scale dtype", lambda x: x[:2] + [x[2].double()] + x[3:], TypeError, "a_scale must be float32"),
    ("scales shape", lambda x: x[:3] + [x[3][:, :1]] + x[4:], ValueError, "scales must have shape"),
    ("w_packed int8", lambda x: [x[0], x[1].to(torch.int8)] + x[2:], TypeError, "w_packed must be uint8"),
    ("group 16", lambda x: x[:5] + [16], ValueError, "power of two >= 32"),
]


@pytest.mark.parametrize("case", W4A8_BAD, ids=[c[0] for c in W4A8_BAD])
def test_w4a8_bad_input_raises_before_launch(monkeypatch, case):
    def refuse(*args, **kwargs):
        raise AssertionError("a kernel was launched")
    monkeypatch.setattr(w4a8_mm, "launch", refuse)
    _, mutate, exc, match = case
    with pytest.raises(exc, match=match):
        w4a8_mm.w4a8_matmul(*mutate(_args()))


def test_w4a8_linear_runs_w4a8_for_prefill_and_saves_its_scheme():
    """W4A8Linear holds Int4Linear's codes: a decode step gives Int4Linear's output, a prefill the W4A8 product of
    per-token int8 activations; its spec names the scheme, and an empty module built from the spec is a W4A8Linear."""
    from tinyformer import ops
    from tinyformer.qlinear import Int4Linear, W4A8Linear, empty_from_spec
    g = gen(9)
    w, b = torch.randn(24, 96, generator=g), torch.randn(24, generator=g)
    m4, m48 = Int4Linear.from_weight(w, b, group_size=32), W4A8Linear.from_weight(w, b, group_size=32)
    assert torch.equal(m4.weight_packed, m48.weight_packed) and m48.spec() == {"scheme": "w4a8", "group_size": 32}
    assert isinstance(empty_from_spec(m48.spec(), 24, 96, True), W4A8Linear)
    with torch.no_grad(), ops.use_backend("torch"):
        x1, x20 = torch.randn(1, 96, generator=g), torch.randn(20, 96, generator=g)
        assert torch.equal(m48(x1), m4(x1))
        q, s = quant.quantize_per_token_int8(x20)
        want = reference.w4a8_matmul(q, m4.weight_packed, s, m4.scales, m4.zeros, 32, m4.bias)
        assert torch.equal(m48(x20), want)
