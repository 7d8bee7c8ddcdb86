"""Compression: one verb per technique, each changing the model in place and returning it (torchao's `quantize_`
shape), over pure primitives a reader can call on a single weight. Every result runs, saves and loads.

- `quantize_` (quantize.py): round-to-nearest, GPTQ, AWQ; W8A8 with SmoothQuant; quantization-aware training.
- `lowrank_` (lowrank.py): truncated SVD, activation-aware SVD (ASVD), whitened SVD (SVD-LLM); `finetune`.
- `distill` (distill.py): logit (Hinton), hidden-state and attention-map (TinyBERT/MiniLM) and sequence-level
  (Kim & Rush) distillation; `student_from_teacher` (DistilBERT's every-other-layer init).
- `prune_` (prune.py): magnitude and Wanda scores; unstructured, N:M (2:4), attention heads and feed-forward neurons
  (shrinking the matrices); `prune_iterative_`: gradual pruning with fine-tuning on a cubic schedule.
- `calib.py`: the per-layer input statistics the data-aware methods share, gathered block by block.
"""
from tinyformer.compress.distill import distill
from tinyformer.compress.lowrank import lowrank_
from tinyformer.compress.prune import prune_, prune_iterative_
from tinyformer.compress.quantize import quantize_

__all__ = ["distill", "lowrank_", "prune_", "prune_iterative_", "quantize_"]
