"""Inputs shared by the low-bit kernel tests: seeded generators, int8 and int4 operands (int4 in API.md's packed
layout, built from random codes, not by the code under test), the tolerance scale of a dot product, and the activation
dtypes with their tolerances."""
import pytest
import torch

from tinyformer.kernels import device, reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not (torch.cuda.is_available() or (device.HAS_TRITON and device.INTERPRET)),
                                  reason="Triton kernels need CUDA or TRITON_INTERPRET=1 set before import")

# activation dtypes with (rtol, atol relative to |x| @ |w|^T): fp32 accumulation-order rounding; fp16 / bf16: the
# weight rounded to the dot dtype plus one rounding of the output
ACT_DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 2e-3), (torch.bfloat16, 1.6e-2, 1e-2)]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rand_int8(*shape, gen=None):
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=gen)


def make_int4(N, K, G, g, zero_float=False, dtype=torch.float32):
    """(w_packed uint8 (N, K // 2), scales (N, K // G), zeros (N, K // G)) from random codes 0..15; zero_float gives
    zero points that are not integers (the kernels take any float)."""
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=g)
    scales = (torch.rand(N, K // G, generator=g) * 0.05 + 0.005).to(dtype)
    zeros = torch.randint(0, 16, (N, K // G), generator=g).float()
    if zero_float:
        zeros = zeros + torch.rand(N, K // G, generator=g)
    return reference.pack_int4(q), scales, zeros.to(dtype)


def magnitude(x, w):
    """|x| @ |w|^T (M, N): the scale of the rounding error each dot product can have."""
    return (x.float().abs() @ w.float().abs().T).cpu()
