"""Compression recipes (`tinyformer compress`): parsing checks every step against its verb before any slow work,
the steps chain, fine-tuning keeps pruned weights at zero, and the report counts what each stage kept."""
import pytest
import torch

import tinyformer
from tinyformer.compress.recipe import RECIPES, finetune, logical_params, parse_recipe, run_recipe


def test_parse_recipe_reads_steps_values_and_named_recipes():
    steps = parse_recipe("distill:steps=30,temperature=1.5 -> prune:method=wanda,sparsity=0.5 -> quantize:bits=4")
    assert steps == [("distill", {"steps": 30, "temperature": 1.5}),
                     ("prune", {"method": "wanda", "sparsity": 0.5}), ("quantize", {"bits": 4})]
    assert parse_recipe("int8") == [("quantize", {"bits": 8})] and "int4-gptq" in RECIPES


@pytest.mark.parametrize("text,match", [("shrink:x=1", "unknown verb 'shrink'"), ("prune:speed=3", "'speed=3'"),
                                        ("prune:sparsity", "not key=value"), ("quantize -> ", "empty step"),
                                        ("prune:calib=1", "'calib=1'")])
def test_parse_recipe_errors_name_the_step(text, match):
    with pytest.raises(ValueError, match=match):
        parse_recipe(text)


def test_chain_prunes_finetunes_and_quantizes_keeping_the_zeros():
    torch.manual_seed(0)
    model = tinyformer.build("llama-tiny", n_layer=2, vocab_size=64, max_seq_len=32)
    data = torch.randint(0, 64, (16, 32))
    total, nonzero = logical_params(model)
    assert total == nonzero == sum(p.numel() for p in model.parameters())
    run_recipe(model, parse_recipe("prune:sparsity=0.5"), calib=data[:4], data=data, log=lambda *_: None)
    w = model.decoder.blocks[0].mlp.w1.weight
    zeros = w == 0
    assert zeros.float().mean() == 0.5
    before = w.detach().clone()
    finetune(model, data, steps=3, lr=1e-2)
    w = model.decoder.blocks[0].mlp.w1.weight
    assert torch.equal(w == 0, zeros) and not torch.equal(w, before)  # trained, and the pruned ones stayed zero
    run_recipe(model, parse_recipe("quantize:bits=8"), calib=data[:4], data=data, log=lambda *_: None)
    total_q, nonzero_q = logical_params(model)
    assert total_q == total  # a quantized weight still counts its full shape
    assert nonzero_q < 0.75 * total  # ... and its zero codes are counted as zeros


@pytest.mark.parametrize("tied", [True, False])
def test_an_int8_head_keeps_the_logical_count(tied):
    """head=True swaps the output head for an Int8Linear: an untied head is the same weight quantized; a tied one is
    a second copy of the embedding, which must not count twice."""
    torch.manual_seed(0)
    model = tinyformer.build("llama-tiny", n_layer=1, vocab_size=64, max_seq_len=32, tie_embeddings=tied)
    before = logical_params(model)
    run_recipe(model, parse_recipe("quantize:bits=8,head=true"), calib=torch.randint(0, 64, (2, 32)), data=None,
               log=lambda *_: None)
    assert type(model.lm_head).__name__ == "Int8Linear"
    assert logical_params(model)[0] == before[0]


def test_decode_speed_is_measured_inside_the_context(monkeypatch):
    """The report's decode tokens/s is cached decoding: prompt + new tokens stay within max_seq_len (past it
    `generate` recomputes the whole window at every token)."""
    from tinyformer.compress import recipe
    model = tinyformer.build("llama-tiny", n_layer=1, vocab_size=64, max_seq_len=32)
    calls = []
    real = type(model).generate
    monkeypatch.setattr(type(model), "generate",
                        lambda self, ids, n, **kw: calls.append((ids.shape[1], n)) or real(self, ids, n, **kw))
    assert recipe.decode_tokens_per_s(model) > 0
    assert calls and all(prompt + new <= 32 for prompt, new in calls)
