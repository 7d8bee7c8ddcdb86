"""Tests of the fused linear + cross-entropy (kernels/fused_linear_cross_entropy.py): loss, dh and dW against the
fp64 reference on ragged shapes (a vocabulary that is not a multiple of the kernel's block, chunks that do not divide
the rows, ignored targets, every target ignored), for each dtype; the chunk rule; bad input rejected. The interpreter
runs the kernel without a GPU."""
import pytest
import torch
from helpers import assert_close
from kernel_inputs import DEV, gen, needs_triton

from tinyformer.kernels import fused_linear_cross_entropy as lce, reference

# dtypes with (atol, rtol): the logits rounded to that precision (as an autocast lm_head's are), doubled
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 4e-3, 4e-3), (torch.bfloat16, 3e-2, 3e-2)]


@needs_triton
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("N, C, V, chunk", [(37, 48, 300, 8), (5, 16, 130, None), (20, 32, 77, 64)])
def test_linear_cross_entropy_forward_backward(N, C, V, chunk, dtype, atol, rtol):
    g = gen(N + V)
    h = torch.randn(N, C, generator=g).to(dtype)
    w = (torch.randn(V, C, generator=g) / C ** 0.5).to(dtype)
    target = torch.randint(0, V, (N,), generator=g)
    target[::4] = -100  # ignored rows
    hk, wk = h.to(DEV).clone().requires_grad_(), w.to(DEV).clone().requires_grad_()
    loss = lce.linear_cross_entropy(hk, wk, target.to(DEV), chunk=chunk)
    (2.0 * loss).backward()
    hr, wr = h.double().requires_grad_(), w.double().requires_grad_()
    ref = reference.linear_cross_entropy(hr, wr, target)
    (2.0 * ref).backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, ref, atol=atol, rtol=rtol, name="loss")
    assert_close(hk.grad, hr.grad, atol=atol, rtol=rtol, name="dh")
    assert_close(wk.grad, wr.grad, atol=atol, rtol=rtol, name="dW")


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("N, C, V, chunk, frozen", [(37, 48, 300, 8, False), (300, 16, 130, 256, True),
                                                    (20, 32, 77, 64, False)])
def test_torch_rows_chunk_loop_forward_backward(N, C, V, chunk, frozen, dtype, atol, rtol):
    """The CPU training path: the same chunk loop with torch ops for each chunk's rows, on CPU tensors; a frozen
    weight (a LoRA run's tied head) gets no gradient and costs no dW products."""
    g = gen(N + V + 1)
    h = torch.randn(N, C, generator=g).to(dtype)
    w = (torch.randn(V, C, generator=g) / C ** 0.5).to(dtype)
    target = torch.randint(0, V, (N,), generator=g)
    target[1::3] = -100
    hk, wk = h.clone().requires_grad_(), w.clone().requires_grad_(not frozen)
    loss = lce.linear_cross_entropy_rows(hk, wk, target, chunk=chunk)
    (2.0 * loss).backward()
    hr, wr = h.double().requires_grad_(), w.double().requires_grad_()
    ref = reference.linear_cross_entropy(hr, wr, target)
    (2.0 * ref).backward()
    assert_close(loss, ref, atol=atol, rtol=rtol, name="loss")
    assert_close(hk.grad, hr.grad, atol=atol, rtol=rtol, name="dh")
    if frozen:
        assert wk.grad is None
    else:
        assert_close(wk.grad, wr.grad, atol=atol, rtol=rtol, name="dW")
    with torch.no_grad():
        assert_close(lce.linear_cross_entropy_rows(h, w, target, chunk=chunk), ref, atol=atol, rtol=rtol, name="eval")


@needs_triton
def test_every_target_ignored_gives_zero():
    h, w = torch.randn(3, 8, requires_grad=True), torch.randn(10, 8)
    loss = lce.linear_cross_entropy(h.to(DEV), w.to(DEV), torch.full((3,), -100).to(DEV))
    loss.backward()
    assert loss.item() == 0.0 and not h.grad.any()


def test_chunk_rows_follow_the_vocabulary():
    assert lce.chunk_rows(8192, 576, 49152) == 128  # V / C = 86: chunks of logits about the size of h
    assert lce.chunk_rows(10, 4096, 1000) == 10  # V < C: one chunk
    assert lce.chunk_rows(1, 8, 100000) == 1


def test_linear_cross_entropy_rejects_bad_input():
    h, w, t = torch.randn(3, 8), torch.randn(10, 8), torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="weight must be"):
        lce.linear_cross_entropy(h, torch.randn(10, 7), t)
    with pytest.raises(ValueError, match="target must be int64"):
        lce.linear_cross_entropy(h, w, t.int())
    with pytest.raises(TypeError, match="weight must have h's dtype"):
        lce.linear_cross_entropy(h, w.half(), t)
