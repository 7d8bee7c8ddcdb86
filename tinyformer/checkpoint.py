"""Saving models: a folder with config.json + model.safetensors (+ tokenizer.json), which `tinyformer.load` reads
(tinyformer.convert).

Every file is written atomically (temporary file in the same folder, flush + fsync, rename), so a crash never leaves
a half-written file where a good one was. Nothing executes code from a file: weights are safetensors, configs are
JSON. config.json records what compression changed, so loading can rebuild the same modules before assigning the
weights: every module with a `spec()` (the quantized and low-rank linears of tinyformer.qlinear) by name, the shapes
structured pruning left (attention heads, feed-forward width), and the pruning summary.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

FORMAT = "tinyformer"
FORMAT_VERSION = 1
TOKENIZER_EXTRAS = ("chat_template", "bos_token_id", "eos_token_id")  # model attributes kept in config.json


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path` to write; on success fsync it and rename it over `path` (a file or a
    folder), on failure remove it. An existing folder at `path` is moved aside first and deleted after the rename."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.rmdir(tmp)  # the caller makes a file or a folder there
    old = None
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        if path.is_dir():  # a folder cannot be renamed over a non-empty one: swap it out
            old = path.with_name(tmp.name + ".old")
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(path.parent)


def atomic_write(path, write) -> None:
    """Call write(f) on a temporary binary file beside `path`, fsync it, then rename it over `path`."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            write(f)


def _fsync_dir(folder) -> None:
    try:  # make a rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
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
    if any(type(m).__dict__.get("scheme") == "lora" for m in model.modules()):  # no loader reads wrapped layers
        raise ValueError(f"cannot save to {path}: the model has LoRA adapters; save them with "
                         "finetune.save_adapter, or merge them first with finetune.merge_lora_(model, unload=True)")
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model.config.to_dict(), **(extra or {})}
    special = {k: getattr(model, k, None) for k in TOKENIZER_EXTRAS}
    if any(v is not None for v in special.values()):
        meta["tokenizer"] = special
    quantized = quantization_record(model)
    if quantized:
        meta["quantization"] = quantized
    structure = structure_record(model)
    if structure:
        meta["structure"] = structure
    if getattr(model, "pruning", None):
        meta["pruning"] = model.pruning  # what prune_ did, and each layer's share of zero weights
    atomic_write(path / "model.safetensors", lambda f: f.write(save(state, metadata={"format": "pt"})))
    if model.tokenizer is not None:
        atomic_write(path / "tokenizer.json", lambda f: f.write(model.tokenizer.to_str().encode()))
    write_json(path / "config.json", meta)  # last: a folder with a config.json is complete


def quantization_record(model) -> dict:
    """{module name: spec} of the modules compression swapped in (those with a `spec()`), parents before children."""
    return {name: m.spec() for name, m in model.named_modules() if callable(getattr(m, "spec", None))}


def structure_record(model) -> dict:
    """{module name: {"n_head", "n_kv_head"} or {"d_ff"}} for every attention / feed-forward module whose shape
    differs from model.config (structured pruning); {} for an unpruned model."""
    cfg, out = model.config, {}
    for name, m in model.named_modules():
        if hasattr(m, "n_kv_head") and (m.n_head, m.n_kv_head) != (cfg.n_head, cfg.n_kv_head):  # Attention
            out[name] = {"n_head": m.n_head, "n_kv_head": m.n_kv_head}
        elif hasattr(m, "w2") and getattr(m, "d_ff", cfg.d_ff) != cfg.d_ff:  # FeedForward
            out[name] = {"d_ff": m.d_ff}
    return out


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
