"""Tests of the fused per-token activation quantizer (kernels/per_token_quant.py): bit-equal to its reference
(`reference.quantize_per_token`: IEEE divisions, round half to even) on ragged rows of every float dtype, exact ties,
and bad input rejected before any launch. The interpreter runs the kernel without a GPU (tests/conftest.py)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_inputs import DEV, gen, needs_triton

from tinyformer.kernels import per_token_quant, reference

FAST = settings(max_examples=80, deadline=None, derandomize=True)  # interpreter: ~10-100 ms per kernel call


@needs_triton
def test_quantize_per_token_rounds_half_to_even():
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 126.5, -127.0]])  # absmax 127: scale 1, exact ties
    q, s = per_token_quant.quantize_per_token(x.to(DEV))
    assert s.item() == 1.0
    assert q.cpu().tolist() == [[127, 0, 2, 2, 0, -2, 126, -127]]
    q, s = reference.quantize_per_token(x)
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, 126, -127]]


@needs_triton
@FAST
@given(shape=st.sampled_from([(1, 1), (1, 130), (7, 77), (33, 256), (2, 3, 100), (100, 1000)]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), scale=st.sampled_from([1e-3, 1.0, 30.0]),
       seed=st.integers(0, 2 ** 16))
def test_quantize_per_token_kernel_equals_reference(shape, dtype, scale, seed):
    x = (torch.randn(shape, generator=gen(seed)) * scale).to(dtype)
    x.view(-1, shape[-1])[0] = 0  # an all-zero token: scale 1, codes 0
    q, s = per_token_quant.quantize_per_token(x.to(DEV))
    q_ref, s_ref = reference.quantize_per_token(x)
    assert q.shape == x.shape and s.shape == x.shape[:-1] and q.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.equal(s.cpu(), s_ref)  # IEEE division both sides
    assert torch.equal(q.cpu(), q_ref)  # round half to even both sides


@pytest.mark.parametrize("x, exc, match", [
    (torch.ones(3, 16, dtype=torch.int8), TypeError, "x must be float"),
    ([[1.0]], TypeError, "x must be a torch.Tensor"),
    (torch.ones(3, 0), ValueError, "K >= 1"),
    (torch.tensor(1.0), ValueError, "K >= 1"),
])
def test_quantize_per_token_bad_input_raises_before_launch(monkeypatch, x, exc, match):
    def refuse(*args, **kwargs):
        raise AssertionError("a kernel was launched")
    monkeypatch.setattr(per_token_quant, "_launch_quantize_per_token", refuse)
    with pytest.raises(exc, match=match):
        per_token_quant.quantize_per_token(x)
