"""tinyformer.kernels: Triton kernels (fused attention, int8 and int4 matmul) with their pure-torch references.

This folder imports nothing else of tinyformer, so it can be read and used on its own. Contract: docs/API.md.
One op per file, each read top to bottom as @triton.jit kernels -> launcher -> autograd.Function (where the op is
differentiable) -> public function: `flash_attention` (attention), `int8_mm` (W8A8 int8_matmul), `int8_wo_mm`
(int8_weight_only_matmul), `per_token_quant` (quantize_per_token), `int4_mm` (int4_matmul), `w4a8_mm`
(w4a8_matmul: int4 weights, int8 activations), `fp8_mm` (fp8_matmul), and the fused training ops `fused_rms_norm`
(rms_norm), `fused_layer_norm` (layer_norm), `fused_swiglu` (swiglu), `fused_rope` (rope), `fused_linear_cross_entropy`
(linear_cross_entropy). Beneath them:
`matmul` (the low-bit kernels' shared launch, split-K and config lookup), `configs` + configs.csv (every GPU launch
configuration, as data, with its measured registers and spills), `device` (every hardware probe), `cpu` (torch's own
fast kernels, where Triton does not run), `reference` (one pure-torch reference per op, same signatures), `quant`
(the quantization primitives choose_qparams / quantize / dequantize) and `aot` (the ahead-of-time compile report).
"""
from . import quant, reference
from .flash_attention import attention
from .fp8_mm import fp8_matmul
from .fused_layer_norm import layer_norm
from .fused_linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_rows
from .fused_rms_norm import rms_norm
from .fused_rope import rope
from .fused_swiglu import swiglu
from .int4_mm import int4_matmul
from .int8_mm import int8_matmul
from .int8_wo_mm import int8_weight_only_matmul
from .per_token_quant import quantize_per_token
from .reference import pack_int4, unpack_int4
from .w4a8_mm import w4a8_matmul

__all__ = ["attention", "fp8_matmul", "int8_matmul", "int8_weight_only_matmul", "quantize_per_token", "int4_matmul",
           "w4a8_matmul", "pack_int4", "rms_norm", "layer_norm", "swiglu", "rope", "linear_cross_entropy",
           "linear_cross_entropy_rows", "unpack_int4", "quant", "reference"]
