"""Quantization of a model's linear layers (`quantize_`), in place.

- `quantize_(model, bits=8 | 4, group_size=128, method="rtn", activations=False)`: weight-only int8 (per channel) or
  int4 (per group) round-to-nearest; bits=8 with activations=True gives W8A8. GPTQ and AWQ come with the compression
  issue; asking for them now is a clear error.

What is quantized: every `Linear` of the transformer blocks (attention and feed-forward). Token embeddings and the
output head stay in float (the head is usually tied to the embeddings).
"""
from __future__ import annotations

import torch

from tinyformer.model import Linear
from tinyformer.qlinear import Int4Linear, Int8Linear, W8A8Linear, _set

__all__ = ["quantize_"]


@torch.no_grad()
def quantize_(model, bits: int = 8, group_size: int = 128, method: str = "rtn", calib=None,
              activations: bool = False):
    if bits not in (8, 4):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    if method != "rtn":
        raise ValueError(f"method {method!r} is not implemented yet; use method='rtn'")
    if activations and bits != 8:
        raise ValueError("activations=True (W8A8) needs bits=8")
    if bits == 4 and (not isinstance(group_size, int) or group_size <= 0 or group_size % 2):
        raise ValueError(f"group_size must be a positive even int, got {group_size!r}")
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, Linear)]
    if not targets:
        raise ValueError("the model has no float Linear layers to quantize (already quantized?)")
    skipped = []
    for name, lin in targets:
        if bits == 8:
            cls = W8A8Linear if activations else Int8Linear
            q = cls.from_weight(lin.weight, lin.bias)
        elif lin.weight.shape[1] % group_size:
            skipped.append(name)
            continue
        else:
            q = Int4Linear.from_weight(lin.weight, lin.bias, group_size)
        _set(model, name, q.to(lin.weight.device))
    if skipped and len(skipped) == len(targets):
        raise ValueError(f"no layer's in-features is a multiple of group_size={group_size}")
    model.quantization_skipped = skipped
    return model
