"""Tests of the fused SwiGLU (kernels/fused_swiglu.py): forward and backward against the fp64 reference on ragged
shapes for each dtype (error about twice plain torch's at that precision), and bad input rejected. The interpreter
runs the kernels without a GPU."""
import pytest
import torch
from helpers import assert_close
from kernel_inputs import DEV, gen, needs_triton

from tinyformer.kernels import fused_swiglu as sw, reference

# dtypes with (atol, rtol): plain torch's rounding at that precision (two roundings in the forward), doubled
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 4e-3, 4e-3), (torch.bfloat16, 3e-2, 3e-2)]


@needs_triton
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [(5, 123), (2, 7, 300), (1,)])
def test_swiglu_forward_backward(shape, dtype, atol, rtol):
    g = gen(sum(shape))
    gate, up, dh = (torch.randn(*shape, generator=g) * 3).to(dtype), torch.randn(*shape, generator=g).to(dtype), \
        torch.randn(*shape, generator=g).to(dtype)
    gk, uk = gate.to(DEV).clone().requires_grad_(), up.to(DEV).clone().requires_grad_()
    h = sw.swiglu(gk, uk)
    h.backward(dh.to(DEV))
    gr, ur = gate.double().requires_grad_(), up.double().requires_grad_()
    hr = reference.swiglu(gr, ur)
    hr.backward(dh.double())
    assert h.dtype == dtype and h.shape == shape
    assert_close(h, hr, atol=atol, rtol=rtol, name="h")
    assert_close(gk.grad, gr.grad, atol=atol, rtol=rtol, name="dgate")
    assert_close(uk.grad, ur.grad, atol=atol, rtol=rtol, name="dup")


def test_swiglu_rejects_bad_input():
    with pytest.raises(ValueError, match="up must match"):
        sw.swiglu(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(TypeError, match="gate must be"):
        sw.swiglu(torch.ones(3, dtype=torch.int32), torch.ones(3, dtype=torch.int32))
