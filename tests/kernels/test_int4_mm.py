"""Tests of the int4 weight-only matmul (kernels/int4_mm.py): the four paths (one row, decode split-K, prefill on the
K-plane layout, prefill for other groups) against the fp32 reference on ragged shapes for every activation dtype and
group size, groups that do not divide the K tile (the gathered scale path and masked loads), the repacked layouts
holding the API layout's codes, the same rounding at every M, split ranges that fit every autotune candidate, and bad
input rejected before any launch. The interpreter runs the kernels without a GPU (tests/conftest.py)."""
import pytest
import torch
from helpers import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_inputs import ACT_DTYPES, DEV, gen, magnitude, make_int4, needs_triton

from tinyformer.kernels import cpu, int4_mm, matmul, reference
from tinyformer.kernels.matmul import MatmulConfig

FAST = settings(max_examples=80, deadline=None, derandomize=True)  # interpreter: ~10-100 ms per kernel call
GROUPS = [32, 64, 128]


def _run(x, w_packed, scales, zeros, G, bias=None):
    return int4_mm.int4_matmul(x.to(DEV), w_packed.to(DEV), scales.to(DEV), zeros.to(DEV), G,
                               bias.to(DEV) if bias is not None else None)


@needs_triton
@FAST
@given(M=st.sampled_from([1, 2, 7, 16, 17, 100]), N=st.sampled_from([1, 7, 70, 130]), G=st.sampled_from(GROUPS),
       groups=st.integers(1, 4), act=st.sampled_from(ACT_DTYPES), bias=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_int4_matmul(M, N, G, groups, act, bias, seed):
    dtype, rtol, atol = act
    K = G * groups
    if M * N * K > 100 * 130 * 256:
        K = G  # keep interpreter cases small
    g = gen(seed)
    w_packed, scales, zeros = make_int4(N, K, G, g, dtype=dtype)
    x = torch.randn(M, K, generator=g).to(dtype)
    bias_t = torch.randn(N, generator=g).to(dtype) if bias else None
    got = _run(x, w_packed, scales, zeros, G, bias_t)
    assert got.dtype == dtype and got.shape == (M, N)
    w = reference.dequantize_int4(w_packed, scales, zeros, G)  # (N, K) fp32
    want = x.float() @ w.T + (bias_t.float() if bias else 0)  # fp32 reference before the cast to x's dtype
    assert_close(got, want, atol=atol * magnitude(x, w) + 1e-6, rtol=rtol, name=f"int4 {dtype} G={G}")


@needs_triton
@pytest.mark.parametrize("G", [2, 10, 26])  # groups that do not divide the K tile: the gathered scales path
@pytest.mark.parametrize("M", [1, 37])  # decode (split-K) and prefill
def test_int4_matmul_odd_group_sizes(G, M):
    g = gen(G + M)
    N, K = 33, 130
    K = K - K % G
    w_packed, scales, zeros = make_int4(N, K, G, g, zero_float=True)
    x = torch.randn(M, K, generator=g)
    got = _run(x, w_packed, scales, zeros, G)
    want = reference.int4_matmul(x, w_packed, scales, zeros, G)
    w = reference.dequantize_int4(w_packed, scales, zeros, G)
    assert_close(got, want, atol=1e-5 * magnitude(x, w), rtol=1e-5, name=f"int4 G={G}")


@needs_triton
def test_int4_decode_path_splits_k_and_matches():
    """M <= 16 takes the 16-row split-K path; the split count is > 1 for K spanning several groups."""
    M, N, K, G = 3, 70, 256, 32
    p = int4_mm.plan(M, N, K, G, device=DEV)
    assert p["kind"] == "i4_decode" and p["splits"] > 1 and p["config"].block_m == 16
    assert int4_mm.plan(100, N, K, G, device=DEV)["kind"] == "i4_prefill"
    assert int4_mm.plan(100, N, 240, 48, device=DEV)["kind"] == "i4"  # other groups: the API layout's tiles
    g = gen(3)
    w_packed, scales, zeros = make_int4(N, K, G, g)
    x = torch.randn(M, K, generator=g)
    got = _run(x, w_packed, scales, zeros, G)
    assert_close(got, reference.int4_matmul(x, w_packed, scales, zeros, G), atol=1e-4, rtol=1e-5, name="decode")


@needs_triton
@pytest.mark.parametrize("K,G,kind", [(256, 32, "i4_gemv"), (120, 10, "i4_decode")])
def test_int4_one_row_splits_k_and_matches(K, G, kind):
    """M = 1 takes the one-row CUDA-core kernel for power-of-two groups >= 32 (split-K reduced in the kernel), the
    decode tiles for other groups (a masked, gathered tail); the bias is added once, after the split sum."""
    N = 70
    p = int4_mm.plan(1, N, K, G, device=DEV)
    assert p["kind"] == kind and p["splits"] > 1
    g = gen(K + G)
    w_packed, scales, zeros = make_int4(N, K, G, g, zero_float=True)
    x, bias = torch.randn(1, K, generator=g), torch.randn(N, generator=g)
    got = _run(x, w_packed, scales, zeros, G, bias)
    want = reference.int4_matmul(x, w_packed, scales, zeros, G, bias)
    w = reference.dequantize_int4(w_packed, scales, zeros, G)
    assert_close(got, want, atol=1e-5 * magnitude(x, w), rtol=1e-5, name="one row")


def test_gemv_layout_holds_the_codes():
    """Int4Gemv: word (j, n) of wq holds the code of k = 8j + i at bits 4i (read back here by shifts in torch);
    scales and zeros are the API's, group-major."""
    N, K, G = 13, 96, 32
    w_packed, scales, zeros = make_int4(N, K, G, gen(1))
    lay = int4_mm.repack_int4_gemv(w_packed, scales, zeros)
    assert lay.wq.dtype == torch.int32 and lay.wq.shape == (K // 8, N) and lay.wq.is_contiguous()
    words = lay.wq.to(torch.int64) & 0xFFFFFFFF  # (K / 8, N) unsigned
    codes = torch.stack([(words >> (4 * i)) & 0xF for i in range(8)], dim=1).reshape(K, N)  # (K, N), k = 8j + i
    assert torch.equal(codes.T.to(torch.uint8), reference.unpack_int4(w_packed))
    assert torch.equal(lay.scales, scales.T) and torch.equal(lay.zeros, zeros.T)


def test_prefill_layout_holds_the_codes():
    """Int4Prefill: in chunk c of a row, byte c * 32 + j holds the code of column 64c + j (low nibble) and 64c + 32 + j
    (high), read back here by masks and shifts in torch; K = 96 is padded to two whole chunks with code 0, and the
    scales and zeros (the API's, group-major) with a zero group."""
    N, K, G = 13, 96, 32
    w_packed, scales, zeros = make_int4(N, K, G, gen(2))
    lay = int4_mm.repack_int4_prefill(w_packed, scales, zeros)
    assert lay.w.dtype == torch.uint8 and lay.w.shape == (N, 64) and lay.w.is_contiguous()
    chunks = lay.w.view(N, 2, int4_mm.PLANE)  # (N, Kp / 64, PLANE)
    codes = torch.stack((chunks & 0xF, chunks >> 4), dim=2).reshape(N, 128)  # (N, Kp / 64, 2, PLANE) -> (N, Kp)
    assert torch.equal(codes[:, :K], reference.unpack_int4(w_packed)) and not codes[:, K:].any()
    for t, api in ((lay.scales, scales), (lay.zeros, zeros)):  # group-major, a zero group up to Kp = 128
        assert t.shape == (4, N) and torch.equal(t[:3], api.T) and not t[3:].any()
    # one weight keeps both of its repacked layouts, each under its own tag
    assert isinstance(int4_mm.gemv_layout(w_packed, scales, zeros), int4_mm.Int4Gemv)
    assert isinstance(int4_mm.prefill_layout(w_packed, scales, zeros), int4_mm.Int4Prefill)
    assert isinstance(int4_mm.gemv_layout(w_packed, scales, zeros), int4_mm.Int4Gemv)


# (M, N, K, G): M just above 16 and beyond one 64-row tile, N and K not multiples of the tiles; K = 96 with G = 32 is
# an odd number of planes (the last tile's high plane lies past K: masked x, s = z = 0)
PREFILL_SHAPES = [(17, 70, 96, 32), (33, 130, 192, 64), (100, 33, 256, 128)]


@needs_triton
@pytest.mark.parametrize("act", ACT_DTYPES, ids=lambda a: str(a[0]).split(".")[-1])
@pytest.mark.parametrize("M,N,K,G", PREFILL_SHAPES)
def test_prefill_kernel_on_ragged_shapes(M, N, K, G, act):
    """More than 16 rows with power-of-two groups take the K-plane kernel (out^T tiles, the weight the left operand),
    with and without bias, in x's dtype."""
    dtype, rtol, atol = act
    assert int4_mm.plan(M, N, K, G, device=DEV)["kind"] == "i4_prefill"
    g = gen(M + N + K)
    w_packed, scales, zeros = make_int4(N, K, G, g, zero_float=True, dtype=dtype)
    x = torch.randn(M, K, generator=g).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype) if K != 192 else None
    got = _run(x, w_packed, scales, zeros, G, bias)
    assert got.dtype == dtype and got.shape == (M, N)
    want = reference.int4_matmul(x.float(), w_packed, scales.float(), zeros.float(), G,
                                 bias.float() if bias is not None else None)
    w = reference.dequantize_int4(w_packed, scales, zeros, G)
    assert_close(got, want, atol=atol * magnitude(x, w) + 1e-6, rtol=rtol, name=f"prefill {dtype} {M}x{N}x{K} G={G}")


def _gemv_configs():
    """Every one-row config shipped for a GPU (configs.csv, both arch tables), block_k capped at the group size."""
    from tinyformer.kernels import configs
    return sorted({MatmulConfig(*(r[k] for k in configs.TILE)) for r in configs.rows() if r["kernel"] == "i4_gemv"},
                  key=lambda c: (c.block_n, c.block_k, c.num_warps))


@needs_triton
@pytest.mark.parametrize("c", _gemv_configs(), ids=lambda c: f"{c.block_n}x{c.block_k}w{c.num_warps}")
def test_gemv_every_shipped_config_on_a_ragged_shape(monkeypatch, c):
    """One pass of each shipped one-row config: N = 300 leaves a partial column tile, 3 K splits reduced in-kernel
    (the last split of a tile sums them), bias added once; fp16 activations; the tickets end zeroed."""
    monkeypatch.setattr(int4_mm, "matmul_configs", lambda kind, arch: [c] if kind == "i4_gemv" else
                        matmul.matmul_configs(kind, arch))
    monkeypatch.setattr(int4_mm, "split_k", lambda M, N, K, c0, device, align=1: (3, K // 3))
    N, G = 300, 64
    K = 3 * max(G, c.block_k)
    g = gen(c.block_n + c.block_k)
    w_packed, scales, zeros = make_int4(N, K, G, g, zero_float=True, dtype=torch.float16)
    x, bias = torch.randn(1, K, generator=g).half(), torch.randn(N, generator=g).half()
    assert int4_mm.plan(1, N, K, G, device=DEV)["splits"] == 3
    got = _run(x, w_packed, scales, zeros, G, bias)
    want = reference.int4_matmul(x.float(), w_packed, scales.float(), zeros.float(), G, bias.float())
    w = reference.dequantize_int4(w_packed, scales, zeros, G)
    assert_close(got, want, atol=2e-3 * magnitude(x, w), rtol=2e-3, name=f"gemv {c}")
    assert not int4_mm._TICKETS[str(torch.device(DEV))].any()


@needs_triton
@pytest.mark.parametrize("G", [32, 128])
def test_same_rounding_at_every_m(G):
    """Power-of-two groups: the one-row kernel, the decode tiles and the prefill tiles all compute
    s * (sum q x - z * sum x) in fp32 from exact codes; none rounds the dequantized weight to fp16. The activations
    are chosen adversarially: x[k] = the sign of the fp16 rounding error of w[0, k], so a kernel that rounded w to
    fp16 would be off by ~K/2 such errors in output 0, many fp16 ulps; here every M is within one ulp of fp32."""
    N, K = 70, 8 * G
    g = gen(G)
    w_packed, scales, zeros = make_int4(N, K, G, g, zero_float=True, dtype=torch.float16)
    w = reference.dequantize_int4(w_packed, scales, zeros, G)  # (N, K) fp32
    sign = torch.sign(w[0].half().float() - w[0])
    sign[sign == 0] = 1.0
    for M, kind in ((1, "i4_gemv"), (3, "i4_decode"), (17, "i4_prefill"), (70, "i4_prefill")):  # 70: two row tiles
        assert int4_mm.plan(M, N, K, G, device=DEV)["kind"] == kind
        x = (sign * torch.tensor([1.0, -1.0, 0.5, -0.25] * 18)[:M, None]).half()  # (M, K) exact in fp16
        got = _run(x, w_packed, scales, zeros, G)[:, 0].float()
        want = (x.float() @ w[0])  # exact products, fp32 sums
        ulp = want.abs() * 2.0 ** -10 + 1e-6 * magnitude(x, w)[:, 0]
        assert_close(got, want, atol=ulp, rtol=0, name=f"int4 M={M} G={G} output 0")


def test_int4_split_ranges_fit_every_autotune_candidate():
    """The autotuner may pick any candidate, and whole-tile (unmasked) loads must not cross a split's end: K_SPLIT is
    a multiple of every candidate's block_k, not only of the first one's."""
    cands = [MatmulConfig(1, 64, 64, 4, 2), MatmulConfig(1, 32, 128, 4, 2), MatmulConfig(1, 128, 32, 8, 2)]
    for K in (128 * 7, 128 * 33, 4096):
        splits, k_split = int4_mm.int4_splits(1, 70, K, 32, cands, torch.device("cpu"))
        assert splits > 1 and k_split % 128 == 0 and (splits - 1) * k_split < K <= splits * k_split


@pytest.mark.parametrize("arch", [80, 86, 90])
@pytest.mark.parametrize("G", GROUPS)
def test_gpu_tiles_never_straddle_a_group(arch, G):
    """A K tile lies in one group; the prefill kernel's tiles are whole chunks of two planes, each plane in one group
    (with G = 32 the two planes of a 64-wide tile are two groups)."""
    for M in (1, 3):
        assert all(G % c.block_k == 0 for c in int4_mm.int4_configs(M, G, arch))
    prefill = int4_mm.int4_configs(100, G, arch)
    assert prefill  # groups of one plane keep the tiles that do not spill, and there are some
    for c in prefill:
        assert c.block_k % (2 * int4_mm.PLANE) == 0 and (G % c.block_k == 0 or c.block_k == 2 * G)
        assert G > int4_mm.PLANE or c.block_m * c.block_n <= int4_mm.PLANE_GROUP_TILE


# ----------------------------------------------------------------------------------------------------------------------
# bad input: a clear ValueError/TypeError before any launch (the CPU prepack checks the same)
def _int4_args(M=2, N=4, K=64, G=32):
    w_packed, scales, zeros = make_int4(N, K, G, gen(0))
    return [torch.randn(M, K), w_packed, scales, zeros, G]


INT4_BAD = [
    ("K odd", lambda a: [torch.randn(2, 63)] + a[1:], ValueError, "K // 2"),
    ("K not a multiple of group_size", lambda a: [torch.randn(2, 96), make_int4(4, 96, 32, gen(0))[0]] + a[2:4] + [64],
     ValueError, "multiple of group_size"),
    ("x int", lambda a: [a[0].to(torch.int32)] + a[1:], TypeError, "x must be"),
    ("w_packed int8", lambda a: [a[0], a[1].to(torch.int8)] + a[2:], TypeError, "w_packed must be uint8"),
    ("shapes do not chain", lambda a: [torch.randn(2, 128)] + a[1:], ValueError, "K // 2"),
    ("scales shape", lambda a: a[:2] + [a[2][:, :1]] + a[3:], ValueError, "scales must have shape"),
    ("zeros dtype", lambda a: a[:3] + [a[3].to(torch.int32)] + a[4:], TypeError, "zeros must be float"),
    ("group_size odd", lambda a: a[:4] + [3], ValueError, "group_size"),
]


@pytest.mark.parametrize("case", INT4_BAD, ids=[c[0] for c in INT4_BAD])
def test_int4_bad_input_raises_before_launch(monkeypatch, case):
    def refuse(*args, **kwargs):
        raise AssertionError("a kernel was launched")
    monkeypatch.setattr(int4_mm, "launch", refuse)
    _, mutate, exc, match = case
    with pytest.raises(exc, match=match):
        int4_mm.int4_matmul(*mutate(_int4_args()))
    with pytest.raises(exc, match=match):
        cpu.prepack_int4_cpu(*mutate(_int4_args())[1:]).matmul(mutate(_int4_args())[0])
