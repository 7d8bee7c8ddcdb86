"""What every kernel file needs to know about the platform: whether triton is installed (it is Linux-only: without it
the kernel files still import and CPU tensors take the torch paths), whether the interpreter is on, and CUDA device
facts (compute capability, SM count), cached per device index.

Devices are queried at launch time only, never at import (a machine without a GPU must import every kernel file).
"""
from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised on machines without triton
    HAS_TRITON = False
    tl = None

    class _NoTriton:  # just enough for the kernel files' decorators to leave plain (never called) functions
        @staticmethod
        def jit(fn=None, **kwargs):
            return fn if fn is not None else (lambda f: f)

    triton = _NoTriton()

# The interpreter decision is taken when @triton.jit runs (import time), not at launch: remember it.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def cdiv(a: int, b: int) -> int:
    """Ceiling division for launch grids on the host. `triton.cdiv` is a @triton.jit function: called from Python
    it goes through the JIT's call wrapper, ~7 us a call on an H100 host (profiled), several per launch."""
    return -(-a // b)


def cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def cuda_arch(index: int) -> int:
    """Compute capability as an int: 80 for sm_80, 90 for sm_90."""
    major, minor = torch.cuda.get_device_capability(index)
    return major * 10 + minor


@functools.lru_cache(maxsize=None)
def num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
