"""Tests of the fused RMSNorm (kernels/fused_rms_norm.py): forward and backward (dx, dweight) against the fp64
reference on ragged shapes for each dtype, with the error at most about twice plain torch's at the same precision;
dweight summed over several programs' partials; bad input rejected. The interpreter runs the kernels without a GPU."""
import pytest
import torch
from helpers import assert_close
from kernel_inputs import DEV, gen, needs_triton

from tinyformer.kernels import fused_rms_norm as rn, reference

# dtypes with (atol, rtol): plain torch's rounding at that precision, doubled
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 4e-3, 4e-3), (torch.bfloat16, 3e-2, 3e-2)]


@needs_triton
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [(5, 123), (2, 7, 96), (1, 1, 300)])
def test_rms_norm_forward_backward(shape, dtype, atol, rtol):
    g = gen(sum(shape))
    x = (torch.randn(*shape, generator=g) * 2).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype)
    dy = torch.randn(*shape, generator=g).to(dtype)
    xk, wk = x.to(DEV).clone().requires_grad_(), w.to(DEV).clone().requires_grad_()
    y = rn.rms_norm(xk, wk, 1e-6)
    y.backward(dy.to(DEV))
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    yr = reference.rms_norm(xr, wr, 1e-6)
    yr.backward(dy.double())
    assert y.dtype == dtype and y.shape == shape
    assert_close(y, yr, atol=atol, rtol=rtol, name="y")
    assert_close(xk.grad, xr.grad, atol=atol, rtol=rtol, name="dx")
    rows = x.numel() // shape[-1]
    assert_close(wk.grad, wr.grad, atol=atol * rows ** 0.5 * 4, rtol=rtol, name="dw")  # a sum over the rows


def test_rms_norm_rejects_bad_input():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="weight must have shape"):
        rn.rms_norm(x, torch.ones(7))
    with pytest.raises(TypeError, match="weight must have x's dtype"):
        rn.rms_norm(x, torch.ones(8, dtype=torch.float16))
    with pytest.raises(TypeError, match="x must be"):
        rn.rms_norm(x.long(), torch.ones(8))
