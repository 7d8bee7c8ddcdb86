"""Generation tests: greedy equals a no-cache argmax loop, sampling filters, EOS, left-padded batches, the sliding
window past the context, beam search against brute force; perplexity against a direct computation."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import helpers
from tinyformer.compress import quantize_
from tinyformer.eval import perplexity
from tinyformer.generate import sample_next


def tiny(arch="decoder", **kw):
    return helpers.tiny(arch, **{**dict(n_kv_head=2, vocab_size=30, max_seq_len=24, pos="rope"), **kw}).eval()


def greedy_no_cache(model, ids, n):
    for _ in range(n):
        nxt = model(ids[:, -model.config.max_seq_len:])[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat((ids, nxt), dim=1)
    return ids


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_greedy_with_cache_equals_full_recompute_even_past_the_context(pos):
    model = tiny(pos=pos)
    ids = torch.randint(0, 30, (2, 5))
    out = model.generate(ids, 30, temperature=0)  # 35 > max_seq_len=24: the window slides
    assert out.shape == (2, 35)
    assert torch.equal(out, greedy_no_cache(model, ids, 30))


def test_generate_on_factored_and_head_pruned_models_equals_full_recompute():
    """Low-rank linears and layers left with other head counts by structured pruning (a KV cache of per-layer
    widths) decode as the full forward computes."""
    from tinyformer.compress import lowrank_, prune_
    model = tiny(act="swiglu", n_layer=3, n_head=4, n_kv_head=4)
    prune_(model, 0.5, pattern="heads")
    assert model.decoder.blocks[0].attn.n_kv_head == 2
    lowrank_(model, 0.5)
    ids = torch.randint(0, 30, (1, 5))
    assert torch.equal(model.generate(ids, 10, temperature=0), greedy_no_cache(model, ids, 10))


def _decode_logits(model, ids, tokens):
    """The logits (n, V) of `tokens` decoded one at a time after the prompt `ids`, with a KV cache."""
    cache = model.new_cache(1, ids.shape[1] + len(tokens))
    model(ids, cache=cache)
    return torch.cat([model(torch.tensor([[t]]), cache=cache)[:, -1] for t in tokens]).float()


@pytest.mark.parametrize("kind", ["bf16", "int8", "int4", "int4-ragged"])
def test_decoding_without_autograd_uses_prepared_layouts_and_matches(kind, monkeypatch):
    """Decode steps outside autograd multiply through weights laid out once for their kernels (oneDNN's blocked bf16,
    torch's int8 / int4 packs: `kernels.cpu.prepared`), q/k/v and gate/up stacked into one product each, never
    F.linear or a reference, and give the logits the same forward gives with autograd on (one product per layer, on
    the plain weights); an int8 head too."""
    from tinyformer import ops
    from tinyformer.compress import quantize_
    from tinyformer.kernels import cpu
    if kind == "bf16" and not ops.onednn_bf16():
        pytest.skip("oneDNN has no bf16 on this CPU (AVX2 only)")
    d_model = 96 if kind == "int4-ragged" else 64  # 96 at group 64: a ragged last group
    model = tiny(act="swiglu", d_model=d_model, d_ff=128, bias=True)  # K % 32 == 0: torch's int8 kernel takes it
    if kind == "bf16":
        model.to(torch.bfloat16)
    else:
        quantize_(model, bits=8 if kind == "int8" else 4, group_size=32 if d_model == 64 else 64, head=True)
    calls = {"prepared": 0, "slow": 0}
    real_prepared, real_linear = cpu.prepared, ops.F.linear

    def count(what, f):
        return lambda *a, **k: calls.__setitem__(what, calls[what] + 1) or f(*a, **k)
    monkeypatch.setattr(cpu, "prepared", count("prepared", real_prepared))
    monkeypatch.setattr(ops.F, "linear", count("slow", real_linear))
    for name in ("int8_weight_only_matmul_reference", "int4_matmul_reference"):
        monkeypatch.setattr(cpu, name, count("slow", getattr(cpu, name)))
    ids = torch.randint(0, 30, (1, 6))
    with torch.no_grad():
        fast = _decode_logits(model, ids, [3, 7, 1, 29])
    n_products = 5 * (4 * 2 + 1)  # prompt + 4 steps, each q/k/v, wo, gate/up, down in 2 layers, and the head
    assert calls == {"prepared": n_products, "slow": 0}
    slow = _decode_logits(model, ids, [3, 7, 1, 29]).detach()  # autograd on
    tol = 2e-2 if kind == "bf16" else 1e-3  # bf16: oneDNN and aten may sum in another order
    torch.testing.assert_close(fast, slow, rtol=tol, atol=tol)


def test_decoding_leaves_the_parameters_as_they_were():
    """Decoding prepares its layouts beside the weights, never in their place: the same Parameter objects, values
    and (contiguous) layout after generate, so training afterwards sees the model it had."""
    model = tiny(act="swiglu", d_model=64).to(torch.bfloat16)
    params = dict(model.named_parameters())
    values = {k: v.detach().clone() for k, v in params.items()}
    model.generate(torch.randint(0, 30, (1, 5)), 6, temperature=0)
    assert dict(model.named_parameters()) == params
    for k, p in params.items():
        assert torch.equal(p, values[k]) and p.is_contiguous(), k


@pytest.mark.parametrize("scheme", ["float", "int4"])
def test_generate_compile_gives_the_eager_tokens_and_follows_weight_changes(scheme, monkeypatch):
    """generate(compile=True) runs its decode steps through torch.compile of the model's own forward, with the weights
    frozen into the compiled code (their int4 layouts folded at compile time), and gives the tokens eager decoding
    gives; after the weights change in place it compiles afresh rather than decoding with the old ones."""
    from tinyformer import generate as gen
    model = tiny(act="swiglu", norm="rmsnorm", d_model=64)
    if scheme == "int4":
        model = quantize_(model, bits=4, group_size=32)
    ids = torch.randint(0, 30, (1, 5), generator=torch.Generator().manual_seed(0))
    calls = []
    real = gen.compiled.__call__
    monkeypatch.setattr(gen.compiled, "__call__", lambda self, *a, **k: calls.append(self.fn is not None) or real(
        self, *a, **k))
    for _ in range(2):
        eager = model.generate(ids, 12, temperature=0)
        assert torch.equal(model.generate(ids, 12, temperature=0, compile=True), eager)
        assert calls == [True] * 11  # every step after the prefill, compiled
        calls.clear()
        g = torch.Generator().manual_seed(len(calls))
        with torch.no_grad():  # new weights, same tensors: frozen code compiled before would decode the old ones
            for t in list(model.parameters()) + list(model.buffers()):
                if t.dtype == torch.uint8:
                    t.bitwise_xor_(0x35)  # every int4 code changes
                elif t.is_floating_point() and t.dim() > 1:
                    t.add_(torch.randn(t.shape, generator=g))
        assert not torch.equal(model.generate(ids, 12, temperature=0), eager)


def test_generate_compile_falls_back_with_a_warning(monkeypatch):
    """Where compiling fails (no C++ compiler, say), generate(compile=True) warns once and decodes without it."""
    from tinyformer import generate as gen
    model = tiny(d_model=64)
    ids = torch.randint(0, 30, (1, 5))
    eager = model.generate(ids, 12, temperature=0)

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    calls = []
    real = gen.compiled.__call__
    monkeypatch.setattr(gen.compiled, "__call__", lambda self, *a, **k: calls.append(self.fn is not None) or real(
        self, *a, **k))
    monkeypatch.setattr(gen.torch, "compile", lambda fn, **kw: broken)
    with pytest.warns(RuntimeWarning, match=r"no C\+\+ compiler"):
        assert torch.equal(model.generate(ids, 12, temperature=0, compile=True), eager)
    assert calls == [True] + [False] * 10  # the first step failed over; the rest went straight to eager
    calls.clear()
    assert torch.equal(model.generate(ids, 12, temperature=0, compile=True), eager)
    assert calls == [False] * 11  # and the model is not compiled again


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, temperature=1.0, top_k=1, generator=g).tolist() == [1, 0]
    assert sample_next(logits, temperature=1.0, top_p=0.01, generator=g).tolist() == [1, 0]
    # top_k=2 never samples outside the two largest logits
    draws = torch.stack([sample_next(logits[:1], 1.0, top_k=2, generator=g) for _ in range(200)])
    assert set(draws.flatten().tolist()) == {1, 3}
    # top_p=0.7 on probs (0.64, 0.24, 0.09, 0.03): keeps the first two only
    p = torch.tensor([[0.64, 0.24, 0.09, 0.03]]).log()
    draws = torch.stack([sample_next(p, 1.0, top_p=0.7, generator=g) for _ in range(300)])
    assert set(draws.flatten().tolist()) == {0, 1}
    # temperature sampling follows softmax(logits / T): a chi-square-free check on the frequent token
    draws = torch.stack([sample_next(p, 1.0, generator=g) for _ in range(4000)])
    assert abs((draws == 0).float().mean().item() - 0.64) < 0.03


def test_eos_stops_rows_and_pads_with_eos():
    model = tiny()
    ids = torch.randint(0, 30, (3, 4))
    free = model.generate(ids, 12, temperature=0)
    eos = int(free[0, 6])  # the token row 0 emits third: make it the EOS
    out = model.generate(ids, 12, temperature=0, eos_token_id=eos)
    assert out.shape == free.shape
    for row in range(3):
        new = out[row, 4:].tolist()
        if eos in new:
            k = new.index(eos)
            assert all(t == eos for t in new[k:])
            assert new[:k] == free[row, 4:4 + k].tolist()
        else:
            assert new == free[row, 4:].tolist()


def test_left_padded_batch_equals_each_prompt_alone():
    model = tiny()
    a, b = torch.randint(0, 30, (1, 7)), torch.randint(0, 30, (1, 3))
    batch = torch.cat((a, torch.cat((torch.zeros(1, 4, dtype=torch.long), b), dim=1)))
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    out = model.generate(batch, 10, temperature=0, attention_mask=mask)
    assert torch.equal(out[0], model.generate(a, 10, temperature=0)[0])
    assert torch.equal(out[1, 4:], model.generate(b, 10, temperature=0)[0])


def test_seq2seq_greedy_and_beam_search_against_brute_force():
    model = tiny("encoder-decoder", vocab_size=5, decoder_start_token_id=0)
    src = torch.randint(0, 5, (2, 6))
    greedy = model.generate(src, 3, temperature=0)
    assert greedy.shape == (2, 4) and (greedy[:, 0] == 0).all()

    def logprob(seq, i):
        logits = model(src[i:i + 1], torch.tensor([seq[:-1]]))
        return F.log_softmax(logits.float(), -1)[0, torch.arange(len(seq) - 1), torch.tensor(seq[1:])].sum().item()

    # with 5^3 = 125 beams the search is exhaustive: it must find the most probable sequence
    beams = model.generate(src, 3, num_beams=125, length_penalty=0.0)
    for i in range(2):
        best = max(([0, *c] for c in itertools.product(range(5), repeat=3)), key=lambda s: logprob(s, i))
        assert beams[i].tolist() == best
        assert logprob(beams[i].tolist(), i) >= logprob(greedy[i].tolist(), i) - 1e-6
    # a narrow beam still scores at least as well as greedy
    narrow = model.generate(src, 3, num_beams=3, length_penalty=0.0)
    for i in range(2):
        assert logprob(narrow[i].tolist(), i) >= logprob(greedy[i].tolist(), i) - 1e-6


@pytest.mark.parametrize("same_source", [True, False])
def test_cache_reorder_then_decode_equals_the_reordered_rows_from_scratch(same_source):
    """KVCache.reorder gathers each row's self-attention history (and, unless cross=False, its encoder memory): the
    next step's logits equal a full forward of the reordered target rows. cross=False is only right when the rows
    share one source, as beam_search's beams of a word do."""
    model = tiny("encoder-decoder", vocab_size=11, decoder_start_token_id=0)
    src = torch.randint(0, 11, (1, 6)).repeat(4, 1) if same_source else torch.randint(0, 11, (4, 6))
    tgt = torch.randint(0, 11, (4, 6))
    memory = model.encode(src)  # (4, S, C)
    cache = model.new_cache(4, 8)
    for t in range(4):  # one token at a time, as generation writes the cache
        model.decode(tgt[:, t:t + 1], memory, None, cache)
    rows = torch.tensor([2, 0, 0, 3])
    cache.reorder(rows, cross=not same_source)
    got = model.decode(tgt[rows, 4:5], memory[rows], None, cache)[:, -1]  # (4, V)
    want = model(src[rows], tgt[rows, :5])[:, -1]  # (4, V)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_generate_rejects_bad_arguments():
    model = tiny()
    ids = torch.randint(0, 30, (1, 3))
    for kwargs, match in [(dict(temperature=-1), "temperature"), (dict(top_k=0), "top_k"),
                          (dict(top_p=1.5), "top_p"), (dict(eos_token_id=30), "eos_token_id")]:
        with pytest.raises(ValueError, match=match):
            model.generate(ids, 3, **kwargs)


@pytest.mark.parametrize("stride", [1, 16])
def test_perplexity_matches_a_direct_computation(stride):
    model = tiny(max_seq_len=32)
    ids = torch.randint(0, 30, (100,))
    nll = []
    for t in range(1, 100):
        if stride == 1:  # every token sees the full window before it
            ctx = ids[max(0, t - 16):t]
        else:  # disjoint blocks ids[16j : 16j + 16] predict ids[16j + 1 : 16j + 17]
            ctx = ids[(t - 1) // 16 * 16:t]
        nll.append(-F.log_softmax(model(ctx[None])[0, -1], -1)[ids[t]].item())
    expected = math.exp(sum(nll) / len(nll))
    assert math.isclose(perplexity(model, ids, block_size=16, stride=stride), expected, rel_tol=1e-5)
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, ids, block_size=16, stride=17)
    with pytest.raises(ValueError, match="block_size"):
        perplexity(model, ids, block_size=33)


def test_window_perplexity_scores_each_window_on_its_own():
    from tinyformer.eval import window_perplexity
    model = tiny(max_seq_len=32)
    ids = torch.randint(0, 30, (70,))  # 4 windows of 16; the last 6 tokens are left out
    nll = [-F.log_softmax(model(ids[w * 16:t][None])[0, -1], -1)[ids[t]].item()
           for w in range(4) for t in range(w * 16 + 1, w * 16 + 16)]
    assert math.isclose(window_perplexity(model, ids, window=16, batch_size=3), math.exp(sum(nll) / len(nll)),
                        rel_tol=1e-5)
    with pytest.raises(ValueError, match="window"):
        window_perplexity(model, ids, window=64)


def test_sotu_protocol_holds_out_the_last_ten_speeches():
    from tinyformer.data import corpus_text
    from tinyformer.eval import SOTU_HELDOUT, sotu_speeches
    train, held = sotu_speeches()
    assert len(held) == SOTU_HELDOUT and len(train) + len(held) == 249
    assert corpus_text("sotu").rstrip().endswith(held[-1])  # file-name order: the held-out ones come last
    assert not set(held) & set(train)
