"""The dispatch (tinyformer.ops): which product runs a linear for a device, dtype and shape, and that each gives the
plain product's values: bf16 rows in fp32 where oneDNN has no bf16, stacked projections (q/k/v, gate/up) as one
product outside autograd, prepared weight layouts that follow their weights. And attention over packed documents
(cu_seqlens) on every backend: each document gets the output and gradients it gets alone."""
import pytest
import torch

import helpers
from tinyformer import ops
from tinyformer.compress import quantize_
from tinyformer.kernels import cpu, device


def _decode_logits(model, ids, tokens):
    """The logits (n, V) of `tokens` decoded one at a time after the prompt `ids`, with a KV cache."""
    cache = model.new_cache(1, ids.shape[1] + len(tokens))
    model(ids, cache=cache)
    return torch.cat([model(torch.tensor([[t]]), cache=cache)[:, -1] for t in tokens]).float()


@pytest.mark.parametrize("rows", [1, ops.BF16_UPCAST_ROWS])
def test_bf16_linear_without_onednn_bf16_runs_in_fp32_and_matches(rows, monkeypatch):
    """On a CPU without oneDNN bf16 a bf16 product of many rows runs in fp32 (aten's bf16 matmul is a GEMV a row
    there): the same bf16 values (both accumulate in fp32; at most one bf16 rounding apart), gradients in bf16."""
    monkeypatch.setattr(ops, "onednn_bf16", lambda: False)
    used = []
    real_linear = ops.F.linear
    monkeypatch.setattr(ops.F, "linear", lambda x, w, b=None: used.append(x.dtype) or real_linear(x, w, b))
    torch.manual_seed(0)
    x = torch.randn(rows, 64, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(48, 64, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(48, dtype=torch.bfloat16)
    y = ops.linear(x, w, b)
    assert used == [torch.float32 if rows >= ops.BF16_UPCAST_ROWS else torch.bfloat16]
    assert y.dtype == torch.bfloat16
    truth = x.detach().double() @ w.detach().double().T + b.double()
    torch.testing.assert_close(y.double(), truth, rtol=2 ** -7, atol=2 ** -7 * float(truth.abs().max()))
    y.sum().backward()
    assert x.grad.dtype == w.grad.dtype == torch.bfloat16
    torch.testing.assert_close(w.grad.double(), x.detach().double().sum(0).expand(48, 64), rtol=2 ** -7, atol=0.1)


@pytest.mark.parametrize("kind", ["bf16", "int8", "int4", "int4-ragged"])
def test_stacked_projections_equal_one_product_each_and_leave_hooked_layers_alone(kind):
    """ops.linears runs layers of one scheme that read one input as one product outside autograd (the same values
    as a call each, up to the kernels' summation order), and calls each layer itself when any has a hook (so
    calibration sees every input) or when autograd is on."""
    if kind == "bf16" and not ops.onednn_bf16():
        pytest.skip("oneDNN has no bf16 on this CPU (AVX2 only)")
    d_model = 96 if kind == "int4-ragged" else 64  # 96 at group 64: a ragged last group
    model = helpers.tiny(act="swiglu", d_model=d_model, d_ff=128, bias=True, n_kv_head=2)
    if kind == "bf16":
        model.to(torch.bfloat16)
    else:
        quantize_(model, bits=8 if kind == "int8" else 4, group_size=32 if d_model == 64 else 64)
    attn = model.decoder.blocks[0].attn
    layers = (attn.wq, attn.wk, attn.wv)
    x = torch.randn(2, 5, d_model).to(model.wte.dtype if kind == "bf16" else torch.float32)
    with torch.no_grad():
        one_each = [m(x) for m in layers]
        stacked = ops.linears(x, *layers)
        seen = []
        handle = attn.wk.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        hooked = ops.linears(x, *layers)
        handle.remove()
    assert [y.shape for y in stacked] == [y.shape for y in one_each] == [(2, 5, d_model)] + [(2, 5, d_model // 2)] * 2
    tol = 2e-2 if kind == "bf16" else 1e-5
    for a, b in zip(stacked, one_each):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
    assert len(seen) == 1 and seen[0] is x  # the hooked layer was called on its own input
    for a, b in zip(hooked, one_each):
        assert torch.equal(a, b)


def test_a_prepared_layout_follows_its_weight():
    """The layout is made once per weight and reused; an in-place change of the weight, or a cast of the model,
    prepares a new one, so a product never sees stale weights."""
    if not ops.onednn_bf16():
        pytest.skip("oneDNN has no bf16 on this CPU (AVX2 only)")
    torch.manual_seed(0)
    w = torch.randn(48, 64, dtype=torch.bfloat16)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        y = ops.linear(x, w)
        first = cpu._layouts[("", id(w.untyped_storage()))][2]
        torch.testing.assert_close(ops.linear(x, w), y, rtol=0, atol=0)
        assert cpu._layouts[("", id(w.untyped_storage()))][2] is first  # reused
        w.mul_(-2)
        torch.testing.assert_close(ops.linear(x, w).float(), -2 * y.float(), rtol=2e-2, atol=2e-2)
        assert cpu._layouts[("", id(w.untyped_storage()))][2] is not first
    model = helpers.tiny(act="swiglu", d_model=64, vocab_size=30, pos="rope", n_kv_head=2).eval()
    ids = torch.randint(0, 30, (1, 6))
    with torch.no_grad():
        before = _decode_logits(model.to(torch.bfloat16), ids, [3, 7])
        model.to(torch.float32).wte.data.mul_(0.5)  # the same Parameter objects, other tensors
        after = _decode_logits(model.to(torch.bfloat16), ids, [3, 7])
    expect = _decode_logits(model, ids, [3, 7]).detach()  # autograd on: F.linear on the weights as they are now
    torch.testing.assert_close(after, expect, rtol=2e-2, atol=2e-2)
    assert (after - before).abs().max() > 0.1


# (backend, dtype, tolerance): the documents alone and packed differ only in summation order (fp32: ~1 ulp of
# sums over <= 40 terms); bf16 on the torch path runs attention in fp32 (the CPU training note in ops.attention),
# so packed and alone round to the same bf16 values up to one bf16 step
PACKED_BACKENDS = [
    pytest.param("reference", torch.float32, 1e-5, id="reference"),
    pytest.param("torch", torch.float32, 1e-5, id="torch"),
    pytest.param("torch", torch.bfloat16, 2 ** -7, id="torch-bf16"),
    pytest.param("triton", torch.float32, 1e-5, id="triton", marks=pytest.mark.skipif(
        not device.HAS_TRITON or not (torch.cuda.is_available() or device.INTERPRET),
        reason="needs triton and a CUDA device or TRITON_INTERPRET=1")),
]


@pytest.mark.parametrize("backend, dtype, tol", PACKED_BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_packed_documents_attend_as_if_alone(backend, dtype, tol, causal):
    """Two rows of T = 48 packing documents of 5, 30 and 13 (the last: the row's padding) and 1, 40 and 7 tokens:
    ops.attention with cu_seqlens gives each document the output, and q/k/v gradients, that it gets alone in a
    batch of its own. q is a transposed (B, T, H, D) view, as the model passes it."""
    lens, B, T, Hq, Hkv, D = [5, 30, 13, 1, 40, 7], 2, 48, 4, 2, 16
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, Hq, D, generator=g).to(dev, dtype).transpose(1, 2).requires_grad_()  # (B, Hq, T, D)
    k, v = (torch.randn(B, Hkv, T, D, generator=g).to(dev, dtype).requires_grad_() for _ in range(2))
    do = torch.randn(B, Hq, T, D, generator=g).to(dev, dtype)
    with ops.use_backend(backend):
        out = ops.attention(q, k, v, causal=causal, cu_seqlens=cu)
        out.backward(do)
        starts = cu.tolist()
        for s, e in zip(starts[:-1], starts[1:]):
            b, i, j = s // T, s % T, s % T + (e - s)
            leaves = [t.detach()[b:b + 1, :, i:j].clone().requires_grad_() for t in (q, k, v)]  # (1, H, e - s, D)
            alone = ops.attention(*leaves, causal=causal)
            alone.backward(do[b:b + 1, :, i:j])
            for name, packed, single in zip(("out", "dq", "dk", "dv"), (out, q.grad, k.grad, v.grad),
                                            (alone, *(t.grad for t in leaves))):
                helpers.assert_close(packed[b:b + 1, :, i:j], single, atol=tol * max(1.0, single.abs().max().item()),
                                     name=f"{backend} {name} of document [{s}, {e})")
