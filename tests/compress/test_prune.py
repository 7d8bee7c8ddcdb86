"""Tests of tinyformer.compress.prune: the score and mask primitives against hand-computed cases, exact sparsity and
2:4 structure, structured pruning (shapes shrink, the model runs, generates, saves and loads; removing exactly-zero
heads or neurons changes nothing, removing live ones does), the cubic schedule and masks kept through fine-tuning,
and the errors. Tiny models only: the whole file runs in seconds on a CPU."""
import pytest
import torch

import tinyformer
from tinyformer.compress import calib as C
from tinyformer.compress import prune_, prune_iterative_
from tinyformer.checkpoint import structure_record
from tinyformer.compress.prune import (apply_structure, cubic_sparsity, head_scores, magnitude_scores, neuron_scores,
                                       nm_mask, shrink_attention_, unstructured_mask, wanda_scores)

V = 61


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=48, vocab_size=V, max_seq_len=32)
    return tinyformer.build("llama-tiny", **{**cfg, **kw}).eval()


def ids(n=4, t=16, seed=1):
    return torch.randint(0, V, (n, t), generator=torch.Generator().manual_seed(seed))


def block_weights(model):
    return {n: m.weight for n, m in model.named_modules() if type(m) is tinyformer.model.Linear}


# ----------------------------------------------------------------------------------------------------------------------
# primitives against hand-computed cases
W = torch.tensor([[0.1, -2.0, 0.3, 4.0],
                  [-1.0, 0.2, -3.0, 0.05]])
NORM = torch.tensor([10.0, 0.1, 1.0, 0.01])  # ||X_j||: column 0 meets large inputs, column 3 tiny ones


def test_scores_by_hand():
    assert torch.equal(magnitude_scores(W), W.abs())
    expected = torch.tensor([[1.0, 0.2, 0.3, 0.04],
                             [10.0, 0.02, 3.0, 0.0005]])
    torch.testing.assert_close(wanda_scores(W, NORM), expected)


def test_magnitude_layer_mask_by_hand():
    # 50% of 8 weights: the 4 smallest |W| of the whole matrix are 0.05, 0.1, 0.2, 0.3 (two in each row here)
    keep = unstructured_mask(magnitude_scores(W), 0.5)
    assert keep.tolist() == [[False, True, False, True], [True, False, True, False]]
    # 25%: the 2 smallest, 0.05 and 0.1, sit in different rows; per layer does not balance rows
    keep = unstructured_mask(magnitude_scores(W), 0.25)
    assert keep.tolist() == [[False, True, True, True], [True, True, True, False]]
    # 3/8 per layer: 0.05, 0.1, 0.2 -> row 0 loses one, row 1 two
    keep = unstructured_mask(magnitude_scores(W), 0.375)
    assert keep.sum(1).tolist() == [3, 2]


def test_wanda_row_mask_by_hand_and_differs_from_magnitude():
    # wanda scores row 0: [1.0, 0.2, 0.3, 0.04] -> keep cols 0, 2; row 1: [10, 0.02, 3, 0.0005] -> keep cols 0, 2
    keep = unstructured_mask(wanda_scores(W, NORM), 0.5, per_row=True)
    assert keep.tolist() == [[True, False, True, False], [True, False, True, False]]
    # magnitude alone keeps the large weights -2.0 and 4.0 of row 0, which meet tiny inputs
    mag = unstructured_mask(magnitude_scores(W), 0.5, per_row=True)
    assert mag.tolist() == [[False, True, False, True], [True, False, True, False]]
    # and that choice is worse on inputs with these column norms: the output error ||(W - W') x|| for x = NORM
    err = lambda k: float(((W * ~k) @ NORM).abs().sum())  # noqa: E731
    assert err(keep) < err(mag)


def test_nm_mask_by_hand():
    s = torch.tensor([[1.0, 5.0, 3.0, 2.0, 0.0, -1.0, 7.0, 6.0]])
    assert nm_mask(s, 2, 4).tolist() == [[False, True, True, False, False, False, True, True]]
    assert nm_mask(s, 1, 4).tolist() == [[False, True, False, False, False, False, True, False]]


@pytest.mark.parametrize("shape", [(7, 12), (33, 20)])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_exact_sparsity_even_with_ties(shape, sparsity):
    s = torch.randint(0, 3, shape).float()  # many ties
    n = shape[0] * shape[1]
    assert int((~unstructured_mask(s, sparsity)).sum()) == int(sparsity * n + 0.5)
    per_row = ~unstructured_mask(s, sparsity, per_row=True)
    assert per_row.sum(1).tolist() == [int(sparsity * shape[1] + 0.5)] * shape[0]


def test_nm_mask_exactly_n_of_every_m():
    s = torch.randn(9, 24)
    keep = nm_mask(s, 2, 4)
    assert (keep.reshape(9, 6, 4).sum(-1) == 2).all()
    # the kept two are the two largest of each group (brute force)
    for r in range(9):
        for g in range(6):
            grp = s[r, 4 * g:4 * g + 4]
            assert set(torch.nonzero(keep[r, 4 * g:4 * g + 4]).flatten().tolist()) == \
                set(sorted(range(4), key=lambda j: -grp[j])[:2])


def test_cubic_schedule():
    assert cubic_sparsity(0, 10, 0.8) == 0.0
    assert cubic_sparsity(10, 10, 0.8) == pytest.approx(0.8)
    assert cubic_sparsity(5, 10, 0.8) == pytest.approx(0.8 - 0.8 * 0.125)  # 1 - (1/2)^3 of the way
    assert cubic_sparsity(20, 10, 0.8, 0.1) == pytest.approx(0.8)
    steps = [cubic_sparsity(k, 10, 0.5) for k in range(11)]
    assert all(b > a for a, b in zip(steps, steps[1:]))
    assert all(b - a < a - z for z, a, b in zip(steps, steps[1:], steps[2:]))  # fast first, slow near the end


def test_head_and_neuron_scores_by_hand():
    # 4 query heads of width 1 in 2 KV groups; wo (C=2, 4)
    wo = torch.tensor([[1.0, -2.0, 0.0, 0.5],
                       [0.0, 1.0, -0.5, 0.0]])
    assert head_scores(wo, 4, 2).tolist() == [4.0, 1.0]  # group 0 = heads 0, 1; group 1 = heads 2, 3
    assert head_scores(wo, 4, 4).tolist() == [1.0, 3.0, 0.5, 0.5]
    norm = torch.tensor([1.0, 0.0, 4.0, 2.0])
    assert head_scores(wo, 4, 2, norm).tolist() == [1.0, 3.0]
    assert neuron_scores(wo).tolist() == [1.0, 3.0, 0.5, 0.5]
    assert neuron_scores(wo, norm).tolist() == [1.0, 0.0, 2.0, 1.0]


# ----------------------------------------------------------------------------------------------------------------------
# the verb on a model
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_prune_model_sparsity_runs_saves_loads(method, pattern, tmp_path):
    model = tiny()
    x = ids(2, 10, seed=5)
    before = {n: w.clone() for n, w in block_weights(model).items()}
    prune_(model, 0.5, method, pattern, calib=ids())
    for name, w in block_weights(model).items():
        zero = w == 0
        assert float(zero.float().mean()) == 0.5, name
        if pattern == "2:4":
            assert (zero.reshape(w.shape[0], -1, 4).sum(-1) == 2).all(), name
        elif method == "wanda":
            assert (zero.sum(1) == w.shape[1] // 2).all(), name  # every row pruned to the same share
        assert torch.equal(w[~zero], before[name][~zero]), name  # kept weights untouched
        assert model.pruning["layers"][name] == 0.5
    assert model.wte.count_nonzero() == model.wte.numel()  # embeddings and tied head are not pruned
    y = model(x)
    model.save(tmp_path)
    loaded = tinyformer.load(tmp_path)
    torch.testing.assert_close(loaded(x), y, rtol=0, atol=1e-5)
    assert loaded.pruning["method"] == method and loaded.pruning["pattern"] == pattern
    assert loaded.generate(x[:1, :4], 6, temperature=0).shape == (1, 10)


def test_wanda_uses_the_pruned_earlier_blocks_and_differs_from_magnitude():
    model = tiny()
    # give one input feature of every block huge activations: Wanda must keep the weights that read it
    with torch.no_grad():
        model.wte[:, 3] *= 50
    mag = prune_(tiny(), 0.5, "magnitude")
    wanda = prune_(model, 0.5, "wanda", calib=ids())
    m0, w0 = mag.decoder.blocks[0].attn.wq.weight, wanda.decoder.blocks[0].attn.wq.weight
    assert not torch.equal(m0 == 0, w0 == 0)
    assert (w0[:, 3] != 0).all()  # the loud column survives in every row under Wanda

    # block 1 is scored on the outputs of the already-pruned block 0: recompute its input norms by hand
    ref = tiny()
    with torch.no_grad():
        ref.wte[:, 3] *= 50
    unpruned_norm = C.model_stats(ref, ids())["decoder.blocks.1.mlp.w2"].col_norm  # one pass, nothing pruned

    def by_hand(block, stats):
        for n, lin in C.linears(block):
            lin.weight.mul_(unstructured_mask(wanda_scores(lin.weight, stats[n].col_norm), 0.5, per_row=True))

    C.blockwise(ref, ids(), by_hand, hessian=False)
    w2 = block_weights(wanda)["decoder.blocks.1.mlp.w2"]
    assert torch.equal(block_weights(ref)["decoder.blocks.1.mlp.w2"], w2)
    # scored on the unpruned model's activations instead, block 1 would have kept other weights
    w2_dense = block_weights(tiny())["decoder.blocks.1.mlp.w2"]
    stale = unstructured_mask(wanda_scores(w2_dense, unpruned_norm), 0.5, per_row=True)
    assert not torch.equal(stale, w2 != 0)


def test_zero_heads_are_the_ones_removed_and_outputs_do_not_change(tmp_path):
    model = tiny(n_layer=1, n_head=6, n_kv_head=3, d_model=48)  # 3 KV groups of 2 query heads, Dh = 8
    attn = model.decoder.blocks[0].attn
    with torch.no_grad():
        attn.wo.weight[:, 16:32] = 0  # group 1 (query heads 2, 3) writes nothing
    x = ids(2, 12, seed=7)
    y = model(x)
    wq, wk, wo = attn.wq.weight.clone(), attn.wk.weight.clone(), attn.wo.weight.clone()
    params = model.num_params()
    prune_(model, 1 / 3, "magnitude", "heads")
    assert (attn.n_head, attn.n_kv_head) == (4, 2)
    keep_q = torch.cat([torch.arange(0, 16), torch.arange(32, 48)])
    keep_kv = torch.cat([torch.arange(0, 8), torch.arange(16, 24)])
    assert torch.equal(attn.wq.weight, wq[keep_q]) and torch.equal(attn.wk.weight, wk[keep_kv])
    assert torch.equal(attn.wo.weight, wo[:, keep_q])
    assert model.num_params() == params - 48 * 16 * 2 - 48 * 8 * 2  # wq rows + wo cols, wk + wv rows
    torch.testing.assert_close(model(x), y, rtol=0, atol=1e-5)
    assert structure_record(model) == {"decoder.blocks.0.attn": {"n_head": 4, "n_kv_head": 2}}
    # removing a live group instead does change the outputs (the check above can fail)
    other = tiny(n_layer=1, n_head=6, n_kv_head=3, d_model=48)
    with torch.no_grad():
        other.decoder.blocks[0].attn.wo.weight[:, 16:32] = 0
    shrink_attention_(other.decoder.blocks[0].attn, [1, 2])
    assert (other(x) - y).abs().max() > 1e-3
    # generate (per-layer KV cache) and save/load
    out = model.generate(x[:1, :5], 7, temperature=0)
    model.save(tmp_path)
    cfg = (tmp_path / "config.json").read_text()
    assert '"structure"' in cfg and '"n_kv_head": 2' in cfg
    loaded = tinyformer.load(tmp_path)
    assert loaded.decoder.blocks[0].attn.n_head == 4
    torch.testing.assert_close(loaded(x), y, rtol=0, atol=1e-5)
    assert torch.equal(loaded.generate(x[:1, :5], 7, temperature=0), out)


def test_zero_neurons_are_the_ones_removed_and_outputs_do_not_change(tmp_path):
    model = tiny()
    dead = [1, 5, 6, 17, 30, 41, 42, 47, 2, 3, 9, 20]  # 12 of 48 = 25%
    with torch.no_grad():
        for b in model.decoder.blocks:
            b.mlp.w2.weight[:, dead] = 0
    x = ids(2, 12, seed=8)
    y = model(x)
    w1 = model.decoder.blocks[1].mlp.w1.weight.clone()
    prune_(model, 0.25, "wanda", "neurons", calib=ids())
    alive = [i for i in range(48) if i not in dead]
    for b in model.decoder.blocks:
        assert b.mlp.w1.weight.shape == (36, 32) and b.mlp.w3.weight.shape == (36, 32)
        assert b.mlp.w2.weight.shape == (32, 36)
    assert torch.equal(model.decoder.blocks[1].mlp.w1.weight, w1[alive])
    torch.testing.assert_close(model(x), y, rtol=0, atol=1e-5)
    model.save(tmp_path)
    loaded = tinyformer.load(tmp_path)
    assert loaded.decoder.blocks[0].mlp.w2.weight.shape == (32, 36)
    torch.testing.assert_close(loaded(x), y, rtol=0, atol=1e-5)
    # a live neuron removed changes the outputs
    other = tiny()
    prune_(other, 0.25, "magnitude", "neurons")
    assert (other(x) - y).abs().max() > 1e-3


def test_structured_pruning_shrinks_gpt2_style_mha_and_encoder_decoder(tmp_path):
    torch.manual_seed(0)
    gpt = tinyformer.build("baby-shakespeare-char", n_layer=2, vocab_size=V).eval()
    x = ids(1, 12)
    n0 = gpt.num_params()
    prune_(gpt, 0.5, "magnitude", "heads")
    prune_(gpt, 0.5, "wanda", "neurons", calib=ids())
    a, f = gpt.decoder.blocks[0].attn, gpt.decoder.blocks[0].mlp
    assert (a.n_head, a.n_kv_head, a.wq.bias.shape[0], f.w1.weight.shape[0], f.w1.bias.shape[0]) == \
           (2, 2, 64, 256, 256)
    assert gpt.num_params() < n0
    assert gpt.pruning["pattern"] == "neurons" and gpt.pruning["previous"] == [
        {"method": "magnitude", "pattern": "heads", "sparsity": 0.5}]
    y = gpt(x)
    gpt.save(tmp_path / "gpt")
    torch.testing.assert_close(tinyformer.load(tmp_path / "gpt")(x), y, rtol=0, atol=1e-5)
    # encoder-decoder: self- and cross-attention, two stacks
    s2s = tinyformer.build("seq2seq-small", d_model=64, n_layer=1, n_decoder_layer=1, vocab_size=V).eval()
    src, tgt = ids(2, 8), ids(2, 6, seed=3)
    prune_(s2s, 0.5, "wanda", "heads", calib=(src, tgt))
    assert s2s.decoder.blocks[0].cross_attn.n_head == 2 and s2s.encoder.blocks[0].attn.n_head == 2
    y = s2s(src, tgt)
    s2s.save(tmp_path / "s2s")
    torch.testing.assert_close(tinyformer.load(tmp_path / "s2s")(src, tgt), y, rtol=0, atol=1e-5)
    assert s2s.generate(src, 4, temperature=0).shape[0] == 2


def test_iterative_reaches_target_and_keeps_masks():
    model = tiny()
    data = torch.randint(0, V, (400,), generator=torch.Generator().manual_seed(4))
    seen = []
    real_prune = prune_

    import tinyformer.compress.prune as P

    def spy(m, s, *a, **k):
        seen.append(round(s, 6))
        return real_prune(m, s, *a, **k)

    P.prune_, before = spy, P.prune_
    try:
        prune_iterative_(model, data, 0.6, steps=12, n_prunes=4, block_size=16, batch_size=2, lr=1e-2)
    finally:
        P.prune_ = before
    assert seen == [round(cubic_sparsity(k, 4, 0.6), 6) for k in range(1, 5)]  # 0.346875, 0.525, 0.584375, 0.6
    for name, w in block_weights(model).items():
        assert float((w == 0).float().mean()) == pytest.approx(0.6, abs=1 / w.numel()), name
    assert [e["step"] for e in model.pruning["events"]] == [0, 3, 6, 9]
    # the fine-tune really moved the kept weights (so masks were re-applied, not just left untouched)
    fresh = prune_(tiny(), 0.6, "magnitude")
    kept = block_weights(model)["decoder.blocks.0.mlp.w1"] != 0
    assert not torch.equal(block_weights(model)["decoder.blocks.0.mlp.w1"][kept],
                           block_weights(fresh)["decoder.blocks.0.mlp.w1"][kept])
    # 2:4 prunes once and keeps the N:M structure through fine-tuning
    m24 = prune_iterative_(tiny(), data, 0.5, steps=4, method="wanda", pattern="2:4", block_size=16, batch_size=2,
                           lr=1e-2)
    for name, w in block_weights(m24).items():
        assert ((w == 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all(), name


def test_pruning_a_loaded_model_matches_the_model_it_was_saved_from(tmp_path):
    """tinyformer.load lays weights out for decoding (TransformerBase.pack_): Wanda's statistics must still see every
    linear's inputs, and shrunk weights keep that layout."""
    model = tiny()
    model.save(tmp_path)
    loaded = tinyformer.load(tmp_path)
    x = ids(2, 10, seed=9)
    prune_(model, 0.5, "wanda", calib=ids())
    prune_(loaded, 0.5, "wanda", calib=ids())
    for name, w in block_weights(model).items():
        assert torch.equal(block_weights(loaded)[name] == 0, w == 0), name
    prune_(model, 0.25, "wanda", "neurons", calib=ids())
    prune_(loaded, 0.25, "wanda", "neurons", calib=ids())
    w1, w1_loaded = model.decoder.blocks[0].mlp.w1.weight, loaded.decoder.blocks[0].mlp.w1.weight
    assert torch.equal(w1_loaded, w1)
    if block_weights(tinyformer.load(tmp_path))["decoder.blocks.0.mlp.w2"].stride(0) == 1:  # load packs
        assert w1_loaded.stride(0) == 1
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-5)


def test_apply_structure_rebuilds_shapes_on_meta():
    with torch.device("meta"):
        m = tinyformer.build("llama-tiny", n_layer=2, d_model=32, n_head=4, n_kv_head=2, d_ff=48, vocab_size=V,
                             init=False)
        apply_structure(m, {"decoder.blocks.1.attn": {"n_head": 2, "n_kv_head": 1},
                            "decoder.blocks.0.mlp": {"d_ff": 10}})
    assert m.decoder.blocks[1].attn.wq.weight.shape == (16, 32) and m.decoder.blocks[1].attn.wk.weight.shape == (8, 32)
    assert m.decoder.blocks[0].mlp.w2.weight.shape == (32, 10) and m.decoder.blocks[1].mlp.w2.weight.shape == (32, 48)


# ----------------------------------------------------------------------------------------------------------------------
# errors
def test_errors():
    model = tiny()
    with pytest.raises(ValueError, match="method"):
        prune_(model, 0.5, "random")
    with pytest.raises(ValueError, match="pattern"):
        prune_(model, 0.5, pattern="blocks")
    with pytest.raises(ValueError, match="sparsity"):
        prune_(model, 1.0)
    with pytest.raises(ValueError, match="sparsity"):
        prune_(model, -0.1)
    with pytest.raises(ValueError, match="sparsity must be 0.75"):
        prune_(model, 0.5, pattern="1:4")
    with pytest.raises(ValueError, match="calib"):
        prune_(model, 0.5, "wanda")
    with pytest.raises(ValueError, match="vocabulary"):
        prune_(model, 0.5, "wanda", calib=torch.full((2, 4), V))
    with pytest.raises(TypeError, match="tinyformer model"):
        prune_(torch.nn.Linear(4, 4), 0.5)
    with pytest.raises(ValueError, match="divisible by 8"):
        nm_mask(torch.randn(3, 12), 4, 8)
    with pytest.raises(ValueError, match="col_norm"):
        wanda_scores(W, torch.ones(3))
    with pytest.raises(ValueError, match="2-D float"):
        magnitude_scores(torch.ones(4))
    with pytest.raises(ValueError, match="keep_groups"):
        shrink_attention_(model.decoder.blocks[0].attn, [])
    with pytest.raises(ValueError, match="rounds to nothing"):
        prune_(tiny(n_kv_head=1), 0.5, pattern="heads")  # MQA: one KV group, which must stay
    with pytest.raises(ValueError, match="rounds to nothing"):
        prune_(tiny(), 0.2, pattern="heads")  # 0.2 of 2 groups
    with pytest.raises(ValueError, match="does not fit"):
        apply_structure(model, {"decoder.blocks.0.attn": {"d_ff": 3}})
    with pytest.raises(ValueError, match="does not have"):
        apply_structure(model, {"decoder.blocks.9.mlp": {"d_ff": 3}})
    data = torch.randint(0, V, (100,))
    with pytest.raises(ValueError, match="heads/neurons"):
        prune_iterative_(model, data, 0.5, 4, pattern="heads", block_size=16)
    with pytest.raises(ValueError, match="steps"):
        prune_iterative_(model, data, 0.5, 0, block_size=16)
    with pytest.raises(ValueError, match="data_ids"):
        prune_iterative_(model, data.float(), 0.5, 8, block_size=16)
    from tinyformer.compress import quantize_
    q = quantize_(tiny(), bits=8)
    with pytest.raises(ValueError, match="before quantizing"):
        prune_(q, 0.5, pattern="neurons")
    with pytest.raises(ValueError, match="no float Linear"):
        prune_(q, 0.5)
