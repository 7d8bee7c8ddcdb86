"""Muon (tinyformer.optim): the Newton-Schulz iteration against the polar factor of an SVD, the optimizer's update
against its formula and its AdamW groups against torch's AdamW, a run that learns, resume and torchrun with it."""
import math

import pytest
import torch

from helpers import assert_close
from tinyformer.optim import NS_CUBIC, Muon, newton_schulz


def polar(G):
    """The orthogonal polar factor P Q^T of G = P S Q^T, from an SVD in float64."""
    P, _, Qh = torch.linalg.svd(G.double(), full_matrices=False)
    return P @ Qh


@pytest.mark.parametrize("shape", [(48, 48), (30, 70), (70, 30), (3, 20, 36)])
def test_newton_schulz_cubic_converges_to_the_polar_factor(shape):
    torch.manual_seed(0)
    # singular values from 1 down to 0.1: well-conditioned enough for 40 cubic steps to converge
    P, _, Qh = torch.linalg.svd(torch.randn(shape, dtype=torch.float64), full_matrices=False)
    s = torch.linspace(1.0, 0.1, P.shape[-1], dtype=torch.float64)
    G = (P * s[..., None, :]) @ Qh
    X = newton_schulz(G.float(), steps=40, coefficients=NS_CUBIC, dtype=torch.float32)
    assert X.shape == G.shape and X.dtype == torch.float32
    assert_close(X, polar(G), atol=2e-5, name="cubic Newton-Schulz")


@pytest.mark.parametrize("shape", [(64, 64), (128, 512), (512, 128)])
def test_muons_quintic_keeps_the_singular_vectors_and_brings_singular_values_near_one(shape):
    torch.manual_seed(1)
    G = torch.randn(shape)  # a gradient-like matrix: singular values spread over a decade and more
    X = newton_schulz(G, dtype=torch.float32)  # five quintic steps
    P, s, Qh = torch.linalg.svd(G.double(), full_matrices=False)
    D = P.T @ X.double() @ Qh.T  # diagonal when X = P diag(d) Q^T
    d = torch.diagonal(D)
    assert_close(D - torch.diag(d), torch.zeros_like(D), atol=2e-4, name="off-diagonal of P^T X Q")
    # the quintic's band: a singular value at least 2e-3 of the Frobenius norm (which five steps, each multiplying a
    # small one by a = 3.4445, can lift) lands in about [0.7, 1.2]; smaller ones stay smaller
    lifted = d[s / s.norm() >= 2e-3]
    assert len(lifted) > 0.9 * len(d) and lifted.min() > 0.65 and lifted.max() < 1.25, (lifted.min(), lifted.max())
    assert (X.double() - polar(G)).norm() / polar(G).norm() < 0.3  # near the polar factor, not at it


@pytest.mark.parametrize("shape", [(128, 128), (4, 512, 128)])
def test_newton_schulz_in_bf16_follows_fp32(shape):
    """The bf16 iteration (the default where the hardware multiplies bf16) points where fp32's does and keeps its
    singular values where fp32 puts them: five steps, each multiplying by up to a = 3.4445, grow bf16's rounding
    (2^-8) to a few percent of the matrix, which Muon's fixed-size update tolerates."""
    torch.manual_seed(3)
    G = torch.randn(shape)
    X = newton_schulz(G, dtype=torch.bfloat16)
    assert X.dtype == torch.float32
    ref = newton_schulz(G, dtype=torch.float32)
    cos = (X * ref).sum((-2, -1)) / (X.norm(dim=(-2, -1)) * ref.norm(dim=(-2, -1)))  # one per matrix
    assert cos.min() > 0.999, cos
    gap = (torch.linalg.svdvals(X) - torch.linalg.svdvals(ref)).abs().max()  # the same band, value by value
    assert gap < 0.05, gap


def test_muon_step_follows_its_formula_and_adamw_groups_match_torch_adamw():
    torch.manual_seed(2)
    W = torch.nn.Parameter(torch.randn(32, 16))
    b = torch.nn.Parameter(torch.randn(16))
    b_ref = torch.nn.Parameter(b.detach().clone())
    opt = Muon([{"params": [W], "use_muon": True, "lr": 0.05, "momentum": 0.9, "ns_dtype": "float32"},
                {"params": [b], "use_muon": False, "lr": 1e-2, "betas": (0.9, 0.99), "weight_decay": 0.1}])
    ref = torch.optim.AdamW([b_ref], lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, eps=1e-8)
    buf, w = torch.zeros(32, 16), W.detach().clone()
    for _ in range(3):
        g, gb = torch.randn(32, 16), torch.randn(16)
        W.grad, b.grad, b_ref.grad = g, gb, gb.clone()
        opt.step()
        ref.step()
        buf = 0.9 * buf + 0.1 * g  # momentum, then the Nesterov step and its orthogonal polar factor
        w = w - 0.05 * math.sqrt(32 / 16) * newton_schulz(0.1 * g + 0.9 * buf, dtype=torch.float32)
        assert_close(W.detach(), w, atol=1e-5, name="Muon weight")
        assert_close(b.detach(), b_ref.detach(), atol=1e-6, rtol=1e-6, name="AdamW group")


def test_muon_rejects_groups_it_cannot_take():
    with pytest.raises(ValueError, match="use_muon"):
        Muon([{"params": [torch.nn.Parameter(torch.zeros(3, 3))]}])
    with pytest.raises(ValueError, match="ns_dtype"):
        Muon([{"params": [torch.nn.Parameter(torch.zeros(3, 3))], "use_muon": True, "ns_dtype": torch.float16}])
    with pytest.raises(ValueError, match="2-D matrices only"):
        Muon([{"params": [torch.nn.Parameter(torch.zeros(3))], "use_muon": True}])
