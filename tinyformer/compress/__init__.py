"""Compression: one verb per technique, each changing the model in place and returning it (torchao's `quantize_`
shape), over pure primitives a reader can call on a single weight. Every result runs, saves and loads.

- `quantize_` (quantize.py): round-to-nearest, GPTQ, AWQ; W8A8 with SmoothQuant; quantization-aware training.
- `calib.py`: the per-layer input statistics the data-aware methods share, gathered block by block.
"""
from tinyformer.compress.quantize import quantize_

__all__ = ["quantize_"]
