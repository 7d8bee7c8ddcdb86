"""Model tests: shapes for every architecture and option, causality, KV cache == full forward, padding invariance,
gradients to every parameter, backends agree, save/load bit-exact, config validation."""
import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tinyformer
from tinyformer import ModelConfig, build, ops
from tinyformer.config import ACTIVATIONS, ARCHS, NORM_POSITIONS, NORMS, POSITIONS

from helpers import TINY, tiny


def run(model, ids, mask=None):
    """The model's main output for any arch: logits (decoder, encoder-decoder) or hidden states (encoder)."""
    arch = model.config.arch
    if arch == "decoder":
        return model(ids)
    if arch == "encoder":
        return model(ids, attention_mask=mask)
    return model(ids, ids[:, : max(1, ids.shape[1] - 1)], attention_mask=mask)


option_sets = st.fixed_dictionaries(dict(
    arch=st.sampled_from(ARCHS), norm=st.sampled_from(NORMS), norm_position=st.sampled_from(NORM_POSITIONS),
    pos=st.sampled_from(POSITIONS), act=st.sampled_from(ACTIVATIONS), n_kv_head=st.sampled_from([4, 2, 1]),
    bias=st.booleans(), tie_embeddings=st.booleans(), embed_norm=st.booleans(),
    type_vocab_size=st.sampled_from([0, 2]), dropout=st.sampled_from([0.0, 0.1]),
))


@settings(max_examples=60, deadline=None)
@given(opts=option_sets, B=st.integers(1, 3), T=st.integers(3, 13))  # T >= 3: one key gets no gradient
def test_shapes_and_every_parameter_gets_a_gradient(opts, B, T):
    model = tiny(**opts)
    ids = torch.randint(0, 50, (B, T))
    out = run(model, ids)
    if opts["arch"] == "encoder":
        assert out.shape == (B, T, 32)
    elif opts["arch"] == "decoder":
        assert out.shape == (B, T, 50)
    else:
        assert out.shape == (B, T - 1, 50)
    assert torch.isfinite(out).all()
    out.float().square().mean().backward()
    enc_types_unused = opts["arch"] != "encoder"  # only BERT-style encoders take token_type_ids
    for name, p in model.named_parameters():
        if "wtt" in name and enc_types_unused:
            continue  # token types default to 0: row 1 gets no gradient, row 0 does
        assert p.grad is not None, f"{name} got no gradient"
        assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"


@pytest.mark.parametrize("pos", POSITIONS)
@pytest.mark.parametrize("arch", ["decoder", "encoder-decoder"])
def test_changing_future_tokens_never_changes_past_logits(arch, pos):
    model = tiny(arch, pos=pos).eval()
    ids = torch.randint(0, 50, (2, 12))
    other = ids.clone()
    other[:, 7:] = (other[:, 7:] + 1 + torch.randint(0, 48, (2, 5))) % 50
    if arch == "decoder":
        a, b = model(ids), model(other)
    else:
        src = torch.randint(0, 50, (2, 9))
        a, b = model(src, ids), model(src, other)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-5)
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-3  # and the future does change


@pytest.mark.parametrize("pos,n_kv_head", [("learned", 4), ("rope", 2), ("sinusoidal", 1), ("rope", 1)])
def test_kv_cache_decoding_equals_full_forward(pos, n_kv_head):
    model = tiny(pos=pos, n_kv_head=n_kv_head).eval()
    ids = torch.randint(0, 50, (3, 15))
    full = model(ids)
    cache = model.new_cache(3, 40)
    steps = [model(ids[:, :6], cache=cache)]  # prefill 6, then one token at a time
    for t in range(6, 15):
        steps.append(model(ids[:, t:t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_encoder_decoder_cached_decoding_equals_full_forward():
    model = tiny("encoder-decoder", pos="rope").eval()
    src, tgt = torch.randint(0, 50, (2, 11)), torch.randint(0, 50, (2, 8))
    mask = torch.ones_like(src)
    mask[1, 8:] = 0
    full = model(src, tgt, attention_mask=mask)
    memory = model.encode(src, mask)
    cache = model.new_cache(2, 8)
    steps = [model.decode(tgt[:, t:t + 1], memory, mask, cache) for t in range(8)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["encoder", "encoder-decoder"])
def test_padding_invariance(arch):
    """Appending pad tokens (masked out) changes nothing at the real positions."""
    model = tiny(arch, norm_position="post", embed_norm=True).eval()
    ids = torch.randint(0, 50, (1, 9))
    padded = torch.cat((ids, torch.randint(0, 50, (1, 5))), dim=1)  # garbage in the pad slots
    mask = torch.cat((torch.ones(1, 9), torch.zeros(1, 5)), dim=1).long()
    if arch == "encoder":
        torch.testing.assert_close(model(padded, mask)[:, :9], model(ids), rtol=1e-5, atol=1e-5)
    else:
        tgt = torch.randint(0, 50, (1, 6))
        torch.testing.assert_close(model(padded, tgt, mask), model(ids, tgt), rtol=1e-5, atol=1e-5)


def _backends():
    names = ["reference", "torch"]
    try:
        from tinyformer.kernels import attention  # noqa: F401  (the Triton kernel, once it exists)
        names.append("triton")
    except ImportError:
        pass
    return names


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_backends_agree(arch):
    model = tiny(arch, n_kv_head=2, d_model=64, pos="rope").eval()  # head dim 16: the kernels' smallest
    ids = torch.randint(0, 50, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    outs = {}
    for name in _backends():
        with ops.use_backend(name):
            outs[name] = run(model, ids, None if arch == "decoder" else mask)
    for name, out in outs.items():
        torch.testing.assert_close(out, outs["reference"], rtol=1e-4, atol=1e-4, msg=f"backend {name}")


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip_is_bit_exact(arch, tmp_path):
    from tokenizers import Tokenizer, models
    model = tiny(arch, tie_embeddings=False, pos="sinusoidal")
    model.tokenizer = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    model.chat_template, model.eos_token_id = "{{ messages }}", 1
    model.save(tmp_path / "m")
    loaded = tinyformer.load(tmp_path / "m")
    assert loaded.config == model.config
    assert (loaded.chat_template, loaded.eos_token_id, loaded.bos_token_id) == ("{{ messages }}", 1, None)
    assert loaded.tokenizer.to_str() == model.tokenizer.to_str()
    sd, ld = model.state_dict(), loaded.state_dict()
    assert sd.keys() == ld.keys()
    for k in sd:
        assert torch.equal(sd[k], ld[k]), k
    ids = torch.randint(0, 50, (2, 7))
    assert torch.equal(run(model.eval(), ids), run(loaded, ids))
    assert not list((tmp_path / "m").glob("*.tmp"))  # no temporary files left behind


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        tinyformer.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        tinyformer.load(tmp_path / "empty")
    model = tiny()
    model.save(tmp_path / "m")
    data = (tmp_path / "m" / "model.safetensors").read_bytes()
    (tmp_path / "m" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="unreadable or truncated"):
        tinyformer.load(tmp_path / "m")
    tiny(d_model=64).save(tmp_path / "other")  # weights of another shape under this config
    (tmp_path / "m" / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="does not match its config.json"):
        tinyformer.load(tmp_path / "m")


@pytest.mark.parametrize("field,value,match", [
    ("d_model", 30, "d_model: 30 is not divisible by n_head=4"),
    ("n_kv_head", 3, "n_head: 4 is not divisible by n_kv_head=3"),
    ("n_layer", 0, "n_layer: must be a positive integer"),
    ("vocab_size", -5, "vocab_size: must be a positive integer"),
    ("arch", "gpt", "arch: unknown choice 'gpt'"),
    ("norm", "batchnorm", "norm: unknown choice"),
    ("pos", "alibi", "pos: unknown choice"),
    ("act", "tanh", "act: unknown choice"),
    ("norm_position", "middle", "norm_position: unknown choice"),
    ("dropout", 1.5, "dropout: must be in"),
    ("pad_token_id", 50, "pad_token_id: 50 is outside the vocabulary"),
])
def test_invalid_configs_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{**TINY, field: value})


def test_presets_and_unknown_preset():
    for name in tinyformer.config.PRESETS:
        cfg = ModelConfig.from_name(name)
        assert dataclasses.asdict(cfg) == dataclasses.asdict(ModelConfig.from_dict(cfg.to_dict()))
    assert ModelConfig.from_name("baby-shakespeare-char").n_layer == 4
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        ModelConfig.from_name("nope")
    # SmolLM2-135M's published size
    with torch.device("meta"):
        assert build("smollm2-135m", init=False).num_params() == 134_515_008


def test_bad_inputs_raise_clear_errors():
    model = tiny()
    with pytest.raises(ValueError, match="token ids must be in 0..49"):
        model(torch.tensor([[1, 2, 50]]))
    with pytest.raises(ValueError, match="exceeds max_seq_len=40"):
        model(torch.zeros(1, 41, dtype=torch.long))
    with pytest.raises(TypeError, match="integer tensor"):
        model(torch.zeros(1, 4))
    enc = tiny("encoder")
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        enc(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 4))


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_compiles_without_graph_breaks(arch):
    """`train --compile true`: the forward is one graph (the eager range checks read ids back to the host, which
    would break it at every call); dynamo's eager backend traces it without code generation."""
    torch._dynamo.reset()
    model = tiny(arch)
    x, mask = torch.randint(3, 50, (2, 8)), torch.ones(2, 8, dtype=torch.bool)
    mask[0, -2:] = False
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(run(compiled, x, mask), run(model, x, mask))
    model.eval()
    with torch.no_grad():  # evaluation: the dispatch leaves its prepared CPU layouts out of a compiled graph
        torch.testing.assert_close(run(torch.compile(model, backend="eager", fullgraph=True), x, mask),
                                   run(model, x, mask))
        if arch == "decoder":  # decode steps with a KV cache, as generate(compile=True) runs them
            step = torch.compile(model, backend="eager", fullgraph=True, dynamic=True)
            ours, ref = model.new_cache(2, 12), model.new_cache(2, 12)
            model(x, cache=ours), model(x, cache=ref)
            for tok in (3, 9, 4):
                t = torch.full((2, 1), tok)
                torch.testing.assert_close(step(t, cache=ours), model(t, cache=ref))
            assert ours.length == ref.length == 11


def test_init_scales_residual_projections():
    model = tiny(n_layer=8, d_model=256, d_ff=1024)
    std = model.decoder.blocks[0].attn.wo.weight.std().item()
    assert math.isclose(std, 0.02 / math.sqrt(16), rel_tol=0.1)
    assert math.isclose(model.decoder.blocks[0].attn.wq.weight.std().item(), 0.02, rel_tol=0.1)


@pytest.mark.parametrize("arch", ["decoder", "encoder"])
def test_classifier_pools_the_real_tokens_and_ignores_padding(arch):
    """A right-padded row gets the class logits its unpadded sequence gets: the decoder pools its last real token,
    the encoder the mean of its real tokens (and "first" its first token)."""
    model = tiny(arch, pos="rope" if arch == "decoder" else "learned").eval()
    model.add_classifier(["a", "b", "c"])
    assert model.config.num_labels == 3 and model.config.label_names == ["a", "b", "c"]
    ids = torch.randint(0, 50, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 5:] = False  # row 1: 5 real tokens, then padding
    logits = model.classify(ids, mask)
    assert logits.shape == (2, 3)
    alone = model.classify(ids[1:, :5])
    torch.testing.assert_close(logits[1:], alone, atol=1e-5, rtol=1e-5)
    hidden = model(ids[1:, :5]) if arch == "encoder" else model(ids[1:, :5], hidden_only=True)  # (1, 5, C)
    pooled = hidden.mean(1) if arch == "encoder" else hidden[:, -1]
    torch.testing.assert_close(alone, model.classifier(pooled), atol=1e-6, rtol=1e-6)
    model.config.pooling = "first"
    first = run(model, ids, mask) if arch == "encoder" else model(ids, hidden_only=True)  # (B, T, C)
    torch.testing.assert_close(model.classify(ids, mask), model.classifier(first[:, 0]), atol=1e-5, rtol=1e-5)


def test_classifier_saves_and_loads(tmp_path):
    model = tiny("encoder").add_classifier(["sport", "tech"], pooling="first").eval()
    model.save(tmp_path / "m")
    loaded = tinyformer.load(tmp_path / "m")
    assert (loaded.config.num_labels, loaded.config.label_names, loaded.config.pooling) == (2, ["sport", "tech"],
                                                                                            "first")
    ids = torch.randint(0, 50, (3, 6))
    assert torch.equal(model.classify(ids), loaded.classify(ids))
    with pytest.raises(ValueError, match="no classification head"):
        tiny("decoder").classify(ids)
    with pytest.raises(ValueError, match="num_labels"):
        ModelConfig(arch="encoder-decoder", num_labels=2)


def test_packed_positions_restart_at_each_document():
    from tinyformer.model import _positions
    ids = torch.zeros(2, 5, dtype=torch.long)
    cu = torch.tensor([0, 2, 5, 6, 10], dtype=torch.int32)  # row 0: docs of 2 and 3; row 1: docs of 1 and 4
    assert _positions(ids, None, None, cu).tolist() == [[0, 1, 0, 1, 2], [0, 0, 1, 2, 3]]


@pytest.mark.parametrize("arch,pos", [("decoder", "rope"), ("decoder", "learned"), ("encoder", "learned")])
def test_packed_examples_get_the_loss_they_have_alone(arch, pos):
    """Three examples packed into two rows (cu_seqlens; the second row's tail one padded example) give each example
    the logits, loss and gradients of that example run alone: attention within it, positions from 0."""
    model = tiny(arch, pos=pos, n_kv_head=2, seed=5).eval()
    lens = [5, 7, 12]  # row 0: examples of 5 and 7; row 1: one of 12
    ids = torch.randint(0, 50, (sum(lens),), generator=torch.Generator().manual_seed(1))
    cu = torch.tensor([0, 5, 12, 24], dtype=torch.int32)
    targets = ids.roll(-1)

    def losses(packed: bool):
        model.zero_grad()
        if packed:
            h = model(ids.view(2, 12), cu_seqlens=cu)  # (2, 12, ...)
            out = (h if arch == "decoder" else model.logits(h)).flatten(0, 1)  # (24, V)
        else:
            outs = [model(ids[a:b][None]) for a, b in zip(cu[:-1], cu[1:])]  # each (1, n, ...)
            out = torch.cat([(o if arch == "decoder" else model.logits(o))[0] for o in outs])  # (24, V)
        per = [torch.nn.functional.cross_entropy(out[a:b], targets[a:b]) for a, b in zip(cu[:-1], cu[1:])]
        sum(per).backward()
        return torch.stack(per).detach(), out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                        if p.grad is not None}

    (lp, op, gp), (la, oa, ga) = losses(True), losses(False)
    torch.testing.assert_close(op, oa, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lp, la, atol=1e-5, rtol=1e-5)
    assert gp.keys() == ga.keys()
    for n in gp:
        torch.testing.assert_close(gp[n], ga[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("arch", ["decoder", "encoder"])
def test_activation_checkpointing_gives_the_same_gradients(arch):
    ids = torch.randint(0, 50, (2, 7))
    grads = []
    for recompute in (False, True):
        model = tiny(arch, seed=3)
        stack = model.decoder if arch == "decoder" else model.encoder
        stack.checkpointing = recompute
        run(model, ids).float().square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5, msg=n)
