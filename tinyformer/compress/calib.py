"""Calibration: what the data-aware compression methods (GPTQ, AWQ, SmoothQuant, Wanda, activation-aware SVD) know
about each linear layer's inputs, gathered block by block.

`blockwise(model, calib, fn)` walks the transformer blocks in order. For each block it runs the block on the inputs
the *already compressed* earlier blocks produce, accumulates `InputStats` for every `Linear` in it, calls
`fn(block, stats)` (which compresses the block in place), then runs the compressed block again to get the next
block's inputs. This is the sequential scheme of GPTQ (Frantar et al. 2022, section 4 "Step 3") and SparseGPT: each
layer corrects for the error of the layers before it, and only one block's activations are held at a time.

The statistics are sums over every calibration token x (a row of the layer's input):
- `hessian` H = sum x x^T (K, K) (float64): GPTQ's Hessian (up to the factor 2/n); the output error of any weight
  change dW is tr(dW H dW^T), which AWQ's scale search and the tests use;
- `sq_norm` = diag(H) = sum x_j^2 (K,): Wanda's ||X_j||_2^2, and the activation scale of AWQ and ASVD;
- `absmax` = max |x_j| (K,): SmoothQuant's activation range.

`calib` is a LongTensor of token ids (N, T) for decoders and encoders, or a pair (input_ids, decoder_input_ids) for
encoder-decoders; it is run in batches of `batch_size` sequences.
"""
from __future__ import annotations


from dataclasses import dataclass
from typing import Callable

import torch

from tinyformer.model import Linear


@dataclass
class InputStats:
    hessian: torch.Tensor | None  # (K, K) float64 sum of x x^T, None when only norms were asked for
    sq_norm: torch.Tensor  # (K,) float64 sum of x_j^2
    absmax: torch.Tensor  # (K,) float32 max |x_j|
    n: int = 0  # rows (tokens) seen

    @classmethod
    def empty(cls, k: int, hessian: bool, device) -> "InputStats":
        h = torch.zeros(k, k, dtype=torch.float64, device=device) if hessian else None
        return cls(h, torch.zeros(k, dtype=torch.float64, device=device), torch.zeros(k, device=device))

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (..., K) -> (rows, K)
        x64 = x.double()
        if self.hessian is not None:
            self.hessian += x64.T @ x64
        self.sq_norm += (x64 * x64).sum(0)
        self.absmax = torch.maximum(self.absmax, x.abs().amax(0))
        self.n += x.shape[0]

    @property
    def col_norm(self) -> torch.Tensor:
        """||X_j||_2 per input column (K,) float32."""
        return self.sq_norm.sqrt().float()


def linears(module) -> list[tuple[str, Linear]]:
    """(name, Linear) of the float linear layers inside `module` (a block or a model), in order."""
    return [(n, m) for n, m in module.named_modules() if type(m) is Linear]


def stacks(model) -> list:
    """The model's Stacks in the order their inputs are computed (encoder before decoder)."""
    return [s for s in (getattr(model, "encoder", None), getattr(model, "decoder", None)) if s is not None]


def check_calib(model, calib):
    """Validate `calib` for `model`; returns it as a tuple of LongTensors with a leading batch dim."""
    arch = model.config.arch
    if calib is None:
        raise ValueError("this method needs calibration data: pass calib= token ids (N, T)"
                         + (" as a pair (input_ids, decoder_input_ids)" if arch == "encoder-decoder" else ""))
    parts = tuple(calib) if isinstance(calib, (tuple, list)) else (calib,)
    want = 2 if arch == "encoder-decoder" else 1
    if len(parts) != want or not all(isinstance(p, torch.Tensor) and p.dim() == 2 and not p.is_floating_point()
                                     for p in parts):
        raise ValueError(f"calib for an {arch} model must be {'a pair of ' if want == 2 else ''}integer token-id "
                         f"tensor{'s' if want == 2 else ''} of shape (N, T)")
    if len({p.shape[0] for p in parts}) != 1:
        raise ValueError("calib: input_ids and decoder_input_ids need the same number of rows")
    vocab = model.config.vocab_size
    for p in parts:
        if p.numel() and (int(p.min()) < 0 or int(p.max()) >= vocab):
            raise ValueError(f"calib has token ids outside the vocabulary [0, {vocab})")
    return parts


class _Stop(Exception):
    pass


def _run(model, batch):
    return model(*batch)


@torch.no_grad()
def _first_block_inputs(model, stack, parts, batch_size):
    """[(args, kwargs)] that `stack.blocks[0]` is called with, one per calibration batch (the model is run up to it)."""
    captured = []

    def grab(_module, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = stack.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        device = next(model.parameters()).device
        for i in range(0, parts[0].shape[0], batch_size):
            try:
                _run(model, [p[i:i + batch_size].to(device) for p in parts])
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def block_stats(block, inputs, hessian: bool = True) -> dict[str, InputStats]:
    """Run `block` on each captured (args, kwargs) and return {linear name in the block: InputStats}."""
    stats, handles = {}, []
    for name, lin in linears(block):
        stats[name] = InputStats.empty(lin.weight.shape[1], hessian, lin.weight.device)
        handles.append(lin.register_forward_pre_hook(lambda _m, args, s=stats[name]: s.add(args[0])))
    try:
        for args, kwargs in inputs:
            block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return stats


@torch.no_grad()
def blockwise(model, calib, fn: Callable, batch_size: int = 8, hessian: bool = True, progress: bool = False):
    """For each block in order: stats of its linears on the current inputs, `fn(block, stats)`, then the block's
    outputs (after `fn` changed it) become the next block's inputs. Returns the model."""
    parts = check_calib(model, calib)
    was_training = model.training
    model.eval()
    try:
        for stack in stacks(model):
            inputs = _first_block_inputs(model, stack, parts, batch_size)
            for i, block in enumerate(stack.blocks):
                fn(block, block_stats(block, inputs, hessian))
                if i + 1 < len(stack.blocks):
                    inputs = [((block(*args, **kwargs), *args[1:]), kwargs) for args, kwargs in inputs]
                if progress:
                    print(f"  calibrated block {i + 1}/{len(stack.blocks)}", flush=True)
    finally:
        model.train(was_training)
    return model


@torch.no_grad()
def model_stats(model, calib, batch_size: int = 8, hessian: bool = False) -> dict[str, InputStats]:
    """{full linear name: InputStats} of every block linear from one pass of the unchanged model (for methods that
    change nothing between blocks, or that need all the statistics first)."""
    out = {}
    names = {id(m): n for n, m in model.named_modules()}

    def keep(block, stats):
        prefix = names[id(block)]
        out.update({f"{prefix}.{k}": v for k, v in stats.items()})

    blockwise(model, calib, keep, batch_size, hessian)
    return out
