"""Exporting models: `tinyformer.export(model, path, format="gguf" | "hf", quant=None)` writes a model as a GGUF file
for llama.cpp or a Hugging Face folder for transformers; `tinyformer.load` reads both back (tinyformer.convert, whose
name tables this module reuses, so each format's names are written down once).

GGUF (ggml-org/ggml docs/gguf.md; llama.cpp's gguf-py: GGUFWriter, constants, quants): a decoder of the Llama family
(RMSNorm, rotary, SwiGLU, grouped-query heads, tied or untied head) as architecture "llama", with wq / wk rows in
llama.cpp's rotary layout (`convert.permute_rope_rows`, what its convert_hf_to_gguf.py does); of the GPT-2 family
(LayerNorm, learned positions, GELU, biases) as "gpt2", q | k | v fused into attn_qkv. The tokenizer goes in as
llama.cpp's "gpt2" (byte-level BPE) model; a character vocabulary of single-byte characters is the same thing with
no merges, each byte one token. Metadata, bos / eos and the chat template go in too.

Block types (gguf-py quants.py; ggml-common.h), 32 weights of a row each, scales as float16:
  Q8_0: d, 32 int8 codes q:                 w = d * q
  Q4_0: d, 16 bytes of 4-bit codes q:        w = d * (q - 8)
  Q4_1: d, m, 16 bytes of 4-bit codes q:     w = d * q + m
  (byte j of a 4-bit block holds code j in its low nibble and code j + 16 in its high one)
tinyformer's quantized linears map onto them without requantizing where their grid is a block's grid: Int8Linear
(symmetric per row, w = q * s) is Q8_0 with d = s in every block of the row; Int4Linear with a group size that is a
multiple of 32 is Q4_1 with d = scale, m = -zero * scale (any zero point, float or integer), and Q4_0 when every
zero point is 8 (symmetric). So GPTQ's and AWQ's codes reach llama.cpp as they are; only d and m round to float16.
What a block cannot hold (a requested type that differs from the layer's grid, groups not a multiple of 32, W8A8's
smoothing divisor, a low-rank pair) is requantized from the layer's exact float weight to the requested type, with a
warning naming the layers (`strict=True` refuses instead); with no type requested it goes in as its exact F32
weights, with a warning too. A float model with quant "q8_0" / "q4_0" / "q4_1" is first quantized by
`quantize_` (int8 per row; int4 symmetric or float-zero asymmetric at group 32; RTN, or GPTQ / AWQ with calib).

Hugging Face (transformers' LlamaConfig, GPT2Config, BertConfig and their checkpoints' names): LlamaForCausalLM,
GPT2LMHeadModel (Conv1D weights stored transposed, q | k | v fused in c_attn), BertModel; config.json,
model.safetensors (float32; quantized layers written as their dequantized weights), tokenizer.json +
tokenizer_config.json, generation_config.json.

Writing is atomic (`checkpoint.atomic_path`: a temporary file or folder beside the output, renamed over it), and an
existing non-empty output needs overwrite=True, so a failed export never leaves half a file where a good one was.
"""
from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from tinyformer import ops
from tinyformer.checkpoint import atomic_path, structure_record
from tinyformer.convert import (GPT2_GGUF, GPT2_HF, GGUF_ACT_KEY, GGUF_TOKEN_CONTROL, GGUF_TOKEN_NORMAL,
                                GGUF_TOKEN_USER_DEFINED, _bert_name, _byte_alphabet, _gguf_name, _llama_name,
                                gpt2_conv1d, gpt2_name, load, permute_rope_rows)
from tinyformer.model import Linear, build
from tinyformer.qlinear import Int4Linear, Int8Linear, W8A8Linear

__all__ = ["export", "FORMATS", "QUANTS", "gguf_family", "ExportError"]

FORMATS = ("gguf", "hf")
QUANTS = ("f32", "f16", "q8_0", "q4_0", "q4_1")
QK = 32  # weights per GGUF block (QK8_0 = QK4_0 = QK4_1)
GGUF_TOKEN_UNUSED = 5


class ExportError(ValueError):
    """A model or option the chosen format cannot hold; the message says why, in one line."""


def export(model, path, format: str = "gguf", quant: Optional[str] = None, *, overwrite: bool = False,
           method: str = "rtn", calib=None, strict: bool = False, name: Optional[str] = None) -> Path:
    """Write `model` (a model, or a path `tinyformer.load` reads) to `path` as a GGUF file or a Hugging Face folder.

    quant (GGUF): None keeps each layer as it is (float -> F32, int8 -> Q8_0, int4 -> Q4_0 / Q4_1 by its zero points);
    "f32" / "f16" write float weights; "q8_0" / "q4_0" / "q4_1" write every block linear in that type, quantizing a
    float model first with `quantize_` (`method` "rtn", or "gptq" / "awq" with `calib` token ids). Embeddings, norms
    and biases stay float32. strict=True: refuse, rather than requantize, a layer the type cannot hold exactly.
    Returns the path written."""
    if format not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if quant is not None and quant not in QUANTS:
        raise ExportError(f"quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    if format == "hf" and quant not in (None, "f32"):
        raise ExportError(f"quant {quant!r} is a GGUF block type; a Hugging Face export holds float32 weights")
    if not isinstance(model, nn.Module):
        src = Path(model)
        if not src.exists():
            raise ExportError(f"no such model file or folder: {src}")
        model = load(src)
    path = Path(path)
    _check_output(path, overwrite, folder=format == "hf")
    if quant in ("q8_0", "q4_0", "q4_1") and _float_block_linears(model):
        model = _quantize_copy(model, quant, method, calib)
    with torch.no_grad(), ops.use_backend("reference"):  # exact float weights of quantized layers, on any machine
        if format == "gguf":
            _write_gguf(model, path, quant, strict, name or path.stem)
        else:
            _write_hf(model, path)
    return path


def _check_output(path: Path, overwrite: bool, folder: bool) -> None:
    if not path.parent.is_dir():
        raise ExportError(f"cannot write {path}: its folder {path.parent} does not exist")
    if path.exists():
        if folder and path.is_file() or not folder and path.is_dir():
            raise ExportError(f"cannot write {path}: it exists and is a {'file' if path.is_file() else 'folder'}")
        non_empty = any(path.iterdir()) if path.is_dir() else path.stat().st_size > 0
        if non_empty and not overwrite:
            raise ExportError(f"{path} exists and is not empty; pass overwrite=True (--overwrite) to replace it")


def _float_block_linears(model) -> list:
    return [m for n, m in model.named_modules() if type(m) is Linear and ".blocks." in f".{n}"]


def _quantize_copy(model, quant: str, method: str, calib):
    """A copy of the model with its float block linears quantized to the grid of `quant` (exported exactly)."""
    from tinyformer.compress import quantize_

    model = copy.deepcopy(model)
    kw = dict(bits=8) if quant == "q8_0" else dict(bits=4, group_size=QK, symmetric=quant == "q4_0")
    return quantize_(model, method=method, calib=calib, **kw)


# ----------------------------------------------------------------------------------------------------------------------
# what a layer holds: its exact float weight, and its GGUF blocks where its grid is one
def dense_weight(module) -> torch.Tensor:
    """The float32 weight (N, K) a linear layer of any kind computes with: its product with the identity, minus its
    bias, so every quantized or factored layer reads back through its own forward."""
    if type(module) is Linear:
        return module.weight.detach().float()
    bias = layer_bias(module)
    eye = torch.eye(module.n_in, dtype=torch.float32, device=_device(module))  # (K, K): row k = unit input k
    y = module(eye) - (bias.float() if bias is not None else 0.0)  # (K, N)
    return y.t().contiguous()  # (K, N) -> (N, K)


def layer_bias(module) -> Optional[torch.Tensor]:
    """A linear layer's bias (a low-rank pair keeps it on its second factor), or None."""
    if hasattr(module, "rank"):
        module = module.b
    return module.bias


def _is_linear(module) -> bool:
    return type(module) is Linear or hasattr(module, "n_in")


def _device(module):
    return next(iter(module.buffers()), next(iter(module.parameters()), torch.empty(0))).device


def _natural_type(module) -> str:
    """The GGUF type that holds the layer exactly ('f32' for float layers, '' when none does)."""
    if type(module) is Linear:
        return "f32"
    if isinstance(module, W8A8Linear) and module.smooth is not None:
        return ""
    if isinstance(module, Int8Linear):
        return "q8_0" if module.n_in % QK == 0 else ""
    if isinstance(module, Int4Linear):
        if module.group_size % QK or module.n_in % QK:
            return ""
        return "q4_0" if bool((module.zeros == 8).all()) else "q4_1"
    return ""


def _holds(want: str, natural: str) -> bool:
    """Whether type `want` holds a layer whose own grid is `natural` exactly (Q4_1 holds Q4_0's grid too)."""
    return want == natural or (want == "q4_1" and natural == "q4_0") or (want in ("f32", "f16") and natural != "")


def _fp16(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy().astype(np.float16)


def _pack_nibbles(q: torch.Tensor) -> np.ndarray:
    """Codes (N, B, 32) in 0..15 -> (N, B, 16) bytes: code j in the low nibble of byte j, code j + 16 in the high."""
    q = q.to(torch.uint8)
    return (q[..., :QK // 2] | (q[..., QK // 2:] << 4)).cpu().numpy()


def _blocks(module, kind: str) -> np.ndarray:
    """The layer's own codes as GGUF blocks: uint8 (N, K / 32 * block bytes)."""
    N, K = module.n_out, module.n_in
    B = K // QK
    if kind == "q8_0":
        d = np.repeat(_fp16(module.scale)[:, None], B, axis=1)  # (N,) -> (N, B)
        q = module.weight.detach().cpu().numpy().reshape(N, B, QK)  # (N, K) -> (N, B, 32) int8 codes
        return np.concatenate([d[..., None].view(np.uint8), q.view(np.uint8)], axis=-1).reshape(N, -1)
    from tinyformer.kernels import unpack_int4
    per = module.group_size // QK
    codes = unpack_int4(module.weight_packed)[:, :K].reshape(N, B, QK)  # (N, Kp) -> (N, B, 32)
    scale = module.scales.repeat_interleave(per, dim=1)[:, :B]  # (N, G) -> (N, B)
    zero = module.zeros.repeat_interleave(per, dim=1)[:, :B]
    parts = [_fp16(scale)[..., None].view(np.uint8)]  # (N, B, 2)
    if kind == "q4_1":
        parts.append(_fp16(-zero * scale)[..., None].view(np.uint8))
    parts.append(_pack_nibbles(codes))
    return np.concatenate(parts, axis=-1).reshape(N, -1)


def _encode(module, kind: str, where: str, strict: bool, requantized: list):
    """(array, GGMLQuantizationType) of a linear layer's weight in GGUF type `kind`."""
    from gguf import GGMLQuantizationType, quants

    natural = _natural_type(module)
    if kind not in ("f32", "f16") and _holds(kind, natural):  # the layer's own codes, as they are
        return _blocks(module, kind), getattr(GGMLQuantizationType, kind.upper())
    w = dense_weight(module).cpu().numpy()
    if kind == "f32":
        return w.astype(np.float32), GGMLQuantizationType.F32
    if kind == "f16":
        return w.astype(np.float16), GGMLQuantizationType.F16
    if w.shape[1] % QK:
        raise ExportError(f"{where}: {w.shape[1]} inputs are not a multiple of {QK}, so no GGUF block type holds it; "
                          f"export with quant='f32' or 'f16'")
    if strict:
        raise ExportError(f"{where}: its grid ({natural or type(module).__name__}) is not {kind.upper()}'s; "
                          f"requantizing would change it (strict)")
    requantized.append(where)
    qtype = getattr(GGMLQuantizationType, kind.upper())
    return quants.quantize(w.astype(np.float32), qtype), qtype


def _layer_kind(modules, quant: Optional[str]) -> str:
    """One GGUF type for a tensor made of these layers (a fused q | k | v shares one): `quant`, or the type that
    holds them all exactly, F32 (their float weights) where no block type does."""
    if quant is not None:
        return quant
    kinds = {_natural_type(m) for m in modules}
    if len(kinds) == 1 and "" not in kinds:
        return kinds.pop()
    return "q4_1" if kinds <= {"q4_0", "q4_1"} else "f32"


# ----------------------------------------------------------------------------------------------------------------------
# GGUF
def gguf_family(config) -> str:
    """"llama" or "gpt2": the llama.cpp architecture this decoder is, or ExportError saying what does not fit."""
    where = "GGUF export"
    if config.arch != "decoder":
        raise ExportError(f"{where}: a{'n' if config.arch[0] == 'e' else ''} {config.arch} model has no llama.cpp "
                          f"architecture; GGUF export takes decoders (use format='hf' for encoders)")
    if config.norm_position != "pre":
        raise ExportError(f"{where}: post-norm decoders have no llama.cpp architecture (norm_position='post')")
    llama = dict(norm="rmsnorm", pos="rope", act="swiglu", bias=False)
    gpt2 = dict(norm="layernorm", pos="learned", bias=True)
    if all(getattr(config, k) == v for k, v in llama.items()):
        return "llama"
    if all(getattr(config, k) == v for k, v in gpt2.items()) and config.act in ("gelu", "gelu_tanh"):
        if config.n_kv_head != config.n_head or config.head_dim * config.n_head != config.d_model:
            raise ExportError(f"{where}: llama.cpp's gpt2 architecture has neither grouped-query heads nor a head dim "
                              f"other than d_model / n_head")
        return "gpt2"
    got = {k: getattr(config, k) for k in ("norm", "pos", "act", "bias")}
    raise ExportError(f"{where}: {got} is neither the Llama family (rmsnorm, rope, swiglu, no bias) nor the GPT-2 "
                      f"family (layernorm, learned, gelu, bias)")


def _gguf_tokenizer(model, family: str) -> dict:
    """The tokenizer.ggml.* values of the model's tokenizer as llama.cpp's "gpt2" (byte-level BPE) model."""
    tok = getattr(model, "tokenizer", None)
    V = model.config.vocab_size
    if tok is None:
        raise ExportError("GGUF export: the model has no tokenizer; llama.cpp needs the vocabulary in the file")
    spec = json.loads(tok.to_str())
    kind, pre = spec["model"]["type"], spec.get("pre_tokenizer") or {}
    if kind == "BPE":
        if not _byte_level(spec):
            raise ExportError("GGUF export: the tokenizer is a BPE without GPT-2's byte-level alphabet; llama.cpp's "
                              "gpt2 tokenizer model needs byte-level BPE")
        pre_name = _pre_name(pre)
        merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
        vocab = tok.get_vocab(with_added_tokens=True)
    elif kind == "WordLevel" and _char_split(pre):
        vocab = tok.get_vocab(with_added_tokens=True)
        wide = sorted(t for t in vocab if len(t) != 1 or ord(t) > 0x7F)
        if wide:
            raise ExportError(f"GGUF export: the character vocabulary holds {len(wide)} token(s) that are not single "
                              f"ASCII characters (e.g. {wide[:3]}); llama.cpp's byte-level model can hold a "
                              f"character vocabulary only where every character is one byte")
        spell = _byte_alphabet()
        vocab = {spell[ord(t)]: i for t, i in vocab.items()}
        first = min(vocab, key=vocab.get)
        pre_name = "gpt-2"
        merges = [f"{first} {first}"]  # gguf needs a merge; this one makes no token, so llama.cpp never applies it
    else:
        raise ExportError(f"GGUF export: a {kind} tokenizer has no llama.cpp equivalent here (byte-level BPE, or a "
                          f"character vocabulary of single-byte characters)")
    if max(vocab.values()) >= V:
        raise ExportError(f"GGUF export: the tokenizer has ids up to {max(vocab.values())}, the model {V} embeddings")
    tokens = [f"[PAD{i}]" for i in range(V)]
    types = [GGUF_TOKEN_UNUSED] * V
    for t, i in vocab.items():
        tokens[i], types[i] = t, GGUF_TOKEN_NORMAL
    for added in spec.get("added_tokens", []):
        types[added["id"]] = GGUF_TOKEN_CONTROL if added.get("special") else GGUF_TOKEN_USER_DEFINED
    out = {"model": "gpt2", "pre": pre_name, "tokens": tokens, "types": types, "merges": merges}
    bos, eos = getattr(model, "bos_token_id", None), getattr(model, "eos_token_id", None)
    out["bos"], out["eos"] = bos, eos
    probe = tok.encode("", add_special_tokens=True).ids  # what the tokenizer adds around any text
    out["add_bos"] = bos is not None and bool(probe) and probe[0] == bos
    return out


def _byte_level(spec) -> bool:
    def has(node):
        if not node:
            return False
        if node.get("type") == "ByteLevel":
            return True
        return any(has(n) for n in node.get("pretokenizers", []))
    return has(spec.get("pre_tokenizer"))


def _pre_name(pre: dict) -> str:
    """tokenizer.ggml.pre for a byte-level pre-tokenizer: the split rules llama.cpp applies (llama-vocab.cpp)."""
    from tinyformer.convert import _LLAMA3_SPLIT, _QWEN2_SPLIT

    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    parts = pre.get("pretokenizers", [])
    types = [p.get("type") for p in parts]
    if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if types == ["Split", "ByteLevel"]:
        regex = parts[0].get("pattern", {}).get("Regex")
        if regex == _LLAMA3_SPLIT:
            return "llama-bpe"
        if regex == _QWEN2_SPLIT:
            return "qwen2"
    raise ExportError(f"GGUF export: the byte-level pre-tokenizer {types or pre.get('type')} matches none of "
                      f"llama.cpp's split rules that tinyformer knows (gpt-2, smollm, llama-bpe, qwen2)")


def _char_split(pre: dict) -> bool:
    """tinyformer's character tokenizer: a Split on every single character (data.char_tokenizer)."""
    return pre.get("type") == "Split" and pre.get("pattern", {}).get("Regex") == r"[\s\S]"


_FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7}  # gguf LlamaFileType


def _write_gguf(model, path: Path, quant: Optional[str], strict: bool, name: str) -> None:
    from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter

    cfg = model.config
    family = gguf_family(cfg)
    _check_unpruned(model, "GGUF export")
    tok = _gguf_tokenizer(model, family)  # before any tensor work: a vocabulary error costs nothing
    tensors, requantized, dequantized, kinds = [], [], [], set()

    def add(gguf_name, array, qtype=None):
        tensors.append((gguf_name, array, qtype))

    def float_tensor(t, f16=False):
        a = t.detach().float().cpu().numpy()
        return a.astype(np.float16) if f16 and a.ndim == 2 else a

    def linear(gguf_name, modules, rope_heads=None):
        kind = _layer_kind(modules, quant)
        parts = []
        if kind == "f32" and quant is None:
            dequantized.extend(_module_name(model, m) for m in modules if type(m) is not Linear)
        for m in modules:
            a, qtype = _encode(m, kind, _module_name(model, m), strict, requantized)
            parts.append(a)
        a = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
        if rope_heads:
            a = permute_rope_rows(torch.from_numpy(np.ascontiguousarray(a)), rope_heads).numpy()
        kinds.add(kind)
        add(gguf_name + ".weight", np.ascontiguousarray(a), qtype if a.dtype == np.uint8 else None)
        biases = [layer_bias(m) for m in modules if layer_bias(m) is not None]
        if biases:
            add(gguf_name + ".bias", torch.cat([b.detach().float() for b in biases]).cpu().numpy())

    f16 = quant == "f16"
    add("token_embd.weight", float_tensor(model.wte, f16))
    head = model.lm_head
    if isinstance(head, nn.Module):  # a quantized output head (quantize_(head=True))
        linear("output", [head])
    elif head is not None:
        add("output.weight", float_tensor(head, f16))
    stack = model.decoder
    table = GPT2_GGUF if family == "gpt2" else None
    if family == "gpt2":
        add("position_embd.weight", float_tensor(stack.wpe, f16))
    for leaf in ("weight", "bias"):
        p = getattr(stack.final_norm, leaf)
        if p is not None:
            add(f"output_norm.{leaf}", float_tensor(p))
    for i, blk in enumerate(stack.blocks):
        a, f = blk.attn, blk.mlp
        for norm, ours in ((blk.norm1, "norm1"), (blk.norm2, "norm2")):
            for leaf in ("weight", "bias"):
                p = getattr(norm, leaf)
                if p is not None:
                    theirs = gpt2_name(f"decoder.blocks.{i}.{ours}.{leaf}", table) if table else \
                        _gguf_name(f"decoder.blocks.{i}.{ours}.{leaf}")
                    add(theirs, float_tensor(p))
        if family == "gpt2":
            linear(f"blk.{i}.attn_qkv", [a.wq, a.wk, a.wv])
            linear(f"blk.{i}.attn_output", [a.wo])
            linear(f"blk.{i}.ffn_up", [f.w1])
            linear(f"blk.{i}.ffn_down", [f.w2])
        else:
            linear(f"blk.{i}.attn_q", [a.wq], rope_heads=a.n_head)
            linear(f"blk.{i}.attn_k", [a.wk], rope_heads=a.n_kv_head)
            linear(f"blk.{i}.attn_v", [a.wv])
            linear(f"blk.{i}.attn_output", [a.wo])
            linear(f"blk.{i}.ffn_gate", [f.w1])
            linear(f"blk.{i}.ffn_up", [f.w3])
            linear(f"blk.{i}.ffn_down", [f.w2])
    if dequantized:
        warnings.warn(f"GGUF export: {len(dequantized)} quantized layer(s) written as their F32 weights (no block type "
                      f"holds their grid): {', '.join(dequantized[:8])}{' ...' if len(dequantized) > 8 else ''}",
                      stacklevel=3)
    if requantized:
        warnings.warn(f"GGUF export: {len(requantized)} layer(s) requantized to {quant or 'the file type'} (their "
                      f"grid is not a block's): {', '.join(requantized[:8])}{' ...' if len(requantized) > 8 else ''}",
                      stacklevel=3)

    with atomic_path(path) as tmp:
        w = GGUFWriter(str(tmp), family)
        w.add_name(name)
        file_kind = quant or (max(kinds - {"f32"}, key=list(_FILE_TYPES).index) if kinds - {"f32"} else "f32")
        w.add_file_type(_FILE_TYPES[file_kind])
        if file_kind.startswith("q"):
            w.add_quantization_version(2)
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.d_model)
        w.add_feed_forward_length(cfg.d_ff)
        w.add_block_count(cfg.n_layer)
        w.add_head_count(cfg.n_head)
        if family == "llama":
            w.add_head_count_kv(cfg.n_kv_head)
            w.add_layer_norm_rms_eps(cfg.norm_eps)
            w.add_rope_dimension_count(cfg.head_dim)
            w.add_rope_freq_base(cfg.rope_theta)
            w.add_vocab_size(cfg.vocab_size)
            if cfg.head_dim * cfg.n_head != cfg.d_model:
                w.add_key_length(cfg.head_dim)
                w.add_value_length(cfg.head_dim)
        else:
            w.add_layer_norm_eps(cfg.norm_eps)
            w.add_string(GGUF_ACT_KEY, cfg.act)
        w.add_tokenizer_model(tok["model"])
        w.add_tokenizer_pre(tok["pre"])
        w.add_token_list(tok["tokens"])
        w.add_token_types(tok["types"])
        w.add_key_value("tokenizer.ggml.merges", tok["merges"], GGUFValueType.ARRAY, GGUFValueType.STRING)
        if tok["bos"] is not None:
            w.add_bos_token_id(int(tok["bos"]))
        if tok["eos"] is not None:
            w.add_eos_token_id(int(tok["eos"]))
        w.add_add_bos_token(tok["add_bos"])
        w.add_add_eos_token(False)
        if getattr(model, "chat_template", None):
            w.add_chat_template(model.chat_template)
        for gguf_name, array, qtype in tensors:
            if qtype is not None and qtype not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                w.add_tensor(gguf_name, array, raw_dtype=qtype)
            else:
                w.add_tensor(gguf_name, array)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def _check_unpruned(model, where: str) -> None:
    if structure_record(model):
        raise ExportError(f"{where}: structurally pruned blocks (heads or feed-forward width other than the config's) "
                          f"have no place in the format's one-shape-per-model config")


def _module_name(model, module) -> str:
    for n, m in model.named_modules():
        if m is module:
            return n
    return type(module).__name__


# ----------------------------------------------------------------------------------------------------------------------
# Hugging Face folders
def _float_state(model) -> dict:
    """{our float parameter name: float32 tensor} of the model as its float config builds it: quantized and
    factored layers as their exact float weights."""
    with torch.device("meta"):
        names = list(build(model.config, init=False).state_dict())
    out = {}
    for n in names:
        owner, _, leaf = n.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        if _is_linear(module) and leaf == "weight":
            out[n] = dense_weight(module)
        elif _is_linear(module) and leaf == "bias":
            out[n] = layer_bias(module).detach().float()
        else:
            t = getattr(module, leaf)
            if isinstance(t, nn.Module):  # a quantized output head in a parameter's place
                t = dense_weight(t)
            out[n] = t.detach().float()
    if isinstance(model.lm_head, nn.Module) and "lm_head" not in out:  # quantized head of a tied model: its own copy
        out["lm_head"] = dense_weight(model.lm_head)
    return out


def _hf_family(config) -> str:
    if config.arch == "encoder":
        if config.norm != "layernorm" or config.norm_position != "post" or config.pos != "learned" \
                or not config.embed_norm:
            raise ExportError("hf export: an encoder exports as BertModel, which needs post-LayerNorm, learned "
                              "positions and an embedding LayerNorm")
        return "bert"
    if config.arch == "encoder-decoder":
        raise ExportError("hf export: encoder-decoder models have no transformers architecture here (Llama, GPT-2 "
                          "and BERT are exported)")
    return gguf_family(config)


def _write_hf(model, path: Path) -> None:
    from safetensors.torch import save

    cfg = model.config
    try:
        family = _hf_family(cfg)
    except ExportError as e:
        raise ExportError(str(e).replace("GGUF export", "hf export")) from None
    _check_unpruned(model, "hf export")
    state = _float_state(model)
    if family == "llama":
        tied = cfg.tie_embeddings and "lm_head" not in state
        tensors = {_llama_name(n, "model."): t for n, t in state.items()}
        config = _llama_hf_config(cfg, tied)
        arch = "LlamaForCausalLM"
    elif family == "gpt2":
        tensors = _gpt2_tensors(state, cfg)
        tied = "lm_head.weight" not in tensors
        config = _gpt2_hf_config(cfg, tied)
        arch = "GPT2LMHeadModel"
    else:
        if cfg.mlm_head == "bert":
            raise ExportError("hf export: BERT's masked-LM head is not written (BertModel); drop it or use a "
                              "tinyformer folder")
        tensors = {_bert_name(n): t for n, t in state.items()}
        if not cfg.type_vocab_size:  # BertModel always adds a token-type embedding: one row of zeros adds nothing
            tensors["embeddings.token_type_embeddings.weight"] = torch.zeros(1, cfg.d_model)
        config = _bert_hf_config(cfg)
        arch = "BertModel"
    config.update(architectures=[arch], torch_dtype="float32", bos_token_id=model.bos_token_id,
                  eos_token_id=model.eos_token_id)
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        tmp.mkdir()
        (tmp / "model.safetensors").write_bytes(save(tensors, metadata={"format": "pt"}))
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        gen = {"bos_token_id": model.bos_token_id, "eos_token_id": model.eos_token_id}
        (tmp / "generation_config.json").write_text(json.dumps({k: v for k, v in gen.items() if v is not None},
                                                               indent=2) + "\n")
        if model.tokenizer is not None:
            _write_hf_tokenizer(model, tmp, cfg)


def _llama_hf_config(cfg, tied: bool) -> dict:
    return dict(model_type="llama", hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layer,
                num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim,
                hidden_act="silu", max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                rope_theta=cfg.rope_theta, vocab_size=cfg.vocab_size, tie_word_embeddings=tied,
                attention_bias=False, mlp_bias=False)


def _gpt2_hf_config(cfg, tied: bool) -> dict:
    act = {"gelu": "gelu", "gelu_tanh": "gelu_new"}[cfg.act]
    return dict(model_type="gpt2", n_embd=cfg.d_model, n_inner=cfg.d_ff, n_layer=cfg.n_layer, n_head=cfg.n_head,
                n_positions=cfg.max_seq_len, n_ctx=cfg.max_seq_len, vocab_size=cfg.vocab_size,
                activation_function=act, layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=tied,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, scale_attn_weights=True)


def _bert_hf_config(cfg) -> dict:
    act = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}.get(cfg.act)
    if act is None:
        raise ExportError(f"hf export: BERT has no {cfg.act!r} activation")
    return dict(model_type="bert", hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layer,
                num_attention_heads=cfg.n_head, hidden_act=act, max_position_embeddings=cfg.max_seq_len,
                type_vocab_size=cfg.type_vocab_size or 1, layer_norm_eps=cfg.norm_eps, vocab_size=cfg.vocab_size,
                pad_token_id=cfg.pad_token_id or 0, position_embedding_type="absolute",
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _gpt2_tensors(state: dict, cfg) -> dict:
    """GPT2LMHeadModel's tensors: q | k | v fused into c_attn, Conv1D weights (in, out)."""
    out = {}
    for n, t in state.items():
        theirs = gpt2_name(n, GPT2_HF, "transformer.")
        if ".attn.w" in n and ".attn.wo." not in n:
            if ".attn.wq." not in n:
                continue  # fused with wq's below
            prefix = n.replace(".attn.wq.", ".attn.{}.")
            t = torch.cat([state[prefix.format(x)] for x in ("wq", "wk", "wv")])  # (3C, C) or (3C,)
        out[theirs] = t.t() if gpt2_conv1d(n, GPT2_HF) else t  # (out, in) -> Conv1D's (in, out)
    if cfg.tie_embeddings and "lm_head" not in state:
        out.pop("lm_head.weight", None)
    return out


def _write_hf_tokenizer(model, folder: Path, cfg) -> None:
    tok = model.tokenizer
    (folder / "tokenizer.json").write_text(tok.to_str())
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_seq_len,
          "clean_up_tokenization_spaces": False}
    for key, i in (("bos_token", model.bos_token_id), ("eos_token", model.eos_token_id),
                   ("pad_token", cfg.pad_token_id)):
        if i is not None:
            tc[key] = tok.id_to_token(i)
    if getattr(model, "chat_template", None):
        tc["chat_template"] = model.chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(tc, indent=2) + "\n")
