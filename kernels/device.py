"""Every hardware and platform probe of the kernels, in one place: whether triton is installed (it is Linux-only:
without it the kernel files still import and CPU tensors take torch's paths), whether the interpreter is on, CUDA
device facts (compute capability, SM count), which backend a tensor takes, and what the CPU does with bf16.

Devices are queried at launch time only, never at import: a machine without a GPU must import every kernel file.
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import Optional

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

# @triton.jit decides interpreter-or-compiler when a kernel file is imported, not at launch: remember the decision.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def cdiv(a: int, b: int) -> int:
    """Ceiling division for launch grids on the host: `triton.cdiv` is a @triton.jit function, and calling one from
    Python goes through the JIT's call wrapper, several times per launch."""
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


def arch_of(device: torch.device) -> Optional[int]:
    """Compute capability (80, 90, ...) of a CUDA device; None under the interpreter or for CPU tensors, where the
    launchers use their small interpreter configs."""
    if INTERPRET or device.type != "cuda":
        return None
    return cuda_arch(cuda_index(device))


@functools.lru_cache(maxsize=None)
def _warn_once(msg: str):
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def backend_of(t: torch.Tensor, op: str) -> str:
    """"triton" (CUDA tensors, or CPU tensors under an interpreter that was on when the kernels were imported) or
    "torch" (every other case). op names the caller in the error raised for CUDA tensors without triton."""
    if t.is_cuda:
        if not HAS_TRITON:
            raise RuntimeError(f"{op} on CUDA tensors needs triton (pip install triton)")
        return "triton"
    if t.device.type == "cpu" and HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1":
        if INTERPRET:
            return "triton"
        _warn_once("TRITON_INTERPRET=1 was set after tinyformer.kernels was imported, so its kernels were built for a "
                   "GPU; CPU tensors take torch's path. Set it before the import.")
    return "torch"


@functools.cache
def onednn_bf16() -> bool:
    """Whether oneDNN multiplies bf16 on this CPU (AVX512 BW/VL/DQ or AVX-NE-CONVERT). Where it does not (AVX2-only
    CPUs), torch's bf16 matmul is aten's own, a GEMV per row, slower than fp32 from a few rows on."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return torch.backends.mkldnn.is_available() and check is not None and bool(check())


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX): there oneDNN's bf16 GEMMs outrun fp32;
    without, bf16 is emulated."""
    check = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(f() for f in check if f is not None)
