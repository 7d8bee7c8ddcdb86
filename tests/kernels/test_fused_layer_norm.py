"""Tests of the fused LayerNorm (kernels/fused_layer_norm.py): forward and backward (dx, dweight, dbias) against the
fp64 reference on ragged shapes (rows not a multiple of the forward's rows per program, D not a power of two) for
each dtype, with and without a bias, the error at most about twice plain torch's at the same precision; dweight and
dbias summed over several programs' partials; the reference is torch's F.layer_norm; bad input rejected. The
interpreter runs the kernels without a GPU."""
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from kernel_inputs import DEV, gen, needs_triton

from tinyformer.kernels import fused_layer_norm as ln, reference

# dtypes with (atol, rtol): plain torch's rounding at that precision, doubled
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 4e-3, 4e-3), (torch.bfloat16, 3e-2, 3e-2)]


@needs_triton
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape", [(5, 123), (2, 7, 96), (1, 1, 300)])
def test_layer_norm_forward_backward(shape, bias, dtype, atol, rtol):
    g = gen(sum(shape) + bias)
    x = (torch.randn(*shape, generator=g) * 2 + 0.5).to(dtype)  # a non-zero mean: the centring matters
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype)
    b = (0.1 * torch.randn(shape[-1], generator=g)).to(dtype) if bias else None
    dy = torch.randn(*shape, generator=g).to(dtype)
    xk, wk = x.to(DEV).clone().requires_grad_(), w.to(DEV).clone().requires_grad_()
    bk = b.to(DEV).clone().requires_grad_() if bias else None
    y = ln.layer_norm(xk, wk, bk, 1e-5)
    y.backward(dy.to(DEV))
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    br = b.double().requires_grad_() if bias else None
    yr = reference.layer_norm(xr, wr, br, 1e-5)
    yr.backward(dy.double())
    assert y.dtype == dtype and y.shape == shape
    assert_close(y, yr, atol=atol, rtol=rtol, name="y")
    assert_close(xk.grad, xr.grad, atol=atol, rtol=rtol, name="dx")
    rows = x.numel() // shape[-1]
    assert_close(wk.grad, wr.grad, atol=atol * rows ** 0.5 * 4, rtol=rtol, name="dw")  # a sum over the rows
    if bias:
        assert_close(bk.grad, br.grad, atol=atol * rows ** 0.5 * 4, rtol=rtol, name="db")


@needs_triton
def test_layer_norm_backward_sums_several_programs():
    """More rows than backward programs (2 under the interpreter, 2 per SM on a GPU) with a ragged last share: the
    partial dweight / dbias of every program are summed once."""
    g = gen(7)
    M, D = 301, 70
    x, w, b = torch.randn(M, D, generator=g), torch.randn(D, generator=g), torch.randn(D, generator=g)
    dy = torch.randn(M, D, generator=g)
    xk, wk, bk = (t.to(DEV).clone().requires_grad_() for t in (x, w, b))
    ln.layer_norm(xk, wk, bk).backward(dy.to(DEV))
    xr, wr, br = (t.double().requires_grad_() for t in (x, w, b))
    reference.layer_norm(xr, wr, br).backward(dy.double())
    for name, got, want in (("dx", xk.grad, xr.grad), ("dw", wk.grad, wr.grad), ("db", bk.grad, br.grad)):
        assert_close(got, want, atol=1e-4, rtol=1e-5, name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_reference_is_torchs(dtype):
    """The reference is F.layer_norm's rule: fp32 statistics and one rounding of the output, and the same gradients."""
    g = gen(3)
    x = (torch.randn(4, 9, 77, generator=g) * 3 + 1).to(dtype).requires_grad_()
    w = torch.randn(77, generator=g).to(dtype).requires_grad_()
    b = torch.randn(77, generator=g).to(dtype).requires_grad_()
    dy = torch.randn(4, 9, 77, generator=g).to(dtype)
    y = reference.layer_norm(x, w, b, 1e-5)
    grads = torch.autograd.grad(y, (x, w, b), dy)
    yt = F.layer_norm(x, (77,), w, b, 1e-5)
    grads_t = torch.autograd.grad(yt, (x, w, b), dy)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the grads are rounded once more, each in its own order
    assert_close(y, yt, atol=tol, rtol=tol, name="y")
    for name, a, e in zip(("dx", "dw", "db"), grads, grads_t):
        assert_close(a, e, atol=tol * 10, rtol=tol, name=name)


def test_layer_norm_rejects_bad_input():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="weight must have shape"):
        ln.layer_norm(x, torch.ones(7))
    with pytest.raises(ValueError, match="bias must have shape"):
        ln.layer_norm(x, torch.ones(8), torch.ones(9))
    with pytest.raises(TypeError, match="weight must have x's dtype"):
        ln.layer_norm(x, torch.ones(8, dtype=torch.float16))
    with pytest.raises(TypeError, match="bias must have x's dtype"):
        ln.layer_norm(x, torch.ones(8), torch.ones(8, dtype=torch.float16))
    with pytest.raises(TypeError, match="x must be"):
        ln.layer_norm(x.long(), torch.ones(8))
