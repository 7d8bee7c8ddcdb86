"""CUDA device facts the kernel launchers need (compute capability, SM count), cached per device index.

Queried at launch time only, never at import (a machine without a GPU must be able to import every kernel file).
"""
from __future__ import annotations

import functools

import torch


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
