"""tinyformer.kernels: Triton kernels (fused attention, int8 and int4 matmul) with their pure-torch references.

This folder imports nothing else of tinyformer, so it can be read and used on its own. Contract: shared/API.md.
Each op runs its Triton kernel on CUDA tensors (and on CPU tensors under TRITON_INTERPRET=1) and torch's own fast
CPU kernels otherwise; `tinyformer.kernels.reference` holds one pure-torch reference per kernel, same signatures.
`quant` holds the quantization primitives (choose_qparams / quantize / dequantize).
"""
from . import quant, reference
from .flash_attention import attention
from .int4_mm import int4_matmul
from .int8_mm import int8_matmul, int8_weight_only_matmul, quantize_per_token
from .reference import pack_int4, unpack_int4

__all__ = ["attention", "int8_matmul", "int8_weight_only_matmul", "quantize_per_token", "int4_matmul", "pack_int4",
           "unpack_int4", "quant", "reference"]
