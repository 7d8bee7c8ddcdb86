"""tinyformer.kernels: Triton kernels (fused attention, int8 and int4 matmul) with their pure-torch references.

This folder imports nothing else of tinyformer, so it can be read and used on its own. Contract: shared/API.md.
`tinyformer.kernels.reference` holds one pure-torch reference per kernel, with the same signatures.
"""
from . import reference
from .reference import pack_int4, unpack_int4

__all__ = ["reference", "pack_int4", "unpack_int4"]
