"""Tests of the int8 weight-only (W8A16) matmul (kernels/int8_wo_mm.py): every activation dtype against the fp32
reference on ragged shapes, decode (split-K) and prefill paths, and bad input rejected before any launch. Tolerances
per activation dtype (kernel_inputs.ACT_DTYPES), scaled by |x| @ |w|^T. The interpreter runs the kernel without a GPU
(tests/conftest.py)."""
import pytest
import torch
from helpers import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_inputs import ACT_DTYPES, DEV, gen, magnitude, needs_triton, rand_int8

from tinyformer.kernels import int8_wo_mm, reference

FAST = settings(max_examples=80, deadline=None, derandomize=True)  # interpreter: ~10-100 ms per kernel call


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
    got = int8_wo_mm.int8_weight_only_matmul(x, w, w_scale, bias_t)
    want = reference.int8_weight_only_matmul(x, w, w_scale, bias_t)
    assert got.dtype == dtype and got.shape == (M, N)
    w_deq = w.float() * w_scale[:, None]
    assert_close(got, want, atol=atol * magnitude(x, w_deq) + 1e-6, rtol=rtol, name=f"int8 weight-only {dtype}")


@needs_triton
def test_decode_shapes_split_k():
    p = int8_wo_mm.plan(3, 70, 256, device=DEV)
    assert p["kind"] == "wo_decode" and p["splits"] > 1 and p["config"].block_m == 16
    assert int8_wo_mm.plan(17, 70, 256, device=DEV)["kind"] == "wo"


def test_int8_weight_only_bad_input_raises_before_launch(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a kernel was launched")
    monkeypatch.setattr(int8_wo_mm, "launch", refuse)
    x, w, s = torch.randn(3, 16), rand_int8(5, 16), torch.rand(5)
    with pytest.raises(TypeError, match="w_int8 must be int8"):
        int8_wo_mm.int8_weight_only_matmul(x, w.to(torch.uint8), s)
    with pytest.raises(ValueError, match="K differs"):
        int8_wo_mm.int8_weight_only_matmul(torch.randn(3, 17), w, s)
    with pytest.raises(ValueError, match="w_scale must have shape"):
        int8_wo_mm.int8_weight_only_matmul(x, w, torch.rand(4))
    with pytest.raises(TypeError, match="x must be float"):
        int8_wo_mm.int8_weight_only_matmul(x.long(), w, s)
    with pytest.raises(ValueError, match="bias must have shape"):
        int8_wo_mm.int8_weight_only_matmul(x, w, s, torch.rand(4))
