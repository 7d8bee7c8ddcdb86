"""Loading models: `tinyformer.load(path)` reads a tinyformer folder (written by `model.save`), a Hugging Face BERT,
Llama or GPT-2 folder, or a Llama or GPT-2 GGUF file into tinyformer's own modules. The name tables here are also
the ones tinyformer.export writes with.

A tinyformer folder: config.json names the model's config and what compression changed (quantized and low-rank
modules, pruned shapes); the model is built on the meta device with those modules in place, and the memory-mapped
safetensors tensors are assigned (`load_state_dict(assign=True)`): no random init, no second copy.

Foreign formats: `load_foreign(path)` reads the foreign config into a `ModelConfig`, builds the model on the meta device
(`tinyformer.build(config, init=False)`), renames (and, for GGUF, dequantizes and un-permutes) the tensors onto
tinyformer's parameter names, checks every name and shape, and assigns them (`load_state_dict(assign=True)`). There is
no second model implementation: the loaded model is a plain `Encoder` / `DecoderLM` and saves as a tinyformer
checkpoint. A missing, extra or wrongly shaped tensor is an error that names it, never a half-loaded model.

Formats read (the fields used are listed next to each reader below):
- Hugging Face `config.json` for BERT (`BertConfig`: hidden_size, num_hidden_layers, num_attention_heads,
  intermediate_size, hidden_act, max_position_embeddings, type_vocab_size, layer_norm_eps, position_embedding_type)
  and Llama (`LlamaConfig`: ... num_key_value_heads, head_dim, rms_norm_eps, rope_theta / rope_parameters,
  rope_scaling, tie_word_embeddings, attention_bias, mlp_bias) and GPT-2 (`GPT2Config`: n_embd, n_layer, n_head,
  n_inner, n_positions, activation_function, layer_norm_epsilon; Conv1D weights (in, out), q | k | v fused), weights
  in `model.safetensors` or sharded with `model.safetensors.index.json`; the tokenizer from `tokenizer.json` (BERT:
  `vocab.txt` as a fallback) and the chat template from `tokenizer_config.json` or `chat_template.jinja`.
- GGUF v2/v3 (ggml-org/ggml docs/gguf.md), read with the `gguf` package (`GGUFReader`, `quants.dequantize`): the
  `llama.*` metadata keys, llama.cpp's tensor names (`token_embd`, `blk.N.attn_q`, ..., `output_norm`, `output`), and
  the `gpt2.*` keys and tensors (`position_embd`, `blk.N.attn_qkv`, ...; the GELU is tanh-approximate, as llama.cpp
  computes it, unless `tinyformer.activation` says "gelu"), the `tokenizer.ggml.*` keys of a "gpt2" (byte-level BPE)
  vocabulary with its pre-tokenizer type (`tokenizer.ggml.pre`, whose split rules follow llama.cpp's llama-vocab.cpp).

Rotary layout: Hugging Face Llama (and tinyformer) rotate the pairs (i, i + Dh/2) of each head ("rotate half").
llama.cpp rotates adjacent pairs (2i, 2i + 1), so its HF -> GGUF converter permutes the rows of wq and wk within
every head, HF row (s, i) -> GGUF row (i, s) for half s in {0, 1} and i < Dh/2. `_unpermute_rope_rows` undoes that.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

from tinyformer.checkpoint import FORMAT, FORMAT_VERSION, TOKENIZER_EXTRAS, read_config
from tinyformer.compress.prune import apply_structure
from tinyformer.config import ModelConfig
from tinyformer.model import build
from tinyformer.names import BERT_MLM as _BERT_MLM
from tinyformer.names import bert_name as _bert_name, block_index as _block_index, llama_name as _llama_name
from tinyformer.qlinear import swap_in_empty

__all__ = ["load", "load_foreign", "load_hf", "load_gguf", "gguf_tokenizer", "gpt2_name", "gpt2_unfuse",
           "permute_rope_rows"]


def load(path, device="cpu", adapter=None):
    """A model from a tinyformer folder (`model.save`), a Hugging Face BERT/Llama folder or a Llama GGUF file, in
    eval mode on `device`; `adapter`: a PEFT LoRA adapter folder read onto it (`tinyformer.finetune.load_adapter`).
    `path` may also be an adapter folder alone (a LoRA run's out_dir): its base is the one adapter_config.json names
    (base_model_name_or_path)."""
    path = Path(path)
    if adapter is None and path.is_dir() and (path / "adapter_config.json").exists() and \
            not (path / "config.json").exists():
        try:
            base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path / 'adapter_config.json'} is not valid JSON: {e}") from None
        if not base or not Path(base).exists():
            raise ValueError(f"{path} is a LoRA adapter whose base model ({base!r}) is not a path here: load it with "
                             f"tinyformer.load(BASE, adapter='{path}')")
        path, adapter = Path(base), path
    model = _load(path, device)
    if adapter is not None:
        from tinyformer.finetune import load_adapter
        load_adapter(model, adapter)
    return model


def _load(path, device):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_file() and path.suffix == ".gguf" or path.is_dir() and (path / "config.json").exists() and \
            read_config(path).get("format") != FORMAT:
        return load_foreign(path, device=device)  # Hugging Face folders and GGUF files
    meta = read_config(path)
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer tinyformer (format {meta['format_version']})")
    config = ModelConfig.from_dict(meta["model"])
    weights = path / "model.safetensors"
    if not weights.exists():
        raise ValueError(f"{path} has a config.json but no model.safetensors")
    try:
        state = load_file(weights, device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights} is unreadable or truncated: {e}") from None
    # safetensors' memory map places tensors at any byte offset; torch's packed int8 CPU kernel (AVX-512) segfaults
    # on weights not 64-byte aligned (seen: offset 56, M = 32), so such tensors get an aligned copy, once
    state = {k: v.clone() if v.data_ptr() % 64 else v for k, v in state.items()}
    with torch.device("meta"):
        model = build(config, init=False)
        if meta.get("structure"):  # structurally pruned: shrink those modules first (quantized ones swap in after)
            apply_structure(model, meta["structure"])
        if meta.get("quantization"):
            swap_in_empty(model, meta["quantization"])
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"{weights} does not match its config.json: {e}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{weights} does not match its config.json: missing {result.missing_keys[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
    for name, p in model.state_dict().items():
        if p.device.type == "meta":
            raise ValueError(f"{weights} left {name} unset")
    with torch.device(device):
        model.init_buffers()
    for k, v in meta.get("tokenizer", {}).items():
        if k in TOKENIZER_EXTRAS:
            setattr(model, k, v)
    if meta.get("pruning"):
        model.pruning = meta["pruning"]
    tok = path / "tokenizer.json"
    if tok.exists():
        from tokenizers import Tokenizer
        model.tokenizer = Tokenizer.from_file(str(tok))
    return model.eval()


def load_foreign(path, device="cpu", dtype: torch.dtype = torch.float32):
    """A Hugging Face BERT/Llama folder or a Llama `.gguf` file -> a tinyformer model in eval mode.

    Floating-point weights are cast to `dtype` (float32 by default; GGUF weights are dequantized to it). The model
    gets `.tokenizer` (a `tokenizers.Tokenizer` or None), `.chat_template` (a Jinja string or None) and
    `.bos_token_id` / `.eos_token_id` (ints or None)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such model file or folder: {path}")
    if path.is_file():
        if path.suffix == ".gguf":
            return load_gguf(path, device=device, dtype=dtype)
        raise ValueError(f"{path} is a file but not a .gguf file; give a GGUF file or a Hugging Face model folder")
    return load_hf(path, device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------------
# shared: build on meta, check every tensor, assign
def _assemble(config, source: dict, name_of: Callable[[str], str], ignore: Callable[[str], bool], where: str,
              device, dtype):
    """Build `config` on the meta device and assign `source[name_of(ours)]` to each of our parameters.

    Raises ValueError naming the tensor when one is missing, has the wrong shape, or when `source` holds a tensor
    that nothing uses (and `ignore` does not excuse)."""
    with torch.device("meta"):
        model = build(config, init=False)
    state, used = {}, set()
    for ours, meta in model.state_dict().items():
        theirs = name_of(ours)
        if theirs not in source:
            raise ValueError(f"{where}: tensor {theirs!r} is missing (needed for {ours} by this config)")
        t = source[theirs]
        if tuple(t.shape) != tuple(meta.shape):
            raise ValueError(f"{where}: tensor {theirs!r} has shape {tuple(t.shape)}, but the config needs "
                             f"{tuple(meta.shape)} for {ours}")
        if not t.is_floating_point():
            raise ValueError(f"{where}: tensor {theirs!r} has dtype {t.dtype}; expected floating point weights")
        state[ours] = t.to(device=device, dtype=dtype).contiguous()
        used.add(theirs)
    extra = sorted(k for k in source if k not in used and not ignore(k))
    if extra:
        raise ValueError(f"{where}: {len(extra)} tensor(s) that this {config.arch} config has no place for, e.g. "
                         f"{extra[:5]} (an unsupported variant of the architecture?)")
    model.load_state_dict(state, strict=True, assign=True)
    with torch.device(device):
        model.init_buffers()
    model.tokenizer, model.chat_template, model.bos_token_id, model.eos_token_id = None, None, None, None
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------------
# Hugging Face folders (their parameter names: tinyformer.names)
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _read_safetensors(folder: Path) -> dict:
    """All tensors of model.safetensors, or of the shards listed in model.safetensors.index.json."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.exists():
        files = [single]
    elif index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no weight_map")
        files = [folder / f for f in sorted(set(weight_map.values()))]
    else:
        bins = sorted(p.name for p in folder.glob("*.bin"))
        hint = f" ({', '.join(bins)} are pickles, which tinyformer does not load: convert them to safetensors)" \
            if bins else ""
        raise ValueError(f"{folder} has a config.json but no model.safetensors or "
                         f"model.safetensors.index.json{hint}")
    state = {}
    for f in files:
        if not f.exists():
            raise ValueError(f"{f} is listed in {index.name} but missing")
        try:
            state.update(load_file(f))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{f} is unreadable or truncated: {e}") from None
    return state


def _hf_chat_template(folder: Path) -> Optional[str]:
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    cfg = folder / "tokenizer_config.json"
    if cfg.exists():
        tpl = _read_json(cfg).get("chat_template")
        if isinstance(tpl, list):  # several named templates: take the default one
            named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
            tpl = named.get("default", next(iter(named.values()), None))
        return tpl if isinstance(tpl, str) else None
    return None


def _hf_tokenizer(folder: Path, bert: bool):
    from tokenizers import Tokenizer

    if (folder / "tokenizer.json").exists():
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        # sentence-transformers folders pad every encoding to a fixed length (128 for MiniLM); like transformers'
        # tokenizer we leave padding to the caller (a batch pads to its longest row). Truncation stays as saved.
        tok.no_padding()
        return tok
    if bert and (folder / "vocab.txt").exists():
        return _bert_wordpiece(folder)
    return None


def _bert_wordpiece(folder: Path):
    """BERT's WordPiece tokenizer from vocab.txt (+ do_lower_case in tokenizer_config.json), when there is no
    tokenizer.json: BertNormalizer, BertPreTokenizer, [CLS] A [SEP] / [CLS] A [SEP] B [SEP]."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = {}
    for i, line in enumerate((folder / "vocab.txt").read_text(encoding="utf-8").splitlines()):
        vocab.setdefault(line.rstrip("\r"), i)
    for special in ("[UNK]", "[CLS]", "[SEP]"):
        if special not in vocab:
            raise ValueError(f"{folder / 'vocab.txt'} has no {special} token")
    lower = True
    if (folder / "tokenizer_config.json").exists():
        lower = bool(_read_json(folder / "tokenizer_config.json").get("do_lower_case", True))
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lower)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.BertProcessing(("[SEP]", vocab["[SEP]"]), ("[CLS]", vocab["[CLS]"]))
    tok.decoder = decoders.WordPiece()
    return tok


def load_hf(folder, device="cpu", dtype: torch.dtype = torch.float32):
    """A Hugging Face folder (config.json + safetensors) of model_type "bert" or "llama" -> Encoder / DecoderLM."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise ValueError(f"{folder} is not a Hugging Face model folder: it has no config.json")
    hf = _read_json(cfg_path)
    model_type = hf.get("model_type")
    if model_type == "bert":
        source = _normalize_bert_source(_read_safetensors(folder))
        decoder, words = source.get("cls.predictions.decoder.weight"), source.get(_bert_name("wte"))
        if decoder is not None and words is not None and not torch.equal(decoder, words):
            raise ValueError(f"{folder}: the masked-LM decoder weight differs from the word embeddings (an untied "
                             f"head); tinyformer's BERT head is tied")
        config = _bert_config(hf, cfg_path, mlm_head="bert" if _BERT_MLM["mlm_dense.weight"] in source else "none")
        model = _assemble(config, source, _bert_name, _bert_ignore, str(folder), device, dtype)
        model.tokenizer = _hf_tokenizer(folder, bert=True)
    elif model_type == "llama":
        config = _llama_config(hf, cfg_path)
        source = _read_safetensors(folder)
        prefix = "model." if any(k.startswith("model.") for k in source) else ""  # "" for a bare LlamaModel
        model = _assemble(config, source, lambda n: _llama_name(n, prefix), _llama_ignore(config), str(folder),
                          device, dtype)
        model.tokenizer = _hf_tokenizer(folder, bert=False)
        model.chat_template = _hf_chat_template(folder)
        bos, eos = hf.get("bos_token_id"), hf.get("eos_token_id")
        model.bos_token_id = bos[0] if isinstance(bos, list) and bos else bos
        model.eos_token_id = eos[0] if isinstance(eos, list) and eos else eos
    elif model_type == "gpt2":
        config = _gpt2_config(hf, cfg_path)
        source = _read_safetensors(folder)
        prefix = "transformer." if any(k.startswith("transformer.") for k in source) else ""  # "" for GPT2Model
        source = gpt2_unfuse(source, config, GPT2_HF, prefix)
        model = _assemble(config, source, lambda n: n, lambda n: n in _GPT2_IGNORE or n.endswith(".attn.bias")
                          or n.endswith(".attn.masked_bias"), str(folder), device, dtype)
        model.tokenizer = _hf_tokenizer(folder, bert=False)
        model.chat_template = _hf_chat_template(folder)
        model.bos_token_id, model.eos_token_id = hf.get("bos_token_id"), hf.get("eos_token_id")
    else:
        archs = hf.get("architectures")
        raise ValueError(f"{cfg_path}: model_type {model_type!r} (architectures {archs}) is not supported; "
                         f"tinyformer loads Hugging Face model_type 'bert', 'llama' and 'gpt2' folders and llama "
                         f"and gpt2 GGUF files")
    return model


def _need(hf: dict, key: str, where) -> int:
    if key not in hf:
        raise ValueError(f"{where}: no {key!r}")
    return hf[key]


# --- BERT: BertModel / BertFor* checkpoints (weights may carry a "bert." prefix)
_BERT_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def _bert_config(hf: dict, where, mlm_head: str = "none"):
    act = hf.get("hidden_act", "gelu")
    if act not in _BERT_ACTS:
        raise ValueError(f"{where}: hidden_act {act!r} is not supported (known: {', '.join(_BERT_ACTS)})")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{where}: position_embedding_type {hf['position_embedding_type']!r} is not supported; "
                         f"only 'absolute' (learned) positions")
    d = _need(hf, "hidden_size", where)
    return ModelConfig(
        arch="encoder", n_layer=_need(hf, "num_hidden_layers", where), n_head=_need(hf, "num_attention_heads", where),
        d_model=d, d_ff=hf.get("intermediate_size", 4 * d), vocab_size=_need(hf, "vocab_size", where),
        max_seq_len=hf.get("max_position_embeddings", 512), norm="layernorm", norm_position="post",
        norm_eps=hf.get("layer_norm_eps", 1e-12), pos="learned", act=_BERT_ACTS[act], bias=True,
        embed_norm=True, type_vocab_size=hf.get("type_vocab_size", 2), pad_token_id=hf.get("pad_token_id", 0),
        tie_embeddings=True, dropout=0.0, mlm_head=mlm_head)


def _bert_ignore(name: str) -> bool:
    # the pooler and the other task heads (NSP, classifiers) are not part of the encoder, nor is the masked-LM
    # decoder's copy of the word embeddings; position_ids is a buffer
    return any(part in name for part in ("pooler.", "cls.", "classifier.", "qa_outputs.")) or \
        name.endswith("position_ids")


def _normalize_bert_source(source: dict) -> dict:
    """Old TF-converted BERT checkpoints call LayerNorm weight/bias gamma/beta; BertFor* checkpoints add 'bert.'."""
    out = {}
    for k, v in source.items():
        if ".LayerNorm.gamma" in k or ".LayerNorm.beta" in k:
            k = k.replace(".LayerNorm.gamma", ".LayerNorm.weight").replace(".LayerNorm.beta", ".LayerNorm.bias")
        if k.startswith("bert."):
            k = k[len("bert."):]
        out[k] = v
    return out


# --- Llama: LlamaForCausalLM ("model." prefix + lm_head) or LlamaModel
def _llama_config(hf: dict, where):
    rope = hf.get("rope_parameters") or {}  # transformers >= 5 nests rope_theta / rope_type here
    scaling = hf.get("rope_scaling") or ({k: v for k, v in rope.items() if k != "rope_theta"} if rope else None)
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type not in ("default", None):
        raise ValueError(f"{where}: rope scaling {rope_type!r} is not supported (only plain RoPE)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported; Llama uses 'silu' (SwiGLU)")
    attn_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if attn_bias != mlp_bias:
        raise ValueError(f"{where}: attention_bias={attn_bias} with mlp_bias={mlp_bias} is not supported "
                         f"(tinyformer's `bias` covers every linear)")
    n_head, d = _need(hf, "num_attention_heads", where), _need(hf, "hidden_size", where)
    return ModelConfig(
        arch="decoder", n_layer=_need(hf, "num_hidden_layers", where), n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head, d_model=d, d_ff=_need(hf, "intermediate_size", where),
        vocab_size=_need(hf, "vocab_size", where), max_seq_len=hf.get("max_position_embeddings", 2048),
        head_dim=hf.get("head_dim") or d // n_head, norm="rmsnorm", norm_position="pre",
        norm_eps=hf.get("rms_norm_eps", 1e-6), pos="rope",
        rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))), act="swiglu", bias=attn_bias,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), dropout=0.0)


def _llama_ignore(config):
    def ignore(name):
        # rotary inverse frequencies are recomputed; a tied model may still carry a copy of the embedding as head
        return name.endswith("rotary_emb.inv_freq") or (config.tie_embeddings and name == "lm_head.weight")
    return ignore


# --- GPT-2: GPT2LMHeadModel ("transformer." prefix) or GPT2Model, and llama.cpp's "gpt2" GGUF architecture. Both
# fuse q, k, v into one product (rows q | k | v); Hugging Face's Conv1D stores its weights (in, out), the transpose
# of ours. `gpt2_name` maps our names to a table's, with wq / wk / wv all to the fused tensor.
GPT2_HF = {"wte": "wte.weight", "decoder.wpe": "wpe.weight", "decoder.final_norm": "ln_f", "lm_head": "lm_head.weight",
           "block": "h.{}.", "norm1": "ln_1", "norm2": "ln_2", "attn.qkv": "attn.c_attn", "attn.wo": "attn.c_proj",
           "mlp.w1": "mlp.c_fc", "mlp.w2": "mlp.c_proj", "conv1d": True}
GPT2_GGUF = {"wte": "token_embd.weight", "decoder.wpe": "position_embd.weight", "decoder.final_norm": "output_norm",
             "lm_head": "output.weight", "block": "blk.{}.", "norm1": "attn_norm", "norm2": "ffn_norm",
             "attn.qkv": "attn_qkv", "attn.wo": "attn_output", "mlp.w1": "ffn_up", "mlp.w2": "ffn_down",
             "conv1d": False}
_GPT2_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_GPT2_IGNORE = {"lm_head.weight"}  # transformers' tied head: a copy of wte


def gpt2_name(ours: str, table: dict, prefix: str = "") -> str:
    """Our parameter name -> the table's (GPT2_HF with its "transformer." prefix, or GPT2_GGUF); wq, wk and wv name
    the fused attn.qkv tensor."""
    if ours in ("wte", "decoder.wpe", "lm_head"):
        return (prefix if ours != "lm_head" else "") + table[ours]
    if ours.startswith("decoder.final_norm."):
        return prefix + table["decoder.final_norm"] + "." + ours.rsplit(".", 1)[1]
    i, rest = _block_index(ours)
    module, leaf = rest.rsplit(".", 1)
    module = "attn.qkv" if module in ("attn.wq", "attn.wk", "attn.wv") else module
    return f"{prefix}{table['block'].format(i)}{table[module]}.{leaf}"


def gpt2_conv1d(ours: str, table: dict) -> bool:
    """Whether the table stores this weight transposed (Hugging Face's Conv1D: (in, out))."""
    return table["conv1d"] and ours.endswith(".weight") and ".blocks." in ours and ".norm" not in ours


def gpt2_unfuse(source: dict, config, table: dict, prefix: str = "") -> dict:
    """A GPT-2 checkpoint's tensors keyed by our names: the fused q | k | v split, Conv1D weights transposed."""
    with torch.device("meta"):
        names = list(build(config, init=False).state_dict())
    C, kv = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    used = {gpt2_name(n, table, prefix) for n in names}
    out = {k: v for k, v in source.items() if k not in used}  # what nothing uses stays, for _assemble's check
    for ours in names:
        theirs = gpt2_name(ours, table, prefix)
        if theirs not in source:
            continue  # reported as missing by _assemble
        t = source[theirs]
        if gpt2_conv1d(ours, table):
            t = t.t()  # (in, out) -> (out, in)
        if ".attn.w" in ours and ".attn.wo." not in ours:
            start = {"wq": 0, "wk": C, "wv": C + kv}[ours.split(".")[-2]]
            t = t[start:start + (C if ".attn.wq." in ours else kv)]  # rows q | k | v of (C + 2 kv, ...)
        out[ours] = t
    return out


def _gpt2_config(hf: dict, where):
    act = hf.get("activation_function", "gelu_new")
    if act not in _GPT2_ACTS:
        raise ValueError(f"{where}: activation_function {act!r} is not supported (known: {', '.join(_GPT2_ACTS)})")
    d = _need(hf, "n_embd", where)
    return ModelConfig(
        arch="decoder", n_layer=_need(hf, "n_layer", where), n_head=_need(hf, "n_head", where), d_model=d,
        d_ff=hf.get("n_inner") or 4 * d, vocab_size=_need(hf, "vocab_size", where),
        max_seq_len=hf.get("n_positions", 1024), norm="layernorm", norm_position="pre",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), pos="learned", act=_GPT2_ACTS[act], bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)), dropout=0.0)


# ----------------------------------------------------------------------------------------------------------------------
# GGUF
_GGUF_BLOCK = {
    "attn.wq": "attn_q", "attn.wk": "attn_k", "attn.wv": "attn_v", "attn.wo": "attn_output",
    "mlp.w1": "ffn_gate", "mlp.w3": "ffn_up", "mlp.w2": "ffn_down", "norm1": "attn_norm", "norm2": "ffn_norm",
}
GGUF_TOKEN_NORMAL, GGUF_TOKEN_CONTROL, GGUF_TOKEN_USER_DEFINED = 1, 3, 4  # tokenizer.ggml.token_type values


def _gguf_name(ours: str) -> str:
    if ours == "wte":
        return "token_embd.weight"
    if ours == "lm_head":
        return "output.weight"
    if ours == "decoder.final_norm.weight":
        return "output_norm.weight"
    i, rest = _block_index(ours)
    module, leaf = rest.rsplit(".", 1)
    return f"blk.{i}.{_GGUF_BLOCK[module]}.{leaf}"


def permute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's HF -> GGUF row permutation of wq / wk (n_head * Dh, ...): within each head, HF row (s, i) goes to
    GGUF row (i, s). Any trailing dims ride along, so a weight's encoded block rows permute the same way."""
    rows = w.shape[0]
    half = rows // n_head // 2
    w = w.reshape(n_head, 2, half, *w.shape[1:])  # (H * Dh, ...) -> (H, 2, Dh/2, ...)
    return w.transpose(1, 2).reshape(rows, *w.shape[3:])  # (H, Dh/2, 2, ...) -> (H * Dh, ...)


def _unpermute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's HF -> GGUF row permutation of wq / wk (n_head * Dh, C): within each head, GGUF row
    (i, s) holds HF row (s, i), s in {0, 1} the rotate-half half, i < Dh/2."""
    rows, cols = w.shape
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, cols).transpose(1, 2).reshape(rows, cols)  # (H, Dh/2, 2, C) -> (H, 2, Dh/2, C)


def _gguf_fields(reader) -> dict:
    """All metadata as plain Python values (strings, numbers, lists), keyed by name."""
    meta = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            meta[name] = field.contents()
        except Exception as e:  # noqa: BLE001 -- an unreadable field we do not need should not stop the load
            meta[name] = e
    return meta


def _gguf_tensors(reader, where) -> dict:
    """Every tensor dequantized to a float32 torch tensor in numpy (= PyTorch) dimension order."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    out = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists ne0 (the fastest axis) first
        try:
            if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                a = np.asarray(t.data, dtype=np.float32)
            else:
                a = quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ValueError(f"{where}: tensor {t.name!r} is stored as {t.tensor_type.name}, which the gguf package "
                             f"cannot dequantize") from None
        if a.size != int(np.prod(shape)):
            raise ValueError(f"{where}: tensor {t.name!r} holds {a.size} values, its header says {shape}")
        a = np.ascontiguousarray(a, dtype=np.float32).reshape(shape)
        out[t.name] = torch.from_numpy(a if a.flags.writeable else a.copy())  # F32 data is a read-only memmap
    return out


def load_gguf(path, device="cpu", dtype: torch.dtype = torch.float32):
    """A llama-architecture GGUF file -> DecoderLM (weights dequantized to `dtype`), with its tokenizer."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ImportError("reading GGUF files needs the gguf package: pip install gguf") from None

    path = Path(path)
    where = str(path)
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 -- the reader raises ValueError, struct.error, IndexError... on bad files
        raise ValueError(f"{where} is not a readable GGUF file (corrupt or truncated?): {type(e).__name__}: {e}") \
            from None
    meta = _gguf_fields(reader)
    arch = meta.get("general.architecture")
    if arch not in ("llama", "gpt2"):
        raise ValueError(f"{where}: general.architecture is {arch!r}; tinyformer loads 'llama' and 'gpt2' GGUF files")

    def key(name, default=...):
        value = meta.get(f"{arch}.{name}", default)
        if value is ...:
            raise ValueError(f"{where}: metadata key {arch}.{name} is missing")
        if isinstance(value, Exception):
            raise ValueError(f"{where}: metadata key {arch}.{name} is unreadable: {value}")
        return value

    if arch == "gpt2":
        return _load_gguf_gpt2(reader, meta, key, where, device, dtype)
    scaling = key("rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ValueError(f"{where}: rope scaling {scaling!r} is not supported (only plain RoPE)")
    tensors = _gguf_tensors(reader, where)
    if "rope_freqs.weight" in tensors:
        raise ValueError(f"{where}: has rope_freqs.weight (Llama-3.1-style rope scaling), which is not supported")
    n_head, d = int(key("attention.head_count")), int(key("embedding_length"))
    n_kv_head = int(key("attention.head_count_kv", n_head))
    head_dim = int(key("attention.key_length", key("rope.dimension_count", d // n_head)))
    if int(key("rope.dimension_count", head_dim)) != head_dim:
        raise ValueError(f"{where}: partial rotary ({arch}.rope.dimension_count={key('rope.dimension_count')} of "
                         f"head dim {head_dim}) is not supported")
    tokens = meta.get("tokenizer.ggml.tokens")
    n_vocab = key("vocab_size", None) or (len(tokens) if isinstance(tokens, list) else None)
    if n_vocab is None and "token_embd.weight" in tensors:
        n_vocab = tensors["token_embd.weight"].shape[0]
    config = ModelConfig(
        arch="decoder", n_layer=int(key("block_count")), n_head=n_head, n_kv_head=n_kv_head, d_model=d,
        d_ff=int(key("feed_forward_length")), vocab_size=int(n_vocab), max_seq_len=int(key("context_length", 2048)),
        head_dim=head_dim, norm="rmsnorm", norm_position="pre",
        norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)), pos="rope",
        rope_theta=float(key("rope.freq_base", 10000.0)), act="swiglu", bias=False,
        tie_embeddings="output.weight" not in tensors, dropout=0.0)
    for i in range(config.n_layer):  # llama.cpp's rotary layout -> rotate-half
        for name, heads in ((f"blk.{i}.attn_q.weight", n_head), (f"blk.{i}.attn_k.weight", n_kv_head)):
            if name in tensors and tensors[name].shape[0] == heads * head_dim:
                tensors[name] = _unpermute_rope_rows(tensors[name], heads)
    return _gguf_vocab(_assemble(config, tensors, _gguf_name, lambda n: False, where, device, dtype), meta, where)


def _gguf_vocab(model, meta: dict, where: str):
    """The model with the file's tokenizer, chat template and bos / eos ids."""
    model.tokenizer = gguf_tokenizer(meta, where) if "tokenizer.ggml.model" in meta else None
    tpl = meta.get("tokenizer.chat_template")
    model.chat_template = tpl if isinstance(tpl, str) else None
    for attr, k in (("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id")):
        setattr(model, attr, int(meta[k]) if isinstance(meta.get(k), int) else None)
    return model


GGUF_ACT_KEY = "tinyformer.activation"  # a gpt2 file's GELU as tinyformer computed it (llama.cpp: tanh GELU)


def _load_gguf_gpt2(reader, meta: dict, key, where: str, device, dtype):
    """llama.cpp's "gpt2" architecture: LayerNorm, learned positions, GELU (tanh-approximate in llama.cpp's graph,
    exact where the file says tinyformer.activation = "gelu"), biases, fused q | k | v."""
    tensors = _gguf_tensors(reader, where)
    tokens = meta.get("tokenizer.ggml.tokens")
    n_vocab = len(tokens) if isinstance(tokens, list) else tensors["token_embd.weight"].shape[0]
    act = meta.get(GGUF_ACT_KEY, "gelu_tanh")
    config = ModelConfig(
        arch="decoder", n_layer=int(key("block_count")), n_head=int(key("attention.head_count")),
        d_model=int(key("embedding_length")), d_ff=int(key("feed_forward_length")), vocab_size=int(n_vocab),
        max_seq_len=int(key("context_length")), norm="layernorm", norm_position="pre",
        norm_eps=float(key("attention.layer_norm_epsilon", 1e-5)), pos="learned",
        act=act if act in ("gelu", "gelu_tanh") else "gelu_tanh", bias=True,
        tie_embeddings="output.weight" not in tensors, dropout=0.0)
    tensors = gpt2_unfuse(tensors, config, GPT2_GGUF)
    return _gguf_vocab(_assemble(config, tensors, lambda n: n, lambda n: False, where, device, dtype), meta, where)


# --- GGUF tokenizer -> tokenizers.Tokenizer
# Pre-tokenizer split rules by tokenizer.ggml.pre, as llama.cpp applies them (llama-vocab.cpp). "digits" isolates
# every digit first (StarCoder / SmolLM vocabularies hold no multi-digit tokens), then GPT-2's split.
_PRE_DIGITS = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_PRE_GPT2 = ("gpt-2", "gpt2", "default", "mpt", "olmo", "jais", "trillion")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
               "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map: printable Latin-1 bytes stand for themselves, the other 68
    bytes get the code points 256, 257, ... in byte order (Radford et al. 2019, encoder.py `bytes_to_unicode`)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def gguf_tokenizer(meta: dict, where: str = "GGUF file"):
    """The tokenizer.ggml.* metadata of a "gpt2" (byte-level BPE) vocabulary -> a `tokenizers.Tokenizer`.

    Tokens keep their ids; merges keep their rank order; CONTROL tokens (token_type 3, e.g. <|im_start|>) become
    special added tokens and USER_DEFINED ones (4) plain added tokens, so both are matched whole in text.
    tokenizer.ggml.add_bos_token / add_eos_token become a template post-processor."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{where}: tokenizer.ggml.model {kind!r} is not supported; only 'gpt2' (byte-level BPE)")
    tokens, merges = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.merges")
    if not isinstance(tokens, list) or not isinstance(merges, list):
        raise ValueError(f"{where}: tokenizer.ggml.tokens or tokenizer.ggml.merges is missing or unreadable")
    types = meta.get("tokenizer.ggml.token_type")
    types = types if isinstance(types, list) and len(types) == len(tokens) else [GGUF_TOKEN_NORMAL] * len(tokens)
    alphabet = set(_byte_alphabet().values())
    spell = _byte_alphabet()
    vocab = {}
    for i, tok in enumerate(tokens):
        if not set(tok) <= alphabet and types[i] == GGUF_TOKEN_NORMAL:  # raw text: respell in the byte alphabet
            tok = "".join(spell[b] for b in tok.encode("utf-8"))
        vocab.setdefault(tok, i)
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise ValueError(f"{where}: malformed merge {m!r} in tokenizer.ggml.merges")
        if a + b in vocab:  # llama.cpp splits a merged symbol that is no token back into its bytes' tokens
            pairs.append((a, b))
    pre = meta.get("tokenizer.ggml.pre", "default")
    split = _PRE_SPLITS.get(pre)
    tok = Tokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False, ignore_merges=split is not None
                               and pre != "qwen2"))
    if split is not None:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        if pre not in _PRE_DIGITS and pre not in _PRE_GPT2:
            warnings.warn(f"{where}: unknown tokenizer.ggml.pre {pre!r}; using GPT-2's pre-tokenizer", stacklevel=3)
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=bool(meta.get("tokenizer.ggml.add_space_prefix")),
                                              use_regex=True)
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]) \
            if pre in _PRE_DIGITS else byte_level
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == GGUF_TOKEN_CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types)
            if k == GGUF_TOKEN_USER_DEFINED]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    steps = [processors.ByteLevel(trim_offsets=False)]
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token")) and isinstance(bos, int)
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token")) and isinstance(eos, int)
    if add_bos or add_eos:
        pre_t = [tokens[bos]] if add_bos else []
        post_t = [tokens[eos]] if add_eos else []
        single = " ".join([*pre_t, "$A", *post_t])
        pair = " ".join([*pre_t, "$A", *post_t, *pre_t, "$B:1", *post_t])
        ids = {t: i for t, i in ((tokens[bos], bos) if add_bos else (None, None),
                                 (tokens[eos], eos) if add_eos else (None, None)) if t is not None}
        steps.append(processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(ids.items())))
    tok.post_processor = processors.Sequence(steps) if len(steps) > 1 else steps[0]
    return tok
