"""Test setup: with no CUDA device, Triton kernels run under the interpreter (TRITON_INTERPRET=1) on CPU tensors.

The variable must be set before any module that defines @triton.jit kernels is imported (shared/TRITON_ON_CPU.md),
so it is set here, at collection time, before the tests import tinyformer.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `make test` runs the files on pytest-xdist workers, one per core: each worker then keeps torch to its share of the
# cores (two workers with two OpenMP threads each on 2 cores made the interpreter-bound tests 1.8x slower)
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_threads = max(1, min(2, (os.cpu_count() or 1) // _workers))
torch.set_num_threads(_threads)
if _workers > 1:  # and so do the processes a test starts (CLI runs, torchrun, notebook kernels): two notebook
    os.environ["OMP_NUM_THREADS"] = str(_threads)  # kernels with 2 OpenMP threads each ran 5-7 min instead of 30 s
