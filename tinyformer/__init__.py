"""tinyformer: tiny transformers written on tensors, with Triton attention and low-bit matmul kernels.

Public contract: docs/API.md. `ModelConfig` + `build` make a model, `load` reads a saved one, `export` writes GGUF /
Hugging Face copies, `tinyformer.eval` measures it, `tinyformer.kernels` holds the kernels and their references.
"""
from tinyformer import eval  # noqa: A004  (tinyformer.eval.perplexity is part of the public API)
from tinyformer.config import ModelConfig
from tinyformer.convert import load
from tinyformer.export import export
from tinyformer.model import DecoderLM, Encoder, EncoderDecoder, build
from tinyformer.ops import get_backend, set_backend, use_backend

__version__ = "0.1.0"
__all__ = ["ModelConfig", "build", "load", "export", "eval", "DecoderLM", "Encoder", "EncoderDecoder", "set_backend",
           "get_backend", "use_backend"]
