"""Generation tests: greedy equals a no-cache argmax loop, sampling filters, EOS, left-padded batches, the sliding
window past the context, beam search against brute force; perplexity against a direct computation."""
import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from tinyformer import ModelConfig, build
from tinyformer.eval import perplexity
from tinyformer.generate import sample_next


def tiny(arch="decoder", **kw):
    torch.manual_seed(0)
    cfg = dict(n_layer=2, n_head=4, n_kv_head=2, d_model=32, vocab_size=30, max_seq_len=24, pos="rope")
    return build(ModelConfig(arch=arch, **{**cfg, **kw})).eval()


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


def test_cpu_decode_of_a_packed_fp32_model_runs_numpy_and_matches(monkeypatch):
    """generate's batch-1 decode of an fp32 model takes NumpyDecodeStep with torch on one thread meanwhile,
    gives the tokens a full recompute gives, and hands torch its threads back; batch 2 does not take it."""
    from tinyformer import generate as gen
    torch.manual_seed(0)
    model = tiny(act="swiglu", pos="rope", n_kv_head=1).eval().pack_()
    ids = torch.randint(0, 30, (1, 5))
    calls, threads = [], torch.get_num_threads()
    real = gen.NumpyDecodeStep.__call__

    def spy(self, token):
        calls.append(torch.get_num_threads())
        return real(self, token)

    monkeypatch.setattr(gen.NumpyDecodeStep, "__call__", spy)
    out = model.generate(ids, 12, temperature=0)
    assert torch.equal(out, greedy_no_cache(model, ids, 12))
    assert len(calls) == 11 and set(calls) == {1}  # every step after the prefill, while torch had one thread
    assert torch.get_num_threads() == threads
    calls.clear()
    model.generate(torch.randint(0, 30, (2, 5)), 4, temperature=0)  # batch 2: the modules
    assert not calls
    from tinyformer.compress import quantize_
    quantize_(model, bits=8)  # quantized linears: the numpy step, but torch keeps its threads for its int8 kernel
    model.generate(ids, 4, temperature=0)
    assert calls == [threads] * 3


@pytest.mark.parametrize("pos,act,norm,norm_position,bias,pack", [
    ("rope", "swiglu", "rmsnorm", "pre", False, True),       # Llama
    ("rope", "swiglu", "rmsnorm", "pre", True, False),       # biases, unpacked weights
    ("learned", "gelu", "layernorm", "pre", True, True),     # GPT-2
    ("learned", "gelu_tanh", "layernorm", "post", False, True),
    ("sinusoidal", "relu", "layernorm", "post", True, False),
])
def test_numpy_decode_step_equals_the_modules(pos, act, norm, norm_position, bias, pack):
    """NumpyDecodeStep's logits and cache writes equal DecoderLM.forward's with a cache, step after step."""
    model = tiny(pos=pos, act=act, norm=norm, norm_position=norm_position, bias=bias)
    if pack:
        model.pack_()
    _assert_numpy_steps_match(model)


def test_numpy_decode_step_on_factored_and_head_pruned_models():
    """Low-rank linears run as their two thin linears inside the numpy step; structured pruning leaves layers with
    other head counts: both still equal the modules."""
    from tinyformer.compress import lowrank_, prune_
    model = tiny(act="swiglu", n_layer=3, n_head=4, n_kv_head=4)
    prune_(model, 0.5, pattern="heads")
    assert model.decoder.blocks[0].attn.n_kv_head == 2
    lowrank_(model, 0.5)
    _assert_numpy_steps_match(model.pack_())


@pytest.mark.parametrize("onednn", [True, False])
def test_numpy_decode_step_of_a_bf16_model(onednn, monkeypatch):
    """bf16 weights: products on oneDNN's prepacked bf16 GEMV (or aten's, on CPUs where oneDNN has no bf16), the rest
    in fp32; logits within bf16 rounding of the modules' all-bf16 forward, and as close to the fp32 model's as the
    modules' are (up to rounding)."""
    from tinyformer import generate, ops
    if onednn and not ops.onednn_bf16():
        pytest.skip("oneDNN has no bf16 on this CPU (AVX2 only)")
    monkeypatch.setattr(ops, "onednn_bf16", lambda: onednn)
    if not onednn:  # the step must not reach oneDNN's bf16 weight packing, which raises on AVX2-only CPUs
        monkeypatch.setattr(generate, "_onednn_weight", lambda *a: pytest.fail("oneDNN bf16 used"))
    model = tiny(act="swiglu", d_model=64)
    fp32 = copy.deepcopy(model)
    model.to(torch.bfloat16).pack_()
    _assert_numpy_steps_match(model, tol=2e-2, fp32_model=fp32)


@pytest.mark.parametrize("bits,d_model,head", [(8, 64, False), (4, 64, True), (4, 96, False)])  # 96 at group 64:
def test_numpy_decode_step_of_a_quantized_model(bits, d_model, head):                           # a ragged last group
    """Int8/Int4 linears run torch's kernel straight from the step (the one their forward reaches): same logits;
    head=True: the output head too (int8)."""
    from tinyformer.compress import quantize_
    from tinyformer.generate import _fused_row, _quantized_row
    model = tiny(act="swiglu", d_model=d_model, bias=True)
    quantize_(model, bits=bits, group_size=32 if d_model == 64 else 64, head=head)
    assert _quantized_row(model.decoder.blocks[0].attn.wq) is not None  # the direct kernel path, not the fallback
    if head:
        assert _quantized_row(model.lm_head) is not None
    a, f = model.decoder.blocks[0].attn, model.decoder.blocks[0].mlp  # q/k/v and gate/up: one kernel call each
    assert _fused_row([a.wq, a.wk, a.wv]) is not None and _fused_row([f.w1, f.w3]) is not None
    # the kernels round their input to bf16: a 1e-7 fp32 difference between the step's and the modules' input (norms
    # summed in another order) can flip one rounding by an ulp (2^-8 relative); seen: 2.4e-4 on these logits and
    # 1.9e-3 (0.4%) on a cached key
    _assert_numpy_steps_match(model.pack_(), tol=1e-3, cache_tol=2 ** -6)


@pytest.mark.parametrize("pos,act,norm,norm_position,bias,pack", [
    ("rope", "swiglu", "rmsnorm", "pre", False, True),       # Llama (GQA: 4 query heads over 2 k/v heads)
    ("learned", "gelu", "layernorm", "post", True, False),   # biases, post-norm, unpacked weights
])
def test_compiled_decode_step_of_a_bf16_model(pos, act, norm, norm_position, bias, pack):
    """CompiledDecodeStep (torch.compile'd block and head): logits within bf16 rounding of the modules' all-bf16
    forward and no further from the fp32 model's than theirs, cache length, bounds, weights untouched."""
    from tinyformer.generate import compiles
    model = tiny(pos=pos, act=act, norm=norm, norm_position=norm_position, bias=bias, d_model=64)
    fp32 = copy.deepcopy(model)
    model.to(torch.bfloat16)
    if pack:
        model.pack_()
    assert compiles(model) and not compiles(fp32)
    _assert_numpy_steps_match(model, tol=2e-2, fp32_model=fp32, compiled=True)


def test_compiled_decode_step_of_a_quantized_model():
    """Int4 linears (a ragged last group at K=96, group 64; q/k/v and gate/up stacked) and an int8 head: torch's
    kernels as extern calls inside the compiled block, the same logits as the modules (up to the kernels' bf16
    input rounding, as the numpy step). An int8 model whose down projection (K=176) the kernel cannot take: no."""
    from tinyformer.compress import quantize_
    from tinyformer.generate import compiles
    model = tiny(act="swiglu", d_model=96, bias=True)
    quantize_(model, bits=4, group_size=64, head=True)
    assert compiles(model)
    _assert_numpy_steps_match(model.pack_(), tol=1e-3, cache_tol=2 ** -6, compiled=True)
    int8 = tiny(act="swiglu", d_model=64)
    quantize_(int8, bits=8)
    assert not compiles(int8)


def test_generate_compile_takes_the_compiled_step_and_falls_back_to_numpy(monkeypatch):
    """generate(compile=True) decodes a batch-1 bf16 model through CompiledDecodeStep; where torch.compile fails it
    warns once and gives exactly the numpy step's tokens; compile=True changes nothing for a quantized model."""
    from tinyformer import generate as gen
    from tinyformer.compress import quantize_
    model = tiny(act="swiglu", d_model=64).to(torch.bfloat16).pack_()
    ids = torch.randint(0, 30, (1, 5))
    calls = []
    real = gen.CompiledDecodeStep.__call__

    def spy(self, token):
        calls.append(self.failed)
        return real(self, token)

    monkeypatch.setattr(gen.CompiledDecodeStep, "__call__", spy)
    model.generate(ids, 6, temperature=0, compile=True)
    assert calls == [False] * 5  # every decode step, compiled
    numpy_tokens = model.generate(ids, 12, temperature=0)

    def broken(fn):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(gen, "_compiled", broken)
    calls.clear()
    with pytest.warns(RuntimeWarning, match=r"no C\+\+ compiler"):
        out = model.generate(ids, 12, temperature=0, compile=True)
    assert torch.equal(out, numpy_tokens)
    assert calls == [False] + [True] * 10  # the first step failed over to numpy; the rest went straight there
    quantize_(model, bits=8)
    calls.clear()
    model.generate(ids, 4, temperature=0, compile=True)
    assert not gen.compiles(model) and not calls


def _assert_numpy_steps_match(model, tol=1e-5, fp32_model=None, cache_tol=None, compiled=False):
    from tinyformer.generate import CompiledDecodeStep, NumpyDecodeStep
    ids = torch.randint(0, 30, (1, 6))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref, ours = model.new_cache(1, 11), model.new_cache(1, 11)
        model(ids, cache=ref)
        model(ids, cache=ours)
        if fp32_model is not None:
            exact = fp32_model.new_cache(1, 11)
            fp32_model(ids, cache=exact)
        step = NumpyDecodeStep(model, ours)
        if compiled:
            step = CompiledDecodeStep(step, model)
        for tok in (3, 7, 1, 29, 0):
            expect = model(torch.tensor([[tok]]), cache=ref)[:, -1].float()  # (1, V)
            got = step(tok)
            torch.testing.assert_close(got, expect, rtol=tol, atol=tol)
            if fp32_model is not None:  # rounding the activations less is no worse than the modules' bf16
                truth = fp32_model(torch.tensor([[tok]]), cache=exact)[:, -1]
                assert (got - truth).abs().max() <= (expect - truth).abs().max() + 4e-3
        assert ours.length == ref.length == 11
        assert not compiled or not step.failed  # the compiled functions ran every step
        if model.wte.dtype == torch.float32:  # the step wrote the cache's own tensors
            for a, b in zip(ours.k + ours.v, ref.k + ref.v):
                torch.testing.assert_close(a, b, rtol=cache_tol or tol, atol=cache_tol or tol)
        with pytest.raises(ValueError, match="beyond the cache"):
            step(1)
    for k, v in model.state_dict().items():  # decoding never writes into the weights
        assert torch.equal(v, before[k]), k


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
