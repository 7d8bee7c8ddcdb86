"""Tests of torch's own fast paths (kernels/cpu.py), called directly: torch._int_mm for W8A8 (exact, bit-equal to the
reference), the packed int8 and int4 weight-only kernels (bf16 accuracy: x, scales and output rounded to bf16, 2**-8
relative each, so rtol 1.6e-2 scaled by |x| @ |w|^T), the reference fallbacks where torch's kernels refuse or crash,
the per-weight caches; RMSNorm and SwiGLU for training (the same forward bit for bit, gradients against fp64, and
only x and 1 / rms, or gate and up, kept for the backward through ops); and, in subprocesses, the public ops
dispatching to these paths without the interpreter and without triton."""
import gc
import os
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch
from helpers import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_inputs import gen, magnitude, make_int4, rand_int8

from tinyformer import ops
from tinyformer.kernels import cpu, device, reference

QUICK = settings(max_examples=60, deadline=None, derandomize=True)  # pure torch
GROUPS = [32, 64, 128]


@QUICK
@given(M=st.sampled_from([1, 2, 4, 5, 17, 64]), N=st.sampled_from([1, 7, 70, 128]),
       K=st.sampled_from([1, 8, 16, 130, 256]), seed=st.integers(0, 2 ** 16))
def test_cpu_int_mm_path_is_exact(M, N, K, seed):  # M <= 4: row by row on the weight's view; M > 4: a (K, N) copy
    g = gen(seed)
    a, b = rand_int8(M, K, gen=g), rand_int8(N, K, gen=g)
    assert torch.equal(cpu.int8_matmul_int32_cpu(a, b).long(), reference.int8_matmul_int32(a, b))
    a_s, b_s, bias = torch.rand(M, generator=g), torch.rand(N, generator=g), torch.randn(N, generator=g)
    for out_dtype in (torch.float32, torch.bfloat16):  # the reference's epilogue: bit-exact
        assert torch.equal(cpu.int8_matmul_cpu(a, b, a_s, b_s, bias, out_dtype),
                           reference.int8_matmul(a, b, a_s, b_s, bias, out_dtype))


# K = 130: the reference fallback (torch's packed op crashes on K % 16 != 0); M = 130: the bf16 matmul for many rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N,K", [(1, 64, 256), (5, 70, 96), (17, 48, 512), (3, 16, 130), (130, 24, 64)])
def test_cpu_int8_weight_only_path(dtype, M, N, K):
    g = gen(M + N + K)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    s = torch.rand(N, generator=g) * 1e-2 + 1e-3
    bias = torch.randn(N, generator=g).to(dtype)
    got = cpu.int8_weight_only_matmul_cpu(x, w, s, bias)
    want = reference.int8_weight_only_matmul(x, w, s, bias)
    assert got.dtype == dtype
    assert_close(got, want, atol=1.6e-2 * magnitude(x, w.float() * s[:, None]), rtol=1.6e-2, name=f"int8 wo {dtype}")


def test_cpu_int8_weight_only_unaligned_weight():
    """A weight view that does not start on a 64-byte boundary is copied before torch's AVX-512 kernel reads it."""
    g = gen(11)
    storage = torch.randint(-127, 128, (8 * 64 + 56,), dtype=torch.int8, generator=g)
    w = storage[56:].view(8, 64)  # 56 bytes into its storage
    x, s = torch.randn(32, 64, generator=g).bfloat16(), torch.rand(8, generator=g)
    got = cpu.int8_weight_only_matmul_cpu(x, w, s)
    want = reference.int8_weight_only_matmul(x, w, s)
    assert_close(got, want, atol=1.6e-2 * magnitude(x, w.float() * s[:, None]), rtol=1.6e-2, name="unaligned")


def test_cpu_int8_weight_only_many_rows_without_onednn_bf16_runs_in_fp32(monkeypatch):
    """On a CPU without bf16 matmul hardware the many-row path multiplies in fp32: fp32 activations then keep fp32
    accuracy, which the bf16 path (2**-8 relative) would not."""
    monkeypatch.setattr(device, "onednn_bf16", lambda: False)
    g = gen(7)
    M, N, K = cpu.WO_DEQUANT_MIN_M + 2, 24, 64
    x = torch.randn(M, K, generator=g)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    s = torch.rand(N, generator=g) * 1e-2 + 1e-3
    bias = torch.randn(N, generator=g)
    got = cpu.int8_weight_only_matmul_cpu(x, w, s, bias)
    want = x.double() @ (w.double() * s.double()[:, None]).T + bias.double()
    assert_close(got, want, atol=1e-5, rtol=1e-5, name="fp32 path")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("G", GROUPS)
@pytest.mark.parametrize("M,N,groups", [(1, 64, 2), (7, 48, 3), (33, 16, 1)])
def test_cpu_int4_prepacked_matches_reference(dtype, G, M, N, groups):
    K = G * groups
    g = gen(M + N + G)
    w_packed, scales, zeros = make_int4(N, K, G, g)
    x = torch.randn(M, K, generator=g).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype)
    pre = cpu.prepack_int4_cpu(w_packed, scales, zeros, G)
    assert pre.fast
    got = pre.matmul(x, bias)
    w = reference.dequantize_int4(w_packed, scales, zeros, G)
    assert got.dtype == dtype
    assert_close(got, x.float() @ w.T + bias.float(), atol=1.6e-2 * magnitude(x, w), rtol=1.6e-2,
                 name=f"cpu int4 {dtype}")


@pytest.mark.parametrize("bf16_hw", [False, True])
def test_cpu_int4_many_rows_dequantize_and_input_grads(monkeypatch, bf16_hw):
    """From WO_DEQUANT_MIN_M rows the int4 product dequantizes and runs the float GEMM (bf16 only with bf16 hardware);
    the frozen int4 / int8 weights' input gradients dy @ W agree with float64."""
    monkeypatch.setattr(device, "onednn_bf16", lambda: bf16_hw)
    g = gen(11)
    M, N, G = cpu.WO_DEQUANT_MIN_M + 3, 48, 32
    K = 3 * G
    w_packed, scales, zeros = make_int4(N, K, G, g)
    w = reference.dequantize_int4(w_packed, scales, zeros, G).double()  # (N, K)
    assert torch.equal(cpu.dequantized_int4(w_packed, scales, zeros, G).double(), w)  # fp32: the reference exactly
    x, bias, dy = torch.randn(M, K, generator=g), torch.randn(N, generator=g), torch.randn(M, N, generator=g)
    tol = 1.6e-2 if bf16_hw else 1e-5
    got = cpu.int4_matmul_unchecked(x, w_packed, scales, zeros, G, bias)
    assert_close(got, x.double() @ w.T + bias.double(), atol=tol * magnitude(x, w), rtol=tol, name="many rows")
    for dtype in (torch.float32, torch.bfloat16):
        tol = 1.6e-2 if dtype == torch.bfloat16 else 1e-5
        dx = cpu.int4_input_grad(dy.to(dtype), w_packed, scales, zeros, G)
        assert dx.dtype == dtype
        assert_close(dx, dy.double() @ w, atol=tol * magnitude(dy, w.T), rtol=tol, name=f"int4 dx {dtype}")
        w8 = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
        s8 = torch.rand(N, generator=g) * 1e-2 + 1e-3
        dx = cpu.int8_input_grad(dy.to(dtype), w8, s8)
        w8d = w8.double() * s8.double()[:, None]
        assert_close(dx, dy.double() @ w8d, atol=tol * magnitude(dy, w8d.T), rtol=tol, name=f"int8 dx {dtype}")


def test_cpu_int4_fallback_and_cache():
    g = gen(5)
    w_packed, scales, zeros = make_int4(70, 64, 32, g)  # N = 70: not a multiple of 16, torch's kernel refuses it
    x = torch.randn(3, 64, generator=g)
    pre = cpu.prepack_int4_cpu(w_packed, scales, zeros, 32)
    assert not pre.fast
    assert torch.equal(pre.matmul(x), reference.int4_matmul(x, w_packed, scales, zeros, 32))
    w_packed, scales, zeros = make_int4(32, 64, 32, g)
    first = cpu._int4_layout([w_packed], [scales], [zeros])
    assert cpu._int4_layout([w_packed], [scales], [zeros]) is first  # repacked once per weight
    y0 = cpu.int4_matmul_cpu(x, w_packed, scales, zeros, 32)
    w_packed.bitwise_xor_(0x11)  # in place: every code changes, the version bumps, the cache repacks
    assert cpu._int4_layout([w_packed], [scales], [zeros]) is not first
    y1 = cpu.int4_matmul_cpu(x, w_packed, scales, zeros, 32)
    want = reference.int4_matmul(x, w_packed, scales, zeros, 32)
    assert not torch.equal(y0, y1)
    w = reference.dequantize_int4(w_packed, scales, zeros, 32)
    assert_close(y1, want, atol=1.6e-2 * magnitude(x, w), rtol=1.6e-2, name="after the in-place update")


# dtypes with (atol, rtol) of RMSNorm's gradients against fp64: plain torch's rounding at that precision, doubled
TRAIN_DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 3e-2, 3e-2)]


def _saved_bytes(fn, *args):
    """fn(*args) and the bytes of the distinct storages autograd keeps for its backward."""
    storages = {}
    with torch.autograd.graph.saved_tensors_hooks(
            lambda t: storages.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) and t,
            lambda t: t):
        out = fn(*args)
    return out, sum(storages.values())


@pytest.mark.parametrize("dtype, atol, rtol", TRAIN_DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(5, 123), (2, 7, 96), (1, 1, 300)])
def test_rms_norm_for_training(shape, dtype, atol, rtol):
    g = gen(sum(shape))
    x = (torch.randn(*shape, generator=g) * 2).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype).requires_grad_()
    dy = torch.randn(*shape, generator=g).to(dtype)
    with ops.use_backend("torch"):
        y, kept = _saved_bytes(ops.rms_norm, x, w, 1e-6)
        with torch.no_grad():  # decoding's path: the same values, bit for bit
            assert torch.equal(y, ops.rms_norm(x, w, 1e-6))
    rows = x.numel() // shape[-1]
    assert kept <= x.numel() * x.element_size() + 4 * rows + w.numel() * w.element_size()  # x, rstd, w
    y.backward(dy)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    reference.rms_norm(xr, wr, 1e-6).backward(dy.double())
    assert_close(x.grad, xr.grad, atol=atol, rtol=rtol, name="dx")
    assert_close(w.grad, wr.grad, atol=atol * rows ** 0.5 * 4, rtol=rtol, name="dw")  # a sum over the rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_for_training_matches_autograd_bit_for_bit(dtype):
    g = gen(7)
    gate, up = (torch.randn(3, 5, 77, generator=g).to(dtype).requires_grad_() for _ in range(2))
    dy = torch.randn(3, 5, 77, generator=g).to(dtype)
    with ops.use_backend("torch"):
        y, kept = _saved_bytes(ops.swiglu, gate, up)
    assert kept <= 2 * gate.numel() * gate.element_size()  # gate and up; eager autograd keeps silu(gate) too
    want = reference.swiglu(gate, up)
    assert torch.equal(y, want)
    got = torch.autograd.grad(y, (gate, up), dy)
    for a, b in zip(got, torch.autograd.grad(want, (gate, up), dy)):
        assert torch.equal(a, b)


def test_cpu_int4_cache_does_not_keep_weights_alive():
    w_packed, scales, zeros = make_int4(32, 64, 32, gen(6))
    cpu.int4_matmul_cpu(torch.randn(2, 64), w_packed, scales, zeros, 32)
    key = ("int4_cpu", *(id(t.untyped_storage()) for t in (w_packed, scales, zeros)))
    assert key in cpu._layouts
    n, ref = len(cpu._layouts), weakref.ref(w_packed)
    del w_packed
    gc.collect()
    assert ref() is None and key not in cpu._layouts and len(cpu._layouts) == n - 1


_DISPATCH = """
import sys
if sys.argv[1] == "no_triton":
    sys.modules["triton"] = None  # import triton -> ImportError
import torch
from tinyformer.kernels import device, int4_matmul, int4_mm, int8_matmul, int8_mm, int8_weight_only_matmul
from tinyformer.kernels import quantize_per_token, reference
assert not device.INTERPRET and device.HAS_TRITON == (sys.argv[1] != "no_triton")
assert int8_mm.plan(1, 64, 64)["backend"] == "torch" and int4_mm.plan(1, 64, 64, 32)["kind"] == "cpu"
a, b = torch.randint(-128, 128, (5, 64), dtype=torch.int8), torch.randint(-128, 128, (32, 64), dtype=torch.int8)
sa, sb = torch.rand(5), torch.rand(32)
assert torch.equal(int8_matmul(a, b, sa, sb), reference.int8_matmul(a, b, sa, sb))
x = torch.randn(4, 64)
q, s = quantize_per_token(x)
assert torch.equal(q, reference.quantize_per_token(x)[0])
x = torch.randn(2, 64)
y, want = int8_weight_only_matmul(x, b, sb), reference.int8_weight_only_matmul(x, b, sb)
assert (y - want).abs().max() <= 2e-2 * want.abs().max(), "int8 weight-only"
qq = torch.randint(0, 16, (32, 64), dtype=torch.uint8)
wp, sc, z = reference.pack_int4(qq), torch.rand(32, 2) * 0.1, torch.randint(0, 16, (32, 2)).float()
y, want = int4_matmul(x, wp, sc, z, 32), reference.int4_matmul(x, wp, sc, z, 32)
assert (y - want).abs().max() <= 2e-2 * want.abs().max(), "int4"
print("ok")
"""


@pytest.mark.parametrize("mode", ["no_interpreter", "no_triton"])
def test_public_dispatch_without_the_interpreter(mode):
    """In a process without TRITON_INTERPRET (and one without triton), CPU tensors take these paths through the
    public ops, and the kernels import."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(_DISPATCH), mode], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def test_native_bf16_implies_onednn_bf16():
    """AVX512-BF16 and AMX come with the AVX-512 subsets oneDNN's bf16 GEMMs need."""
    assert device.onednn_bf16() or not device.cpu_has_bf16()
