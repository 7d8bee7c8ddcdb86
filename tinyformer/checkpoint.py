"""Saving and loading models: a folder with config.json + model.safetensors (+ tokenizer.json).

Every file is written atomically (temporary file in the same folder, flush + fsync, rename), so a crash never leaves
a half-written file where a good one was. Loading builds the model on the meta device and assigns the memory-mapped
safetensors tensors (`load_state_dict(assign=True)`): no random init, no second copy. Nothing executes code from a
file: weights are safetensors, configs are JSON.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

FORMAT = "tinyformer"
FORMAT_VERSION = 1
TOKENIZER_EXTRAS = ("chat_template", "bos_token_id", "eos_token_id")  # model attributes kept in config.json


def atomic_write(path, write) -> None:
    """Call write(f) on a temporary binary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def write_json(path, obj) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def save_model(model, path, extra: dict | None = None) -> None:
    """Write config.json (+ `extra` keys, e.g. the training config), model.safetensors and tokenizer.json."""
    from safetensors.torch import save

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"cannot save to {path}: it exists and is not a folder")
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    from tinyformer.qlinear import quantization_record
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model.config.to_dict(), **(extra or {})}
    special = {k: getattr(model, k, None) for k in TOKENIZER_EXTRAS}
    if any(v is not None for v in special.values()):
        meta["tokenizer"] = special
    quantized = quantization_record(model)
    if quantized:
        meta["quantization"] = quantized
    from tinyformer.compress.prune import structure_record
    structure = structure_record(model)  # per-module shapes left by structured pruning (heads, neurons)
    if structure:
        meta["structure"] = structure
    if getattr(model, "pruning", None):
        meta["pruning"] = model.pruning  # what prune_ did, and each layer's share of zero weights
    atomic_write(path / "model.safetensors", lambda f: f.write(save(state, metadata={"format": "pt"})))
    if model.tokenizer is not None:
        atomic_write(path / "tokenizer.json", lambda f: f.write(model.tokenizer.to_str().encode()))
    write_json(path / "config.json", meta)  # last: a folder with a config.json is complete


def read_config(path) -> dict:
    path = Path(path)
    cfg_path = path / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"no such model folder: {path}")
    if not cfg_path.exists():
        raise ValueError(f"{path} is not a model folder: it has no config.json")
    try:
        return json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None


def load(path, device="cpu"):
    """Load a model saved by `model.save(path)` (or a foreign one, see convert.py). Returns it in eval mode, its float
    weights packed for decoding (`TransformerBase.pack_`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from tinyformer.config import ModelConfig
    from tinyformer.model import build

    path = Path(path)
    if path.is_file() and path.suffix == ".gguf" or path.is_dir() and (path / "config.json").exists() and \
            read_config(path).get("format") != FORMAT:
        from tinyformer.convert import load_foreign  # Hugging Face folders and GGUF files
        return load_foreign(path, device=device).pack_()
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
            from tinyformer.compress.prune import apply_structure
            apply_structure(model, meta["structure"])
        if meta.get("quantization"):
            from tinyformer.qlinear import swap_in_empty
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
    return model.pack_().eval()  # weights laid out for fast decoding (build an optimizer after this, not before)
