"""Tests of the quantization primitives (kernels/quant.py): choose_qparams / quantize / dequantize at every
granularity, round trips within half a step, exact zeros, the symmetric int4 grid, SQNR floors in dB (torchao's
compute_error) and the ragged last group. Pure torch: quick hypothesis settings."""
import pytest
import torch
from helpers import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_inputs import gen

from tinyformer.kernels import quant

QUICK = settings(max_examples=60, deadline=None, derandomize=True)

GRANULARITIES = [None, -1, 2, 32, 64, 128]  # per tensor, per channel, per group


@QUICK
@given(N=st.integers(1, 12), groups=st.integers(1, 3), bits=st.sampled_from([8, 4]),
       group_size=st.sampled_from(GRANULARITIES), symmetric=st.booleans(), shift=st.sampled_from([0.0, 2.0, -3.0]),
       short=st.integers(0, 127), seed=st.integers(0, 2 ** 16))
def test_quant_round_trip_within_half_a_step(N, groups, bits, group_size, symmetric, shift, short, seed):
    G = group_size if group_size and group_size > 0 else 32
    K = groups * G - short % G  # short > 0: a ragged last group of G - short columns
    w = torch.randn(N, K, generator=gen(seed)) + shift  # shifted: asymmetric ranges
    scale, zero = quant.choose_qparams(w, bits, group_size, symmetric)
    expected_shape = () if group_size is None else (N,) if group_size == -1 else (N, groups)
    assert scale.shape == expected_shape and zero.shape == expected_shape
    assert (scale > 0).all() and torch.equal(zero, zero.round())  # integer zero points (0.0 is exact)
    q = quant.quantize(w, scale, zero, bits, group_size)
    qmin, qmax, dtype = quant.qrange(bits)
    assert q.dtype == dtype and q.shape == w.shape
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    if symmetric and bits == 8:
        assert int(q.min()) >= -127 and torch.equal(zero, torch.zeros_like(zero))  # symmetric int8 grid
    w_hat = quant.dequantize(q, scale, zero, group_size)
    # |w - w_hat| <= scale / 2 element by element (plus fp32 rounding of the division and product)
    step = quant.dequantize(torch.ones_like(q), scale, torch.zeros_like(zero), group_size)  # scale per element
    assert_close(w_hat, w, atol=step * (0.5 + 1e-5), name="round trip")


@pytest.mark.parametrize("bits,symmetric", [(8, True), (8, False), (4, True), (4, False)])
@pytest.mark.parametrize("group_size", [None, -1, 32])
def test_quant_all_zero_groups_are_exact(bits, symmetric, group_size):
    w = torch.randn(4, 64)
    w[1] = 0.0  # an all-zero row (and so all-zero groups)
    scale, zero = quant.choose_qparams(w, bits, group_size, symmetric)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    w_hat = quant.dequantize(quant.quantize(w, scale, zero, bits, group_size), scale, zero, group_size)
    assert torch.isfinite(w_hat).all()
    assert torch.equal(w_hat[1], torch.zeros(64))
    wz = torch.zeros(3, 64)
    scale, zero = quant.choose_qparams(wz, bits, group_size, symmetric)
    assert torch.equal(quant.dequantize(quant.quantize(wz, scale, zero, bits, group_size), scale, zero, group_size),
                       wz)


def test_quant_symmetric_int4_uses_the_full_grid():
    w = torch.tensor([[-1.0, -0.5, 0.0, 0.5, 1.0, 0.25] * 6])  # (1, 36)
    scale, zero = quant.choose_qparams(w[:, :32], 4, 32, symmetric=True)
    assert zero.item() == 8.0 and scale.item() == pytest.approx(2 / 15)
    q = quant.quantize(w[:, :32], scale, zero, 4, 32)
    # -absmax -> -7.5 steps -> code 0 or 1 (the fp32 rounding of 2/15 decides the tie); +absmax clamps at 15
    assert int(q.min()) <= 1 and int(q.max()) == 15


@pytest.mark.parametrize("bits,group_size,symmetric,floor_db", [
    (8, -1, True, 38.0),  # int8 per channel: ~40 dB on a gaussian
    (8, None, True, 30.0),  # int8 per tensor: the outliers of 256K samples set the step
    (4, 128, False, 18.0),  # int4 asymmetric group 128 (GPTQ/AWQ layout): ~20 dB
    (4, 32, False, 20.0),  # smaller groups, better
    (4, 128, True, 17.0),
])
def test_quant_sqnr_floors(bits, group_size, symmetric, floor_db):
    w = torch.randn(256, 1024, generator=gen(0))
    scale, zero = quant.choose_qparams(w, bits, group_size, symmetric)
    db = quant.sqnr(w, quant.dequantize(quant.quantize(w, scale, zero, bits, group_size), scale, zero, group_size))
    print(f"SQNR int{bits} group={group_size} symmetric={symmetric}: {db:.2f} dB")
    assert db > floor_db


@pytest.mark.parametrize("symmetric", [False, True])
def test_quant_ragged_last_group_is_quantized_on_its_own_columns(symmetric):
    w = torch.randn(6, 100) + 1.0  # groups of 64: one of 64 columns, one of 36
    w[:, 99] = 9.0  # the row's last value: the padding copies it, which must not widen that group's range
    scale, zero = quant.choose_qparams(w, 4, 64, symmetric)
    assert scale.shape == (6, 2) and quant.n_groups(100, 64) == 2
    for cols, g in ((slice(0, 64), 0), (slice(64, 100), 1)):
        s, z = quant.choose_qparams(w[:, cols], 4, -1, symmetric)  # per row over exactly the group's columns
        assert torch.equal(scale[:, g], s) and torch.equal(zero[:, g], z)
    q = quant.quantize(w, scale, zero, 4, 64)
    assert q.shape == (6, 100)
    assert torch.equal(q[:, 64:], quant.quantize(w[:, 64:], scale[:, 1:], zero[:, 1:], 4, 36))
    assert quant.dequantize(q, scale, zero, 64).shape == (6, 100)


def test_quant_bad_arguments():
    w = torch.randn(4, 96)
    with pytest.raises(ValueError, match="group_size must be"):
        quant.choose_qparams(w, 4, 0)
    with pytest.raises(ValueError, match="bits"):
        quant.choose_qparams(w, 9)
    with pytest.raises(TypeError):
        quant.choose_qparams(w.to(torch.int8), 8)
    scale, zero = quant.choose_qparams(w, 4, 32)
    with pytest.raises(ValueError, match="shape"):
        quant.quantize(w, scale[:, :2], zero, 4, 32)
    with pytest.raises(ValueError, match="2-D"):
        quant.choose_qparams(torch.randn(2, 3, 32), 8, -1)
