"""Quantization methods (tinyformer/compress/quantize.py): RTN, GPTQ, AWQ, SmoothQuant, QAT.

Each check compares against something computed independently of the code under test: hand-worked codes, the output
error ||dW X^T|| measured on explicit inputs X (not through the Hessian the methods use), the float model's own
outputs (folding must not change them), autograd through a plain float layer (the straight-through estimator).
Models are tiny (d_model 64) so that the file runs in seconds.
"""
import json

import pytest
import torch

import tinyformer
from tinyformer.compress import quantize_
from tinyformer.compress.calib import InputStats
from tinyformer.compress.quantize import (FakeQuantLinear, awq_clip, awq_search, convert_qat_, dequant, fold_scale_,
                                          gptq, input_groups, prepare_qat_, qat_finetune, rtn, smoothquant_scale)
from tinyformer.kernels import unpack_int4
from tinyformer.kernels.quant import sqnr
from tinyformer.kernels.reference import dequantize_int4
from tinyformer.model import Linear
from tinyformer.qlinear import Int4Linear, Int8Linear, W4A8Linear, W8A8Linear

TINY = dict(n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=128, vocab_size=256, max_seq_len=64)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return tinyformer.build("llama-tiny", **TINY).eval()  # RMSNorm, SwiGLU, RoPE, GQA 4 -> 2


def calib_ids(seed=1, n=8, t=32, vocab=256):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def stats_of(x):
    st = InputStats.empty(x.shape[1], hessian=True, device="cpu")
    st.add(x)
    return st


def out_err(dw, x):
    """||dW x^T||_F^2 on explicit inputs x (M, K): what tr(dW H dW^T) should equal, computed without H."""
    return float((x.double() @ dw.double().T).pow(2).sum())


def correlated_inputs(m=2048, k=256, seed=0):
    """Inputs with strongly correlated channels and a few large ones (what makes GPTQ and AWQ pay off)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(m, 16, generator=g)
    x = z @ torch.randn(16, k, generator=g) + 0.1 * torch.randn(m, k, generator=g)  # (M, K) rank ~16 + noise
    x[:, :4] *= 8.0
    return x


# ----------------------------------------------------------------------------------------------------------------------
# RTN
def test_rtn_hand_computed_and_float_zero_recovers_a_q4_1_grid():
    # asymmetric int4, one group [-1, 0, 0.62, 2]: lo=-1, hi=2, scale=3/15=0.2, zero=-round(-1/0.2)=5
    codes, scale, zero = rtn(torch.tensor([[-1.0, 0.0, 0.62, 2.0]]), 4, 4)
    assert codes.tolist() == [[0, 5, 8, 15]]
    assert torch.allclose(scale, torch.tensor([[0.2]])) and zero.tolist() == [[5.0]]
    # int8 per channel: absmax / 127
    codes, scale, zero = rtn(torch.tensor([[1.27, -0.5, 0.0], [0.0, 0.0, 0.0]]), 8)
    assert codes.tolist() == [[127, -50, 0], [0, 0, 0]] and torch.allclose(scale, torch.tensor([0.01, 1.0]))
    # a GGUF Q4_1 group is m + d * q with codes spanning 0..15: float_zero gets those codes and values back exactly,
    # the integer zero point cannot (m / d is not an integer)
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (8, 64), generator=g)
    q[:, ::32], q[:, 1::32] = 0, 15  # every group of 32 reaches both ends
    d = torch.rand(8, 2, generator=g) * 0.01 + 0.001
    m = -torch.rand(8, 2, generator=g) * 0.05
    w = m.repeat_interleave(32, 1) + d.repeat_interleave(32, 1) * q  # (8, 64)
    codes, scale, zero = rtn(w, 4, 32, float_zero=True)
    assert torch.equal(codes.long(), q)
    assert torch.allclose(dequant(codes, scale, zero, 4, 32), w, atol=1e-6)
    assert (dequant(*rtn(w, 4, 32), 4, 32) - w).abs().max() > 1e-4


def test_rtn_clip_shrinks_the_range():
    w = torch.tensor([[-4.0, -1.0, 0.5, 1.0]])
    codes, scale, zero = rtn(w, 4, 4, clip=torch.tensor([[0.5]]))  # range [-2, 0.5]: scale 2.5 / 15
    assert torch.allclose(scale, torch.tensor([[2.5 / 15]]))
    assert dequant(codes, scale, zero, 4, 4)[0, 0] == pytest.approx(-2.0, abs=1e-6)  # -4 clipped to -2


# ----------------------------------------------------------------------------------------------------------------------
# GPTQ
@pytest.mark.parametrize("bits,gs,act_order", [(4, 32, False), (4, 32, True), (4, 128, False), (8, -1, False)])
def test_gptq_equals_rtn_when_hessian_is_identity(bits, gs, act_order):
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(0))
    ref = rtn(w, bits, gs)
    got = gptq(w, torch.eye(128, dtype=torch.float64), bits, gs, act_order=act_order)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bits,gs,act_order,sym,clip", [
    (4, 32, False, False, False), (4, 128, False, False, False), (4, 128, True, False, False),
    (4, 32, False, True, False), (8, -1, False, True, False), (8, -1, True, True, False),
    (4, 96, False, False, False), (4, 96, True, False, False),  # 256 = 96 + 96 + 64: a ragged last group
    (4, 128, False, False, True), (4, 96, True, False, True), (8, -1, False, True, True)])  # ranges by clip search
def test_gptq_beats_rtn_on_correlated_inputs(bits, gs, act_order, sym, clip):
    x = correlated_inputs()
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1)) * 0.05
    w_rtn = dequant(*rtn(w, bits, gs, symmetric=sym), bits, gs)
    codes, scale, zero = gptq(w, x.double().T @ x.double(), bits, gs, symmetric=sym, act_order=act_order, clip=clip)
    lo, hi = (-127, 127) if bits == 8 else (0, 15)
    assert codes.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert int(codes.min()) >= lo and int(codes.max()) <= hi
    e_rtn, e_gptq = out_err(w_rtn - w, x), out_err(dequant(codes, scale, zero, bits, gs) - w, x)
    assert e_gptq < 0.7 * e_rtn, (e_gptq, e_rtn)


def test_gptq_dead_inputs_and_bad_hessian():
    x = correlated_inputs(512, 64)
    x[:, 5] = 0.0  # an input that is always zero
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    codes, scale, zero = gptq(w, x.double().T @ x.double(), 4, 32)
    wq = dequant(codes, scale, zero, 4, 32)
    assert torch.isfinite(wq).all() and torch.equal(wq[:, 5], torch.zeros(8))  # a dead input's weight becomes 0
    with pytest.raises(ValueError, match="hessian must be"):
        gptq(w, torch.eye(32), 4, 32)
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        gptq(w, torch.eye(64), 4, 0)


@pytest.mark.parametrize("bits", [8, 4])
def test_gptq_modules_hold_in_range_codes_and_match_dequantized_matmul(bits):
    model = tiny_llama()
    quantize_(model, bits=bits, group_size=32, method="gptq", calib=calib_ids())
    for name in ("attn.wq", "attn.wv", "mlp.w2"):
        lin = model.decoder.blocks[1].get_submodule(name)
        x = torch.randn(5, lin.n_in)
        if bits == 8:
            assert type(lin) is Int8Linear and int(lin.weight.abs().max()) <= 127
            w = lin.weight.float() * lin.scale[:, None]
        else:
            assert type(lin) is Int4Linear and int(unpack_int4(lin.weight_packed).max()) <= 15
            w = dequantize_int4(lin.weight_packed, lin.scales, lin.zeros, 32)
        ref = x @ w.T
        assert (lin(x) - ref).abs().max() <= 2 ** -7 * ref.abs().max()  # the CPU kernels round x to bf16


# ----------------------------------------------------------------------------------------------------------------------
# AWQ
def test_awq_scale_never_worse_than_rtn_and_helps_with_outlier_channels():
    x = correlated_inputs(1024, 128)
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(3)) * 0.05
    st = stats_of(x)
    s, alpha, errors = awq_search(w, st, 4, 32)
    e_rtn = out_err(dequant(*rtn(w, 4, 32), 4, 32) - w, x)
    e_awq = out_err(dequant(*rtn(w * s, 4, 32), 4, 32) / s - w, x)
    assert errors[0.0] * st.n == pytest.approx(e_rtn, rel=1e-4)  # alpha = 0 is s = 1 (errors are per row of X)
    assert e_awq <= e_rtn and e_awq < 0.9 * e_rtn, (e_awq, e_rtn)
    assert alpha > 0 and len(errors) == 20
    # the scale follows the activations: the 4 large channels get the largest scales
    assert set(s.argsort(descending=True)[:4].tolist()) == {0, 1, 2, 3}


def test_awq_clip_never_worse_per_group():
    x = correlated_inputs(1024, 64)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    w[0, 3] = 8.0  # one outlier weight: clipping its group pays off
    ratio = awq_clip(w, x.double().T @ x.double(), 4, 32)
    assert ratio.shape == (16, 2) and float(ratio.min()) >= 0.55 and float(ratio.max()) <= 1.0
    dw_clip = dequant(*rtn(w, 4, 32, clip=ratio), 4, 32) - w
    dw_rtn = dequant(*rtn(w, 4, 32), 4, 32) - w
    for g in range(2):
        cols = slice(32 * g, 32 * g + 32)
        for r in range(16):
            assert out_err(dw_clip[r:r + 1, cols], x[:, cols]) <= out_err(dw_rtn[r:r + 1, cols], x[:, cols]) * 1.0001


# ----------------------------------------------------------------------------------------------------------------------
# folding: the float model must compute the same function afterwards
FOLD_MODELS = {
    "llama (rmsnorm, swiglu, GQA)": ("llama-tiny", TINY,
                                     {"attn.wo": "attn.wv", "attn.wq": "norm1", "mlp.w2": "mlp.w3",
                                      "mlp.w1": "norm2"}),
    "gpt (layernorm+bias, relu)": ("baby-shakespeare-char", dict(n_layer=2, act="relu"),
                                   {"attn.wo": "attn.wv", "attn.wq": "norm1", "mlp.w2": "mlp.w1", "mlp.w1": "norm2"}),
    "gpt (gelu)": ("baby-shakespeare-char", dict(n_layer=1),
                   {"attn.wo": "attn.wv", "attn.wq": "norm1", "mlp.w2": None, "mlp.w1": "norm2"}),
    "bert (post-norm, gelu)": ("bert-mini", dict(n_layer=1, d_model=64, vocab_size=256, max_seq_len=32),
                               {"attn.wo": "attn.wv", "attn.wq": None, "mlp.w2": None, "mlp.w1": None}),
    "seq2seq (pre-norm, cross-attention)": ("seq2seq-small", dict(n_layer=1, n_decoder_layer=1, d_model=64),
                                            {"attn.wo": "attn.wv", "attn.wq": "norm1", "mlp.w1": "norm2",
                                             "cross_attn.wq": "norm_cross", "cross_attn.wk": None,
                                             "cross_attn.wo": "cross_attn.wv"}),
}


def _run(model, ids):
    if model.config.arch == "encoder-decoder":
        return model(ids, ids[:, :5])
    return model(ids)


@pytest.mark.parametrize("which", FOLD_MODELS)
@torch.no_grad()
def test_folding_leaves_the_float_model_unchanged(which):
    preset, kw, expected = FOLD_MODELS[which]
    torch.manual_seed(0)
    model = tinyformer.build(preset, **kw).eval()
    ids = calib_ids(vocab=model.config.vocab_size, n=2, t=12)
    ref = _run(model, ids)
    g = torch.Generator().manual_seed(5)
    for stack in (getattr(model, "encoder", None), getattr(model, "decoder", None)):
        for block in ([] if stack is None else stack.blocks):
            groups = input_groups(block)
            fold_of = {n: grp.fold for grp in groups for n in grp.names}
            for name, target in expected.items():
                if getattr(block, name.split(".")[0]) is not None:
                    assert fold_of[name] == target, (name, fold_of[name])
            for grp in groups:
                if grp.kind is None:
                    continue
                K = block.get_submodule(grp.names[0]).weight.shape[1]
                if grp.heads is not None:  # one scale per key/value channel, repeated over the heads sharing it
                    H, Hkv, Dh = grp.heads
                    s = (torch.rand(Hkv, 1, Dh, generator=g) * 1.5 + 0.5).expand(Hkv, H // Hkv, Dh).reshape(K)
                else:
                    s = torch.rand(K, generator=g) * 1.5 + 0.5
                fold_scale_(block, grp, s)
    out = _run(model, ids)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max()), (out - ref).abs().max()
    if which.startswith("llama"):  # GQA: a scale that differs between heads sharing a key/value head cannot fold
        grp = input_groups(model.decoder.blocks[0])[0]
        with pytest.raises(ValueError, match="query heads that share"):
            fold_scale_(model.decoder.blocks[0], grp, torch.rand(64) + 0.5)


# ----------------------------------------------------------------------------------------------------------------------
# SmoothQuant
def test_smoothquant_scale_hand_computed_and_lower_w8a8_error_with_outlier_channels():
    w = torch.tensor([[0.5, -2.0, 0.0], [1.0, 0.25, 0.0]])
    s = smoothquant_scale(w, torch.tensor([4.0, 1.0, 3.0]), alpha=0.5)
    assert torch.allclose(s, torch.tensor([4.0 ** 0.5 / 1.0, 1.0 / 2.0 ** 0.5, 1.0]))  # dead weight column: 1
    g = torch.Generator().manual_seed(6)
    x = torch.randn(256, 128, generator=g)
    x[:, [3, 40, 77]] *= 40.0  # activation outlier channels (SmoothQuant Fig. 4)
    w = torch.randn(48, 128, generator=g) * 0.05
    b = torch.randn(48, generator=g) * 0.01
    ref = x.double() @ w.double().T + b.double()
    plain = W8A8Linear.from_weight(w, b)
    s = smoothquant_scale(w, x.abs().amax(0))
    smooth = W8A8Linear(48, 128, True, smooth=True)
    codes, scale, _ = rtn(w * s, 8)
    smooth.weight.copy_(codes), smooth.scale.copy_(scale), smooth.bias.copy_(b), smooth.smooth.copy_(s)
    e_plain, e_smooth = (plain(x).double() - ref).norm(), (smooth(x).double() - ref).norm()
    assert e_smooth < 0.5 * e_plain, (e_smooth, e_plain)


# ----------------------------------------------------------------------------------------------------------------------
# QAT
def test_qat_straight_through_gradient_equals_float_layer_at_dequantized_weight():
    torch.manual_seed(7)
    lin = Linear(64, 24)
    lin.reset_parameters()
    fq = FakeQuantLinear(lin, 4, 32)
    x = torch.randn(5, 64, requires_grad=True)
    gy = torch.randn(5, 24)
    (fq(x) * gy).sum().backward()
    wd = dequant(*rtn(lin.weight.detach(), 4, 32), 4, 32).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    ((x2 @ wd.T + lin.bias.detach()) * gy).sum().backward()
    assert torch.allclose(lin.weight.grad, wd.grad, atol=1e-6)
    assert torch.allclose(x.grad, x2.grad, atol=1e-6)
    assert not torch.equal(wd.detach(), lin.weight.detach())  # the forward really used the quantized weight


def test_qat_converts_to_the_grid_it_trained_on_and_beats_rtn_on_its_data():
    ids = calib_ids(n=8, t=33)

    def loss(m):
        with torch.no_grad():
            logits = m(ids[:, :-1])
        return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()))

    rtn_model = quantize_(tiny_llama(), bits=4, group_size=32)
    model = prepare_qat_(tiny_llama(), bits=4, group_size=32)
    losses = qat_finetune(model, ids, steps=10, lr=3e-3)
    assert losses[-1] < losses[0]
    with tinyformer.use_backend("reference"), torch.no_grad():  # fp32 int4 matmul: conversion must be exact
        fake = model(ids)
        convert_qat_(model)
        assert type(model.decoder.blocks[0].mlp.w1) is Int4Linear
        assert torch.allclose(model(ids), fake, atol=1e-4)
    assert loss(model) < loss(rtn_model) - 0.1


# ----------------------------------------------------------------------------------------------------------------------
# the verb: every method runs, saves and loads
@pytest.mark.parametrize("kw", [dict(bits=4, group_size=32, symmetric=True), dict(bits=4, group_size=32,
                                                                                    float_zero=True),
                                dict(bits=4, group_size=32, method="gptq", act_order=True),
                                dict(bits=8, method="gptq"), dict(bits=4, group_size=32, method="awq"),
                                dict(bits=8, activations=True, method="smoothquant"),
                                dict(bits=4, group_size=32, activations=True),
                                dict(bits=4, group_size=32, method="gptq", activations=True),
                                dict(bits=8, method="qat", steps=2)])
def test_every_method_round_trips(kw, tmp_path):
    float_model, model = tiny_llama(), tiny_llama()
    ids = calib_ids(n=2, t=16)
    with torch.no_grad():
        ref = float_model(ids)
    quantize_(model, calib=calib_ids() if kw.get("method", "rtn") != "rtn" else None, **kw)
    assert not any(type(m) is Linear for m in model.modules())
    if kw["bits"] == 4 and kw.get("activations"):  # W4A8: 32 rows here, so the products take the W4A8 path
        assert all(type(m) is W4A8Linear for m in model.modules() if isinstance(m, Int4Linear))
    with torch.no_grad():
        out = model(ids)
    assert sqnr(ref, out) > (12.0 if kw["bits"] == 4 else 25.0)
    model.save(tmp_path / "q")
    loaded = tinyformer.load(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(ids), out)


@pytest.mark.parametrize("tie", [True, False])
def test_head_true_quantizes_the_output_head_per_row_and_round_trips(tie, tmp_path):
    torch.manual_seed(0)
    model = tinyformer.build("llama-tiny", **TINY, tie_embeddings=tie).eval()
    w = (model.wte if tie else model.lm_head).detach().clone()  # (V, C)
    wte = model.wte.detach().clone()
    quantize_(model, bits=4, group_size=32, head=True)
    head = model.lm_head
    assert type(head) is Int8Linear and torch.equal(model.wte, wte)  # the lookup keeps the float embedding
    scale = w.abs().amax(1) / 127  # per row, symmetric, by hand
    assert torch.allclose(head.scale, scale) and torch.equal(head.weight, torch.round(w / scale[:, None]).to(torch.int8))
    h = torch.randn(3, 5, TINY["d_model"])
    exact = h @ (head.weight.float() * scale[:, None]).T  # (3, 5, V)
    bound = (h.abs() @ w.abs().T) * 2 ** -7 + 1e-6  # the kernel may round its input to bf16
    assert ((model.logits(h) - exact).abs() <= bound).all()
    model.save(tmp_path / "q")
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]["lm_head"] == {"scheme": "int8"}
    loaded, ids = tinyformer.load(tmp_path / "q"), calib_ids(n=2, t=16)
    with torch.no_grad():
        assert type(loaded.lm_head) is Int8Linear and torch.equal(loaded(ids), model(ids))
    with pytest.raises(ValueError, match="head is already quantized"):
        quantize_(loaded, bits=8, head=True)


def test_smoothquant_on_a_post_norm_encoder_uses_run_time_smoothing_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = tinyformer.build("bert-mini", n_layer=1, d_model=64, vocab_size=256, max_seq_len=32).eval()
    ids = calib_ids(n=4, t=16)
    with torch.no_grad():
        ref = model(ids)
    quantize_(model, bits=8, activations=True, method="smoothquant", calib=ids)
    block = model.encoder.blocks[0]
    assert block.attn.wq.smooth is not None and block.mlp.w2.smooth is not None  # post-norm / GELU: not foldable
    assert block.attn.wo.smooth is None  # folded into wv
    with torch.no_grad():
        out = model(ids)
    assert sqnr(ref, out) > 25.0
    model.save(tmp_path / "sq")
    record = json.loads((tmp_path / "sq" / "config.json").read_text())["quantization"]
    assert record["encoder.blocks.0.attn.wq"] == {"scheme": "w8a8", "smooth": True}
    with torch.no_grad():
        assert torch.equal(tinyformer.load(tmp_path / "sq")(ids), out)


def test_quantize_rejects_bad_arguments():
    model, ids = tiny_llama(), calib_ids()
    for kw, match in [(dict(method="gptq"), "needs calibration data"), (dict(method="awq"), "needs calibration"),
                      (dict(method="spqr", calib=ids), "method must be one of"),
                      (dict(bits=4, method="smoothquant", calib=ids), "is for W8A8"),
                      (dict(bits=8, method="gptq", activations=True, calib=ids), "'rtn' or 'smoothquant'"),
                      (dict(bits=4, group_size=48, activations=True), "power-of-two group_size"),
                      (dict(bits=8, float_zero=True), "asymmetric int4"),
                      (dict(bits=4, float_zero=True, symmetric=True), "asymmetric int4"),
                      (dict(method="gptq", calib=ids, percdamp=-1), "percdamp"),
                      (dict(method="awq", calib=ids, n_grid=0), "n_grid"),
                      (dict(method="smoothquant", activations=True, calib=ids, alpha=1.5), "alpha"),
                      (dict(method="qat", calib=ids, lr=0), "lr must be"),
                      (dict(method="gptq", calib=torch.randn(2, 8)), "integer token-id"),
                      (dict(method="gptq", calib=torch.full((2, 8), 999)), "outside the vocabulary")]:
        with pytest.raises(ValueError, match=match):
            quantize_(model, **kw)
    with pytest.raises(TypeError, match="InputStats"):
        awq_search(torch.randn(4, 8), torch.ones(8))
    with pytest.raises(TypeError, match="w must be a float tensor"):
        rtn(torch.ones(4, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="w must be a 2-D weight"):
        rtn(torch.randn(8))
    with pytest.raises(ValueError, match="clip must have the shape of the scales"):
        rtn(torch.randn(4, 64), 4, 32, clip=torch.ones(4))
    with pytest.raises(ValueError, match="bits must be an int in 2..8"):
        rtn(torch.randn(4, 64), 9, 32)
    assert all(type(m) is Linear for n, m in model.named_modules() if n.endswith("wq"))  # nothing was changed
