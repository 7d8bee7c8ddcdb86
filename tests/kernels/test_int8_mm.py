"""Tests of the W8A8 int8 matmul (kernels/int8_mm.py): exact int32 accumulation and the scaled epilogue against the
int64 reference on ragged shapes, the quantize -> matmul pipeline against fp32, which path a shape takes, and bad input
rejected before any launch.

Without a GPU the kernel runs under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 first), so
problems stay <= 256 and shapes are ragged (the interpreter does not catch out-of-bounds loads: a missing mask shows
up as a wrong number). Integer accumulation is compared exactly; scaled outputs with a tolerance per output dtype.
"""
import pytest
import torch
from helpers import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_inputs import DEV, gen, needs_triton, rand_int8

from tinyformer.kernels import int8_mm, quant, quantize_per_token, reference

FAST = settings(max_examples=80, deadline=None, derandomize=True)  # interpreter: ~10-100 ms per kernel call
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
    assert_close(got, want, atol=1e-6, rtol=rtol, name=f"int8_matmul {out_dtype}")


@needs_triton
def test_int8_w8a8_pipeline_tracks_fp32():
    """quantize_per_token -> int8_matmul against the fp32 matmul: the W8A8 error of SmoothQuant-style inference."""
    g = gen(1)
    x, w = torch.randn(20, 256, generator=g), torch.randn(70, 256, generator=g)
    w_scale, _ = quant.choose_qparams(w, 8, -1, symmetric=True)
    w_q = quant.quantize(w, w_scale, torch.zeros_like(w_scale), 8, -1)
    x_q, x_scale = quantize_per_token(x.to(DEV))
    y = int8_mm.int8_matmul(x_q, w_q.to(DEV), x_scale, w_scale.to(DEV))
    db = quant.sqnr(x @ w.T, y.cpu())
    assert db > 30, f"W8A8 SQNR {db:.1f} dB"


@needs_triton
def test_plan_takes_the_decode_table_up_to_16_rows():
    assert int8_mm.plan(16, 70, 130, device=DEV)["kind"] == "w8a8_decode"
    assert int8_mm.plan(17, 70, 130, device=DEV)["kind"] == "w8a8"


# ----------------------------------------------------------------------------------------------------------------------
# bad input: a clear ValueError/TypeError before any launch (and the CPU path checks the same)
@pytest.fixture
def no_launch(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a kernel was launched")
    monkeypatch.setattr(int8_mm, "launch", refuse)


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
    from tinyformer.kernels import cpu
    _, mutate, exc, match = case
    with pytest.raises(exc, match=match):
        int8_mm.int8_matmul(*mutate(_int8_args()))
    with pytest.raises(exc, match=match):
        cpu.int8_matmul_cpu(*mutate(_int8_args()))


def test_int8_other_bad_input_raises_before_launch(no_launch):
    a = _int8_args()
    with pytest.raises(TypeError, match="out_dtype"):
        int8_mm.int8_matmul(*a, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="bias must have shape"):
        int8_mm.int8_matmul(*a, bias=torch.rand(4))
    with pytest.raises(TypeError, match="bias must be a float"):
        int8_mm.int8_matmul(*a, bias=torch.ones(5, dtype=torch.int32))
    with pytest.raises(TypeError, match="int8"):
        int8_mm.int8_matmul_int32(a[0].float(), a[1])
