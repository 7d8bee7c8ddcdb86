"""tinyformer.export: GGUF files as the `gguf` package reads them (names, shapes, types, values decoded by its own
dequantizer), the same files run in llama.cpp (llama-cpp-python, installed by `make interop` / .ci/run; these tests
skip only where it does not import), Hugging Face folders in transformers, tinyformer.load reading both back, and the
bad inputs (one-line errors, nothing half-written)."""
import importlib.util
import os
import warnings

import numpy as np
import pytest
import torch

import tinyformer
from helpers import assert_close, tiny
from tinyformer.cli import main as cli
from tinyformer.compress import quantize_
from tinyformer.data import char_tokenizer
from tinyformer.export import ExportError, export
from tinyformer.kernels import unpack_int4

gguf = pytest.importorskip("gguf")
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
LLAMA = dict(n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=96, max_seq_len=64, norm="rmsnorm", pos="rope",
             act="swiglu", bias=False, norm_eps=1e-5)
GPT2 = dict(n_layer=2, n_head=4, d_model=64, d_ff=128, max_seq_len=64, act="gelu_tanh")


def with_chars(model):
    model.tokenizer = char_tokenizer(TEXT)
    return model


def llama(seed=0, **kw):
    tok = char_tokenizer(TEXT)
    return with_chars(tiny("decoder", seed, **{**LLAMA, "vocab_size": tok.get_vocab_size(), **kw}).eval())


def gpt2(seed=0, **kw):
    tok = char_tokenizer(TEXT)
    return with_chars(tiny("decoder", seed, **{**GPT2, "vocab_size": tok.get_vocab_size(), **kw}).eval())


def ids_of(model, n=48):
    return torch.tensor([model.tokenizer.encode(TEXT).ids[:n]])


def gguf_tensors(path):
    r = gguf.GGUFReader(str(path))
    return r, {t.name: t for t in r.tensors}


def f16(x):
    return x.half().float()


# ----------------------------------------------------------------------------------------------------------------------
# the file as the gguf package reads it
def test_llama_gguf_names_shapes_types_and_metadata(tmp_path):
    model = llama(tie_embeddings=False)
    quantize_(model, bits=4, group_size=32, float_zero=True)  # Q4_1's own grid
    b1 = model.decoder.blocks[1]
    b1.mlp.w2 = type(b1.mlp.w2).from_weight(torch.randn(64, 96), group_size=32)  # an integer zero point: Q4_1 too
    path = export(model, tmp_path / "m.gguf")
    r, t = gguf_tensors(path)
    Q41, F32 = gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.F32
    expected = {"token_embd.weight": ((64, 40), F32), "output.weight": ((64, 40), F32),
                "output_norm.weight": ((64,), F32)}
    for i in range(2):
        expected |= {f"blk.{i}.attn_norm.weight": ((64,), F32), f"blk.{i}.ffn_norm.weight": ((64,), F32),
                     f"blk.{i}.attn_q.weight": ((64, 64), Q41), f"blk.{i}.attn_k.weight": ((64, 32), Q41),
                     f"blk.{i}.attn_v.weight": ((64, 32), Q41), f"blk.{i}.attn_output.weight": ((64, 64), Q41),
                     f"blk.{i}.ffn_gate.weight": ((64, 96), Q41), f"blk.{i}.ffn_up.weight": ((64, 96), Q41),
                     f"blk.{i}.ffn_down.weight": ((96, 64), Q41)}
    got = {n: (tuple(int(x) for x in v.shape), v.tensor_type) for n, v in t.items()}
    vocab = model.config.vocab_size
    expected = {n: ((s[0], vocab) if s[1:] == (40,) else s, ty) for n, (s, ty) in expected.items()}
    assert got == expected  # GGUF lists the fastest axis first: (in, out)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 2
    assert (meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]) == (4, 2)
    assert meta["llama.rope.dimension_count"] == 16 and meta["llama.feed_forward_length"] == 96
    assert meta["tokenizer.ggml.model"] == "gpt2" and len(meta["tokenizer.ggml.tokens"]) == vocab
    assert meta["tokenizer.ggml.tokens"][model.tokenizer.token_to_id("\n")] == "\u010a"  # GPT-2's byte alphabet
    # values: gguf's own dequantizer against w = (q - zero) * scale from the layer's buffers, d and m in float16
    for name, lin in (("blk.1.ffn_down.weight", b1.mlp.w2), ("blk.0.attn_v.weight", model.decoder.blocks[0].attn.wv)):
        q = unpack_int4(lin.weight_packed).float()
        scale = lin.scales.repeat_interleave(32, 1)
        zero = lin.zeros.repeat_interleave(32, 1)
        want = f16(scale) * q + f16(-zero * scale)
        have = torch.from_numpy(gguf.quants.dequantize(t[name].data, t[name].tensor_type)).reshape(want.shape)
        assert_close(have, want, atol=1e-6, name=name)


def test_q8_0_and_q4_0_keep_the_codes_and_rope_rows_follow_llama_cpp(tmp_path):
    m8 = quantize_(llama(), bits=8)
    _, t = gguf_tensors(export(m8, tmp_path / "q8.gguf"))
    lin = m8.decoder.blocks[0].attn.wv
    assert t["blk.0.attn_v.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    want = lin.weight.float() * f16(lin.scale)[:, None]
    have = torch.from_numpy(gguf.quants.dequantize(t["blk.0.attn_v.weight"].data, gguf.GGMLQuantizationType.Q8_0))
    assert_close(have.reshape(want.shape), want, atol=1e-7, name="q8_0")
    m4 = quantize_(llama(), bits=4, group_size=32, symmetric=True)
    _, t = gguf_tensors(export(m4, tmp_path / "q4.gguf"))
    lin = m4.decoder.blocks[0].attn.wk  # (32, 64): 2 kv heads of 16, rows permuted to llama.cpp's adjacent pairs
    assert t["blk.0.attn_k.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0
    w = f16(lin.scales.repeat_interleave(32, 1)) * (unpack_int4(lin.weight_packed).float() - 8)  # (32, 64)
    have = torch.from_numpy(gguf.quants.dequantize(t["blk.0.attn_k.weight"].data, gguf.GGMLQuantizationType.Q4_0))
    have = have.reshape(32, 64)
    for h in range(2):
        for i in range(8):  # GGUF row h*16 + 2i + s is HF row h*16 + 8s + i
            for s in range(2):
                assert torch.equal(have[h * 16 + 2 * i + s], w[h * 16 + 8 * s + i])


def test_gpt2_gguf_fuses_qkv_and_reads_back(tmp_path):
    model = gpt2(act="gelu")
    path = export(model, tmp_path / "g.gguf")
    r, t = gguf_tensors(path)
    assert r.fields["general.architecture"].contents() == "gpt2"
    assert tuple(int(x) for x in t["blk.0.attn_qkv.weight"].shape) == (64, 192)
    assert tuple(int(x) for x in t["position_embd.weight"].shape) == (64, 64) and "output.weight" not in t
    qkv = torch.from_numpy(np.array(t["blk.1.attn_qkv.bias"].data))
    a = model.decoder.blocks[1].attn
    assert torch.equal(qkv, torch.cat([a.wq.bias, a.wk.bias, a.wv.bias]).detach())
    back = tinyformer.load(path)
    assert back.config.act == "gelu"
    x = ids_of(model)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    assert back.tokenizer.encode(TEXT).ids == model.tokenizer.encode(TEXT).ids


def test_float_and_quantized_llama_read_back_through_tinyformer_load(tmp_path):
    model = llama()
    x = ids_of(model)
    with torch.no_grad():
        assert torch.equal(tinyformer.load(export(model, tmp_path / "f.gguf"))(x), model(x))
        quantize_(model, bits=4, group_size=32)
        back = tinyformer.load(export(model, tmp_path / "q.gguf"))
        with tinyformer.use_backend("reference"):
            assert_close(back(x), model(x), atol=2e-3, name="q4_1 logits")  # d and m rounded to float16


# ----------------------------------------------------------------------------------------------------------------------
# llama.cpp
@pytest.fixture(scope="module")
def llama_cpp():
    if not HAS_LLAMA_CPP:
        pytest.skip("llama-cpp-python is not installed (make interop installs it)")
    import llama_cpp
    return llama_cpp


def run_llama_cpp(llama_cpp, path, ids):
    """llama.cpp's logits (T, V) for the prompt ids, float32 KV cache."""
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_batch=64, logits_all=True, verbose=False, seed=0, n_threads=2,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    llm.eval(ids)
    return llm, torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_llama_cpp_runs_the_float_export(llama_cpp, tmp_path, family):
    model = llama(tie_embeddings=False) if family == "llama" else gpt2()
    x = ids_of(model)
    llm, logits = run_llama_cpp(llama_cpp, export(model, tmp_path / "m.gguf"), x[0].tolist())
    with torch.no_grad():
        want = model(x)[0]
    # llama: float32 throughout (1e-7 seen); gpt2: llama.cpp's GELU reads a float16 table (8e-5 seen)
    assert_close(logits, want, atol=1e-5 if family == "llama" else 1e-3, name=f"{family} logits")
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == model.tokenizer.encode(TEXT).ids


def test_llama_cpp_runs_the_q4_1_codes(llama_cpp, tmp_path):
    model = quantize_(llama(), bits=4, group_size=32)
    x = ids_of(model)
    _, logits = run_llama_cpp(llama_cpp, export(model, tmp_path / "q.gguf"), x[0].tolist())
    with torch.no_grad(), tinyformer.use_backend("reference"):
        want = model(x)[0]
    # llama.cpp quantizes the activations to 8 bits (Q8_1) for its Q4_1 dot products (1.8e-3 seen)
    assert_close(logits, want, atol=1e-2, name="q4_1 logits")
    assert (logits.argmax(-1) == want.argmax(-1)).float().mean() > 0.95


# ----------------------------------------------------------------------------------------------------------------------
# transformers
@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed")
@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_transformers_loads_the_hf_export(tmp_path, family):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    model = {"llama": llama, "gpt2": gpt2}.get(family, lambda: tiny(
        "encoder", 0, n_layer=2, d_model=64, n_head=4, vocab_size=60, max_seq_len=64, norm_position="post",
        embed_norm=True, type_vocab_size=2, norm_eps=1e-12).eval())()
    if family == "llama":
        quantize_(model, bits=4, group_size=32)  # written as its exact float weights
    path = export(model, tmp_path / "hf", format="hf")
    x = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings(), tinyformer.use_backend("reference"):
        warnings.simplefilter("ignore")
        if family == "bert":
            theirs = AutoModel.from_pretrained(path).eval()(x).last_hidden_state
        else:
            theirs = AutoModelForCausalLM.from_pretrained(path).eval()(x).logits
            assert AutoTokenizer.from_pretrained(path)(TEXT).input_ids == model.tokenizer.encode(TEXT).ids
        assert_close(theirs, model(x), atol=1e-4, name=f"{family} in transformers")
        assert_close(tinyformer.load(path)(x), model(x), atol=1e-5, name=f"{family} read back")


# ----------------------------------------------------------------------------------------------------------------------
# bad inputs
def test_bad_inputs_get_one_line_errors(tmp_path):
    with pytest.raises(ExportError, match="encoder-decoder model has no llama.cpp architecture"):
        export(tiny("encoder-decoder"), tmp_path / "x.gguf")
    with pytest.raises(ExportError, match="no such model"):
        export(tmp_path / "missing", tmp_path / "x.gguf")
    with pytest.raises(ExportError, match="quant must be one of"):
        export(llama(), tmp_path / "x.gguf", quant="q3_k")
    with pytest.raises(ExportError, match="GGUF block type"):
        export(llama(), tmp_path / "x", format="hf", quant="q4_0")
    wide = llama()
    wide.tokenizer = char_tokenizer(TEXT + "é")
    with pytest.raises(ExportError, match="not single ASCII characters"):
        export(wide, tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())  # nothing written by any of them
    m = quantize_(llama(), bits=4, group_size=32)
    with pytest.raises(ExportError, match="strict"):
        export(m, tmp_path / "x.gguf", quant="q4_0", strict=True)
    rc = cli(["export", "--model", str(tmp_path / "missing"), "--format", "gguf", "--out", str(tmp_path / "y.gguf")])
    assert rc == 2


def test_requantizing_warns_with_the_layer_names(tmp_path):
    m = quantize_(llama(), bits=4, group_size=32)  # asymmetric: Q4_0 cannot hold it
    with pytest.warns(UserWarning, match=r"14 layer\(s\) requantized to q4_0.*decoder.blocks.0.attn.wq"):
        path = export(m, tmp_path / "x.gguf", quant="q4_0")
    _, t = gguf_tensors(path)
    assert t["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0


def test_a_grid_no_block_holds_is_written_as_its_f32_weights(tmp_path):
    m = quantize_(llama(d_ff=80), bits=4, group_size=32)  # w2 reads 80 inputs: no whole 32-blocks
    with pytest.warns(UserWarning, match=r"2 quantized layer\(s\) written as their F32 weights.*"
                                         r"decoder.blocks.0.mlp.w2, decoder.blocks.1.mlp.w2"):
        path = export(m, tmp_path / "x.gguf")
    _, t = gguf_tensors(path)
    assert t["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert t["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_1
    lin = m.decoder.blocks[0].mlp.w2
    q = unpack_int4(lin.weight_packed).float()[:, :80]
    want = ((q - lin.zeros.repeat_interleave(32, 1)[:, :80]) * lin.scales.repeat_interleave(32, 1)[:, :80])
    have = torch.from_numpy(np.array(t["blk.0.ffn_down.weight"].data)).reshape(want.shape)
    assert_close(have, want, atol=1e-6, name="f32 weights of an int4 layer")
    with pytest.raises(ExportError, match="not a multiple of 32"):
        export(m, tmp_path / "y.gguf", quant="q4_1")


def test_existing_output_needs_overwrite_and_a_failed_write_leaves_it_whole(tmp_path, monkeypatch):
    path = tmp_path / "m.gguf"
    export(llama(), path)
    before = path.read_bytes()
    with pytest.raises(ExportError, match="overwrite"):
        export(llama(seed=1), path)
    folder = tmp_path / "hf"
    export(llama(), folder, format="hf")
    with pytest.raises(ExportError, match="overwrite"):
        export(llama(), folder, format="hf")

    def boom(self, *a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(OSError, match="disk full"):
        export(llama(seed=1), path, overwrite=True)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "m.gguf"]  # no temporary file left
    monkeypatch.undo()
    export(llama(seed=1), path, overwrite=True)
    assert path.read_bytes() != before


def test_cli_export_quantizes_a_float_model(tmp_path, capsys):
    src = tmp_path / "model"
    llama().save(src)
    out = tmp_path / "m.gguf"
    assert cli(["export", "--model", str(src), "--format", "gguf", "--out", str(out), "--quant", "q4_0"]) == 0
    assert "wrote" in capsys.readouterr().out
    _, t = gguf_tensors(out)
    assert t["blk.1.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0
    assert t["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F32
