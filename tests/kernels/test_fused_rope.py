"""Tests of the fused rotary embedding (kernels/fused_rope.py): forward and backward against the fp64 reference on
ragged shapes (odd T, a head dim whose half is not a power of two, per-batch position tables, the strided (B, T, H,
Dh) view the model passes), for each dtype; bad input rejected. The interpreter runs the kernel without a GPU."""
import pytest
import torch
from helpers import assert_close
from kernel_inputs import DEV, gen, needs_triton

from tinyformer.kernels import fused_rope as rp, reference

# dtypes with (atol, rtol): one rounding of the output to that precision, doubled
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 2e-3), (torch.bfloat16, 1.6e-2, 1.6e-2)]


def _tables(Bt, T, Dh, g):
    pos = torch.randint(0, 500, (Bt, T), generator=g).float()
    inv = 10000.0 ** (-torch.arange(0, Dh, 2).float() / Dh)
    ang = pos[..., None] * inv  # (Bt, T, Dh/2)
    ang = torch.cat((ang, ang), -1)[:, None]  # (Bt, 1, T, Dh)
    return ang.cos(), ang.sin()


@needs_triton
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("B, H, T, Dh, Bt, strided", [(2, 3, 37, 64, 1, False), (1, 2, 5, 24, 1, True),
                                                       (3, 1, 20, 16, 3, True)])
def test_rope_forward_backward(B, H, T, Dh, Bt, strided, dtype, atol, rtol):
    g = gen(B * T + Dh)
    if strided:  # (B, T, H, Dh) -> (B, H, T, Dh) view, as attention's heads are
        x = torch.randn(B, T, H, Dh, generator=g).to(dtype).transpose(1, 2)
    else:
        x = torch.randn(B, H, T, Dh, generator=g).to(dtype)
    cos, sin = _tables(Bt, T, Dh, g)
    dy = torch.randn(B, H, T, Dh, generator=g).to(dtype)
    xk = x.to(DEV).detach().requires_grad_()
    y = rp.rope(xk, cos.to(DEV), sin.to(DEV))
    y.backward(dy.to(DEV))
    xr = x.detach().double().requires_grad_()
    yr = reference.rope(xr, cos.double(), sin.double())
    yr.backward(dy.double())
    assert y.dtype == dtype and y.shape == (B, H, T, Dh)
    assert_close(y, yr, atol=atol, rtol=rtol, name="y")
    assert_close(xk.grad, xr.grad, atol=atol, rtol=rtol, name="dx")


def test_rope_rejects_bad_input():
    x = torch.randn(1, 2, 5, 8)
    cos, sin = torch.ones(1, 1, 5, 8), torch.zeros(1, 1, 5, 8)
    with pytest.raises(ValueError, match="Dh even"):
        rp.rope(torch.randn(1, 2, 5, 7), cos, sin)
    with pytest.raises(ValueError, match="cos must be"):
        rp.rope(x, cos[:, :, :4], sin)
    with pytest.raises(TypeError, match="sin must be float32"):
        rp.rope(x, cos, sin.double())
