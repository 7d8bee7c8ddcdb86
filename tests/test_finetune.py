"""Tests of tinyformer.finetune (LoRA and QLoRA, Hu et al. 2021; Dettmers et al. 2023) and of the input gradient of
the int8 / int4 weight-only products it trains through: B = 0 changes nothing, merge / unmerge is bit-exact, only
adapters (and `train` modules) get gradients, QLoRA's gradients equal a float model's on the dequantized weights, and
the adapter files round-trip with Hugging Face PEFT both ways (peft reads ours onto transformers' model, tinyformer
reads peft's) on tiny random Llama and BERT models. Tolerances by dtype next to the dtype."""
import copy
import json
import os

import pytest
import torch
from helpers import assert_close, tiny

import tinyformer
from tinyformer import finetune as ft
from tinyformer import ops
from tinyformer.compress import quantize_
from tinyformer.kernels import reference
from tinyformer.model import Linear
from tinyformer.qlinear import Int4Linear, Int8Linear

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LLAMA = dict(pos="rope", act="swiglu", norm="rmsnorm", n_kv_head=2, bias=False)


def _ids(vocab=50, shape=(2, 9), seed=1):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _randomize_b(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in ft.lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
    return model


# ----------------------------------------------------------------------------------------------------------------------
# LoRA on a float base
@pytest.mark.parametrize("arch,kw", [("decoder", LLAMA), ("encoder", {}), ("encoder-decoder", {})])
def test_b_zero_changes_no_output(arch, kw):
    model = tiny(arch, **kw).eval()
    args = (_ids(), _ids(seed=2)) if arch == "encoder-decoder" else (_ids(),)
    with torch.no_grad():
        before = model(*args)
        ft.add_lora_(model, rank=4)
        after = model(*args)
    assert ft.lora_modules(model) and torch.equal(before, after)


def test_default_targets_and_aliases():
    model = ft.add_lora_(tiny("decoder", **LLAMA), rank=2)
    names = set(ft.lora_modules(model))
    assert {f"decoder.blocks.{i}.{m}" for i in range(2) for m in
            ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.w1", "mlp.w2", "mlp.w3")} == names
    model = ft.add_lora_(tiny("decoder", **LLAMA), rank=2, targets=["q_proj", "v_proj"])
    assert set(ft.lora_modules(model)) == {f"decoder.blocks.{i}.attn.{w}" for i in range(2) for w in ("wq", "wv")}
    model = ft.add_lora_(tiny("encoder"), rank=2, targets=["query", "attention.output.dense", "output.dense"])
    assert set(ft.lora_modules(model)) == {f"encoder.blocks.{i}.{w}" for i in range(2)
                                           for w in ("attn.wq", "attn.wo", "mlp.w2")}
    model = ft.add_lora_(tiny("decoder"), rank=2, targets=[r"decoder\.blocks\.1\.attn\.w[qk]", "*.0.mlp.w1"])
    assert set(ft.lora_modules(model)) == {"decoder.blocks.1.attn.wq", "decoder.blocks.1.attn.wk",
                                           "decoder.blocks.0.mlp.w1"}
    assert ft.lora_modules(model)["decoder.blocks.0.mlp.w1"].scaling == ft.DEFAULT_ALPHA / 2


def test_a_is_initialised_as_peft_does():
    model = ft.add_lora_(tiny("decoder", d_model=64), rank=8, alpha=16)
    m = ft.lora_modules(model)["decoder.blocks.0.attn.wq"]
    bound = 1 / 64 ** 0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 64: U(-1/sqrt(64), 1/sqrt(64))
    assert m.lora_A.abs().max() <= bound and m.lora_A.abs().max() > 0.8 * bound
    assert not m.lora_B.any() and m.scaling == 2.0


def test_merge_unmerge_bit_exact_and_merged_outputs():
    model = _randomize_b(ft.add_lora_(tiny("decoder", **LLAMA), rank=4, alpha=8)).eval()
    ids = _ids()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = model(ids)
        ft.merge_lora_(model)
        got = model(ids)
    assert_close(got, want, atol=1e-5, rtol=1e-5, name="merged logits")
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    ft.unmerge_lora_(model)
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v), k
    with torch.no_grad():
        assert torch.equal(model(ids), want)


def test_unloaded_model_saves_and_loads_as_a_plain_model(tmp_path):
    model = _randomize_b(ft.add_lora_(tiny("decoder", **LLAMA), rank=4)).eval()
    ids = _ids()
    with torch.no_grad():
        want = model(ids)
    with pytest.raises(ValueError, match="the model has LoRA adapters"):  # wrapped layers no loader reads
        model.save(tmp_path / "wrapped")
    assert not (tmp_path / "wrapped").exists()
    ft.merge_lora_(model, unload=True)
    assert not ft.lora_modules(model) and not any("lora" in k or ".base." in k for k in model.state_dict())
    model.save(tmp_path / "merged")
    loaded = tinyformer.load(tmp_path / "merged")
    with torch.no_grad():
        assert_close(loaded(ids), want, atol=1e-5, rtol=1e-5, name="reloaded merged logits")


def test_only_adapters_and_train_modules_get_gradients():
    model = ft.add_lora_(tiny("encoder"), rank=2, targets=["wq", "wv"], train=["blocks.1.norm2"])
    model.train()
    model(_ids()).square().mean().backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    want = {f"encoder.blocks.{i}.attn.{w}.lora_{ab}" for i in range(2) for w in ("wq", "wv") for ab in "AB"}
    want |= {"encoder.blocks.1.norm2.weight", "encoder.blocks.1.norm2.bias"}
    assert got == want
    assert {n for n, p in model.named_parameters() if p.requires_grad} == want
    assert set(ft.trainable_state_dict(model)) == want


def test_adapted_layers_products(monkeypatch):
    """With adapters on q/k/v (or only some of them): frozen bases run one product each (concatenating them again at
    every step costs more than the wider product saves), trainable bases one product over their stacked weights; both
    give the merged model's output, and the adapters get gradients."""
    model = _randomize_b(ft.add_lora_(tiny("decoder", **LLAMA), rank=2, targets=["wq", "wv", "w1", "w3"])).train()
    ids = _ids()
    want = ft.unload_lora(copy.deepcopy(model))(ids)  # the merged plain model: per-layer products, no adapters
    real = ops.linear
    for trainable in (False, True):
        for m in ft.lora_modules(model).values():
            m.base.weight.requires_grad_(trainable)
        calls = []
        monkeypatch.setattr(ops, "linear", lambda x, w, b=None: calls.append(tuple(w.shape)) or real(x, w, b))
        got = model(ids)
        monkeypatch.setattr(ops, "linear", real)
        assert_close(got, want, atol=1e-5, rtol=1e-5, name=f"trainable base {trainable}")
        assert ((32 + 16 + 16, 32) in calls) == trainable  # q | k | v stacked: (H + 2 Hkv) * Dh rows
        grads = torch.autograd.grad(got.sum(), [m.lora_A for m in ft.lora_modules(model).values()])
        assert all(g.abs().sum() > 0 for g in grads)


# ----------------------------------------------------------------------------------------------------------------------
# the input gradient of the low-bit products (QLoRA's path), every backend, ragged shapes
def _int_layer(bits, n_out, n_in, group_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(n_out, n_in, generator=g) * 0.1, torch.randn(n_out, generator=g)
    layer = Int8Linear.from_weight(w, b) if bits == 8 else Int4Linear.from_weight(w, b, group_size=group_size)
    return layer, _dequantized(layer)


def _dequantized(layer):
    if isinstance(layer, Int8Linear):
        return layer.weight.float() * layer.scale[:, None]
    w = reference.dequantize_int4(layer.weight_packed, layer.scales, layer.zeros, layer.group_size)  # (N, Kp)
    return w[:, : layer.n_in]


BACKENDS = ["reference", "torch"] + (["triton"] if ops.HAS_TRITON else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32), (4, 128)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])  # bf16: 1 ulp of dx's rounding
@pytest.mark.parametrize("M,K,N", [(5, 77, 48), (13, 130, 32)])  # K not a multiple of any group, M and K ragged
def test_low_bit_input_gradient(backend, bits, group_size, dtype, tol, M, K, N):
    layer, w = _int_layer(bits, N, K, group_size)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_()
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(2)).to(dtype)
    with ops.use_backend(backend):
        layer(x).backward(dy)
    want = (dy.float() @ w).to(dtype)  # the float reference on the dequantized weight
    assert x.grad.dtype == dtype
    assert_close(x.grad, want, atol=tol * (dy.float().abs() @ w.abs()), rtol=tol, name=f"dx {backend} int{bits}")


def test_no_autograd_function_without_grad(monkeypatch):
    layer, _ = _int_layer(4, 32, 64, 32)
    from tinyformer.kernels import matmul
    monkeypatch.setattr(matmul.FrozenWeightMatmul, "apply", lambda *a: pytest.fail("autograd.Function used"))
    with torch.no_grad():
        layer(torch.randn(3, 64, requires_grad=True))
    layer(torch.randn(3, 64))  # grad mode on, but x needs no gradient


# ----------------------------------------------------------------------------------------------------------------------
# QLoRA: adapters over a frozen int8 / int4 base
def _float_twin(qmodel, fmodel):
    """fmodel's linears set to qmodel's dequantized weights (the float model QLoRA must agree with)."""
    qmods = dict(qmodel.named_modules())
    with torch.no_grad():
        for name, m in fmodel.named_modules():
            if type(m) is Linear and isinstance(qmods.get(name), (Int8Linear, Int4Linear)):
                m.weight.copy_(_dequantized(qmods[name]))
    return fmodel


@pytest.mark.parametrize("bits", [8, 4])
def test_qlora_gradients_match_the_dequantized_float_model(bits):
    cfg = dict(**LLAMA, d_model=64, d_ff=96)
    qmodel = quantize_(tiny("decoder", **cfg), bits=bits, group_size=32)
    fmodel = _float_twin(qmodel, tiny("decoder", **cfg))
    for m in (qmodel, fmodel):
        torch.manual_seed(5)
        _randomize_b(ft.add_lora_(m, rank=4, targets=["wq", "wk", "wv", "w2"]))
    ids = _ids()
    grads = []
    for m in (qmodel, fmodel):
        with ops.use_backend("reference"):  # both forwards in fp32: the comparison sees the backward alone
            m.train()
            m(ids).logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) == 2 * 4 * 2
    for n, g in grads[0].items():
        assert g.abs().sum() > 0, n
        assert_close(g, grads[1][n], atol=1e-5, rtol=1e-3, name=n)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_base_is_round_to_nearest_of_the_blocks(bits):
    """quantize_base_ gives the codes compress.quantize_'s RTN gives the blocks' linears; the rest stays float."""
    ours = ft.quantize_base_(tiny("decoder", **LLAMA), bits, group_size=32)
    theirs = quantize_(tiny("decoder", **LLAMA), bits=bits, group_size=32)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ours.wte.dtype == torch.float32 and ours.wte.requires_grad
    with pytest.raises(ValueError, match="8 or 4 bits"):
        ft.quantize_base_(tiny("decoder"), 3)


def test_qlora_trains_on_the_torch_backend_and_refuses_to_merge():
    model = ft.add_lora_(quantize_(tiny("decoder", **LLAMA), bits=4, group_size=32), rank=4)
    model.train()
    model(_ids()).logsumexp(-1).mean().backward()
    assert all(m.lora_B.grad.abs().sum() > 0 for m in ft.lora_modules(model).values())
    with pytest.raises(ValueError, match="dequantize first"):
        ft.merge_lora_(model)


# ----------------------------------------------------------------------------------------------------------------------
# PEFT's files, both ways
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_bert(tmp_path_factory):
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=32)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bert")
    transformers.BertModel(cfg, add_pooling_layer=False).save_pretrained(path)
    return path


def _hf_out(kind, model, ids):
    return model(ids).logits if kind == "llama" else model(input_ids=ids).last_hidden_state


def _hf_model(kind, path):
    if kind == "llama":
        return transformers.LlamaForCausalLM.from_pretrained(path).eval()
    return transformers.BertModel.from_pretrained(path, add_pooling_layer=False).eval()  # tinyformer has no pooler


@pytest.mark.parametrize("kind,targets", [("llama", None), ("llama", ["q_proj", "v_proj"]),
                                          ("bert", None), ("bert", ["output.dense", "key"])])
def test_our_adapter_loads_in_peft(kind, targets, hf_llama, hf_bert, tmp_path):
    base = hf_llama if kind == "llama" else hf_bert
    model = _randomize_b(ft.add_lora_(tinyformer.load(base), rank=4, alpha=16, targets=targets)).eval()
    ft.save_adapter(model, tmp_path / "adapter")
    ids = _ids(64)
    peft_model = peft.PeftModel.from_pretrained(_hf_model(kind, base), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert_close(model(ids), _hf_out(kind, peft_model, ids), atol=1e-4, rtol=1e-4, name="peft vs tinyformer")
    ours = set(json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"])
    assert len(ours) <= 7  # names, not one entry per layer, where PEFT's suffix rule allows


@pytest.mark.parametrize("kind,targets", [("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"]),
                                          ("bert", ["query", "value", "dense"])])
def test_peft_adapter_loads_in_tinyformer(kind, targets, hf_llama, hf_bert, tmp_path):
    base = hf_llama if kind == "llama" else hf_bert
    cfg = peft.LoraConfig(r=4, lora_alpha=12, target_modules=targets, rank_pattern={targets[2]: 2},
                          alpha_pattern={targets[0]: 6})
    torch.manual_seed(1)
    peft_model = peft.get_peft_model(_hf_model(kind, base), cfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    model = tinyformer.load(base, adapter=tmp_path / "adapter")
    ids = _ids(64)
    with torch.no_grad():
        assert_close(model(ids), _hf_out(kind, peft_model.eval(), ids), atol=1e-4, rtol=1e-4, name="peft adapter")
    assert {m.rank for m in ft.lora_modules(model).values()} == {2, 4}
    assert {m.alpha for m in ft.lora_modules(model).values()} == {6, 12}


def test_adapter_errors(hf_llama, tmp_path):
    model = _randomize_b(ft.add_lora_(tinyformer.load(hf_llama), rank=4)).eval()
    ft.save_adapter(model, tmp_path / "good")
    from safetensors.torch import load_file, save_file
    cfg = json.loads((tmp_path / "good" / "adapter_config.json").read_text())
    state = load_file(tmp_path / "good" / "adapter_model.safetensors")

    def variant(name, cfg=cfg, state=state):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps(cfg))
        save_file(state, tmp_path / name / "adapter_model.safetensors")
        return tmp_path / name

    with pytest.raises(ValueError, match="adapter_model.safetensors is missing"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "adapter_config.json").write_text("{}")
        tinyformer.load(hf_llama, adapter=tmp_path / "empty")
    with pytest.raises(ValueError, match="peft_type 'IA3' is not supported"):
        tinyformer.load(hf_llama, adapter=variant("ia3", cfg={**cfg, "peft_type": "IA3"}))
    key = next(k for k in state if k.endswith("q_proj.lora_A.weight"))
    with pytest.raises(ValueError, match="names no linear layer"):
        tinyformer.load(hf_llama, adapter=variant("name", state={**state, key.replace("layers.0", "layers.9"):
                                                               state[key].clone()}))
    with pytest.raises(ValueError, match=r"expected \(4, 32\)"):
        tinyformer.load(hf_llama, adapter=variant("shape", state={**state, key: torch.zeros(4, 31)}))
    with pytest.raises(ValueError, match="matches no linear layer"):
        ft.add_lora_(tiny("decoder"), rank=2, targets=["no_such_proj"])
    with pytest.raises(ValueError, match="no LoRA adapters"):
        ft.save_adapter(tiny("decoder"), tmp_path / "none")


def test_save_adapter_is_atomic(hf_llama, tmp_path, monkeypatch):
    model = _randomize_b(ft.add_lora_(tinyformer.load(hf_llama), rank=4))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "ckpt.pt").write_text("a training run's checkpoint")
    ft.save_adapter(model, tmp_path / "a")
    ft.save_adapter(model, tmp_path / "a")  # a run's out_dir: the adapter is rewritten, the rest stays
    assert (tmp_path / "a" / "ckpt.pt").read_text() == "a training run's checkpoint"
    before = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    import safetensors.torch

    def crash(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(safetensors.torch, "save", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        ft.save_adapter(model, tmp_path / "a")
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
