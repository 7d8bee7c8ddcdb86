"""Tests of the pure-torch references (kernels/reference.py) against independent computations, and of the int4
packing the ops share: per-token quantization round trips, pack/unpack in API.md's layout, bad input rejected, the
causal rule of attention spelled out on a small case, exact int8 accumulation, int4 dequantization by hand."""
import pytest
import torch
from helpers import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_inputs import gen, make_int4, rand_int8

from tinyformer.kernels import pack_int4, reference, unpack_int4

QUICK = settings(max_examples=60, deadline=None, derandomize=True)


@QUICK
@given(M=st.integers(1, 9), K=st.integers(1, 300), scale=st.sampled_from([1e-3, 1.0, 50.0]),
       seed=st.integers(0, 2 ** 16))
def test_quantize_per_token_reference(M, K, scale, seed):
    x = torch.randn(M, K, generator=gen(seed)) * scale
    x[0] = 0.0  # an all-zero token
    q, s = reference.quantize_per_token(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (M,)
    assert int(q.min()) >= -127 and s[0] == 1.0 and not q[0].any()
    assert_close(q.float() * s[:, None], x, atol=s[:, None] * (0.5 + 1e-5), name="per-token round trip")


@QUICK
@given(N=st.integers(1, 9), K2=st.integers(0, 40), seed=st.integers(0, 2 ** 16))  # N = 0: reference.unpack_int4 fails
def test_pack_unpack_round_trip(N, K2, seed):
    q = torch.randint(0, 16, (N, 2 * K2), dtype=torch.uint8, generator=gen(seed))
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (N, K2)
    assert torch.equal(unpack_int4(packed), q)
    if N and K2:  # the layout API.md fixes: column 2j in the low nibble, 2j + 1 in the high nibble
        assert int(packed[0, 0]) == int(q[0, 0]) | (int(q[0, 1]) << 4)
    b = torch.randint(0, 256, (N, K2), dtype=torch.uint8, generator=gen(seed + 1))
    assert torch.equal(pack_int4(unpack_int4(b)), b)


@pytest.mark.parametrize("bad,exc,match", [
    (torch.tensor([[0, 16]], dtype=torch.uint8), ValueError, "0..15"),
    (torch.zeros(2, 3, dtype=torch.uint8), ValueError, "even"),
    (torch.zeros(2, 4, dtype=torch.int32), TypeError, "uint8"),
    (torch.zeros(8, dtype=torch.uint8), ValueError, "2-D"),
])
def test_pack_int4_rejects(bad, exc, match):
    with pytest.raises(exc, match=match):
        pack_int4(bad)


def test_attention_causal_rule_is_bottom_right_aligned():
    """Query i sees keys j <= i + (Tk - Tq): with Tq = 2, Tk = 3 the first query sees keys 0..1, the second all three;
    with Tq = 3, Tk = 2 the first query sees nothing and gives 0."""
    assert reference.attention_mask(2, 3, causal=True)[0, 0].tolist() == [[True, True, False], [True, True, True]]
    g = gen(0)
    q, k, v = (torch.randn(1, 1, T, 16, generator=g) for T in (3, 2, 2))  # Tq = 3 > Tk = 2
    out = reference.attention(q, k, v, causal=True)
    assert torch.equal(out[0, 0, 0], torch.zeros(16))
    s = (q[0, 0, 2] @ k[0, 0].T) * 16 ** -0.5  # the last query sees both keys
    assert_close(out[0, 0, 2], torch.softmax(s, -1) @ v[0, 0], atol=1e-6, name="last row")


def test_attention_gqa_shares_each_kv_head_with_its_group():
    g = gen(1)
    q, k, v = (torch.randn(2, H, T, 16, generator=g) for H, T in ((4, 5), (2, 7), (2, 7)))  # GQA 4 / 2
    out = reference.attention(q, k, v)
    for h in range(4):  # query head h reads kv head h // 2
        one = reference.attention(q[:, h:h + 1], k[:, h // 2:h // 2 + 1], v[:, h // 2:h // 2 + 1])
        assert torch.equal(out[:, h:h + 1], one)


def test_int8_references_accumulate_exactly():
    g = gen(2)
    a, b = rand_int8(3, 70, gen=g), rand_int8(5, 70, gen=g)
    want = [[sum(int(a[i, t]) * int(b[j, t]) for t in range(70)) for j in range(5)] for i in range(3)]
    assert reference.int8_matmul_int32(a, b).tolist() == want
    sa, sb = torch.rand(3, generator=g), torch.rand(5, generator=g)
    assert_close(reference.int8_matmul(a, b, sa, sb), torch.tensor(want).double() * sa.double()[:, None] * sb.double(),
                 rtol=1e-6, name="scaled")


def test_dequantize_int4_by_hand():
    g = gen(3)
    w_packed, scales, zeros = make_int4(3, 64, 32, g, zero_float=True)
    q = unpack_int4(w_packed).double()  # (3, 64)
    want = torch.stack([(q[:, k] - zeros[:, k // 32].double()) * scales[:, k // 32].double() for k in range(64)], 1)
    assert_close(reference.dequantize_int4(w_packed, scales, zeros, 32), want, rtol=1e-6, name="w")
