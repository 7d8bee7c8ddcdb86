"""Tests of the FP8 (e4m3) GEMM (kernels/fp8_mm.py) and its quantizer (reference.quantize_fp8): the kernel against
the fp32 reference on ragged shapes for every output dtype, with and without bias; the quantizer's error bound and
saturation; the sm_90-only GPU path; bad input rejected before any launch. The interpreter runs the kernel without a
GPU (tests/conftest.py)."""
import types

import pytest
import torch
from helpers import assert_close
from kernel_inputs import DEV, gen, needs_triton

from tinyformer.kernels import fp8_mm, reference

# output dtypes with the relative tolerance of one rounding of the output (the fp32 sums agree to ~1e-6)
OUT_DTYPES = [(torch.float32, 1e-5), (torch.float16, 1e-3), (torch.bfloat16, 8e-3)]


def _operands(M, N, K, g):
    a, sa = reference.quantize_fp8(torch.randn(M, K, generator=g) * 3)
    b, sb = reference.quantize_fp8(torch.randn(N, K, generator=g) * 0.05)
    return a, b, sa, sb


@needs_triton
@pytest.mark.parametrize("out_dtype, rtol", OUT_DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("M, N, K", [(1, 70, 100), (37, 130, 200), (100, 7, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_matmul_matches_the_reference(M, N, K, bias, out_dtype, rtol):
    g = gen(M * N + K)
    a, b, sa, sb = _operands(M, N, K, g)
    bias_t = torch.randn(N, generator=g) if bias else None
    assert fp8_mm.plan(M, N, K, device=DEV)["backend"] == "triton"
    got = fp8_mm.fp8_matmul(a.to(DEV), b.to(DEV), sa.to(DEV), sb.to(DEV),
                            bias_t.to(DEV) if bias else None, out_dtype=out_dtype)
    assert got.dtype == out_dtype and got.shape == (M, N)
    want = (a.double() @ b.double().T) * sa.double()[:, None] * sb.double()[None, :]  # fp64: exact products
    if bias:
        want = want + bias_t.double()
    mag = (a.double().abs() @ b.double().abs().T) * sa.double()[:, None] * sb.double()[None, :]
    assert_close(got, want, atol=1e-6 * mag + 1e-6, rtol=rtol, name=f"fp8 {out_dtype}")


def test_quantize_fp8_error_bound_and_saturation():
    """Per-row scale = absmax / 448, so each row's largest entry maps to +-448 exactly; every entry is within half an
    e4m3 step (2^-4 relative for normal numbers, 2^-10 * scale below them) of x / scale."""
    g = gen(0)
    x = torch.randn(5, 300, generator=g) * torch.logspace(-3, 3, 5)[:, None]
    x[2] = 0.0
    q, s = reference.quantize_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (5,) and s[2] == 1.0
    assert torch.equal(q.float().abs().amax(1)[[0, 1, 3, 4]], torch.full((4,), 448.0))
    y = x / s[:, None]
    err = (q.float() - y).abs()
    assert (err <= torch.maximum(y.abs() * 2.0 ** -4, torch.full_like(y, 2.0 ** -10))).all()


def test_older_gpus_take_the_reference(monkeypatch):
    """The Triton path needs e4m3 tensor cores: sm_89 (Ada's mma.sync, the sm80 table's fp8 rows, stages capped for
    its shared memory) and sm_90 (wgmma); an sm_80 device plans the reference."""
    cuda_tensor = types.SimpleNamespace(device=torch.device("cuda"))  # no GPU here: a stand-in with a CUDA device
    monkeypatch.setattr(fp8_mm, "backend_of", lambda t, name: "triton")
    monkeypatch.setattr(fp8_mm, "arch_of", lambda device: 80)
    assert not fp8_mm._triton_runs(cuda_tensor)
    monkeypatch.setattr(fp8_mm, "arch_of", lambda device: 89)  # Ada: e4m3 mma.sync, ~100 KB of shared memory
    assert fp8_mm._triton_runs(cuda_tensor) and all(c.num_stages <= 2 for c in fp8_mm.matmul_configs("fp8", 89))
    monkeypatch.setattr(fp8_mm, "arch_of", lambda device: 90)
    assert fp8_mm._triton_runs(cuda_tensor) and fp8_mm.matmul_configs("fp8", 90)[0].block_k == 128


def _args():
    a, b, sa, sb = _operands(3, 4, 32, gen(1))
    return [a, b, sa, sb]


FP8_BAD = [
    ("a int8", lambda x: [x[0].view(torch.int8)] + x[1:], TypeError, "a must be float8_e4m3fn"),
    ("b float", lambda x: [x[0], x[1].float()] + x[2:], TypeError, "b must be float8_e4m3fn"),
    ("K differs", lambda x: [x[0][:, :16]] + x[1:], ValueError, "K differs"),
    ("a_scale shape", lambda x: x[:2] + [x[2][:2], x[3]], ValueError, "a_scale must have shape"),
    ("b_scale dtype", lambda x: x[:3] + [x[3].double()], TypeError, "b_scale must be float32"),
]


@pytest.mark.parametrize("case", FP8_BAD, ids=[c[0] for c in FP8_BAD])
def test_fp8_bad_input_raises_before_launch(monkeypatch, case):
    def refuse(*args, **kwargs):
        raise AssertionError("a kernel was launched")
    monkeypatch.setattr(fp8_mm, "launch", refuse)
    _, mutate, exc, match = case
    with pytest.raises(exc, match=match):
        fp8_mm.fp8_matmul(*mutate(_args()))
