"""Low-rank factorization of linear layers (`lowrank_`), in place: each weight W (out, in) becomes B @ A with
A (r, in) and B (out, r), held as two thin float linears (`tinyformer.qlinear.LowRankLinear`), so a layer keeps
r * (out + in) of its out * in parameters.

Three ways to pick the factors, all a truncated SVD of some matrix M = W T followed by A <- A T^-1:
- "svd" (T = I): the best rank-r approximation of W itself in Frobenius norm (Eckart & Young 1936). Data-free.
- "asvd" (T = diag(s), s_j = rms(x_j)^alpha): activation-aware SVD (Yuan et al. 2023, "ASVD: Activation-aware
  Singular Value Decomposition for Compressing Large Language Models", arXiv 2312.05821). Columns that meet large
  inputs weigh more in the SVD, so their error shrinks. ASVD scales by mean |x_j|; we use the root mean square
  sqrt(sum x_j^2 / n) that `calib.InputStats.sq_norm` already holds (same ordering of channels, same alpha = 0.5).
- "whiten" (T = L, the Cholesky factor of the input Gram matrix H = sum x x^T = L L^T): SVD-LLM's truncation-aware
  data whitening (Wang et al. 2024, "SVD-LLM: Truncation-aware Singular Value Decomposition for Large Language
  Model Compression", arXiv 2403.07378). The layer's output error on the calibration inputs is
  ||(W - W') X||^2 = tr(dW H dW^T) = ||dW L||_F^2, and (W - W') L = W L - [W L]_r, so by Eckart-Young this is the
  exact minimiser of the output error at rank r; the error equals the sum of the discarded singular values of W L
  squared. A damping term (a fraction `damp` of H's mean diagonal, as GPTQ does) keeps H positive definite.

The API's default is "svd" (it needs nothing but the weights). Of the data-aware methods, use "whiten": it minimises
the quantity that matters rather than a proxy, and on SmolLM2-135M (benchmarks/compression_lowrank.py) it left 2-10x
less relative output error than ASVD on every linear of the first and last block, at both 20% and 40% fewer
parameters, and a perplexity of 91 where ASVD gave 7.3e6 and SVD 3.8e7 (dense 23.4; 20% fewer block-linear
parameters, before any fine-tune). ASVD stays because the API names it and it needs only per-column norms (no K x K
matrix, no Cholesky).

Rank choice, per layer: `rank_ratio` is the fraction of each layer's parameters kept,
r = floor(rank_ratio * out * in / (out + in)) (so rank_ratio=0.8 gives "20% fewer linear parameters"); or, with
`energy`, the smallest r whose top singular values (of M) hold that fraction of sum(sigma^2). A layer whose factors
would not be smaller than W (r * (out + in) >= out * in) is left as it is. Note what this costs: a square n x n
layer breaks even at rank n/2, so 20% fewer parameters keeps 40% of its spectrum (rank 230 of SmolLM2's 576).

Data-aware statistics are gathered with `calib.blockwise`, so each block's inputs come from the already-factored
blocks before it (the sequential scheme of GPTQ). After factoring, `finetune` runs a short next-token fine-tune of
the block linears, i.e. the factors (AdamW, cosine schedule), to win back some of the loss (SVD-LLM fine-tunes its
factors too, with LoRA).

References: Eckart & Young 1936; Sainath et al. 2013 ("Low-rank matrix factorization for deep neural network training
with high-dimensional output targets": a layer as two thin layers); Yuan et al. 2023 (ASVD); Wang et al. 2024
(SVD-LLM); Frantar et al. 2022 (GPTQ: damping, block-sequential calibration).
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from tinyformer.compress import calib as _calib
from tinyformer.model import Linear
from tinyformer.qlinear import LowRankLinear, _set

__all__ = ["svd_factor", "asvd_factor", "whiten_factor", "rank_from_ratio", "rank_from_energy", "activation_scale",
           "output_error", "lowrank_", "finetune", "linear_params"]

METHODS = ("svd", "asvd", "whiten")


# ----------------------------------------------------------------------------------------------------------------------
# pure primitives (one weight at a time)
def _check_weight(W):
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or not W.is_floating_point():
        got = f"{tuple(W.shape)} {W.dtype}" if isinstance(W, torch.Tensor) else type(W).__name__
        raise ValueError(f"W must be a 2-D float tensor (out, in), got {got}")


def _check_rank(rank, W):
    if not isinstance(rank, numbers.Integral) or isinstance(rank, bool) or not 1 <= rank <= min(W.shape):
        raise ValueError(f"rank must be an int in 1..min(out, in)={min(W.shape)}, got {rank!r}")


def _truncate(U, S, Vh, rank: int):
    """U S Vh truncated to `rank`, the singular values split evenly: A = sqrt(S) Vh (r, K), B = U sqrt(S) (N, r)."""
    root = S[:rank].sqrt()  # (r,)
    return root[:, None] * Vh[:rank], U[:, :rank] * root[None, :]


def svd_factor(W, rank: int):
    """(A, B), A (rank, in) and B (out, rank), with B @ A the best rank-`rank` approximation of W in Frobenius norm
    (truncated SVD; the error is the sum of the discarded singular values squared). Computed in float64, returned in
    W's dtype."""
    _check_weight(W)
    _check_rank(rank, W)
    U, S, Vh = torch.linalg.svd(W.detach().double(), full_matrices=False)  # (N, k), (k,), (k, K)
    A, B = _truncate(U, S, Vh, rank)
    return A.to(W.dtype), B.to(W.dtype)


def activation_scale(stats, alpha: float = 0.5):
    """ASVD's per-input-column scale s_j = rms(x_j)^alpha (K,), from `calib.InputStats` (sq_norm and n). Columns that
    never saw a non-zero input get the smallest non-zero scale, so that S stays invertible."""
    if not isinstance(stats, _calib.InputStats) or stats.n <= 0:
        raise ValueError("stats must be a calib.InputStats gathered on at least one input row")
    if not isinstance(alpha, numbers.Real) or alpha < 0:
        raise ValueError(f"alpha must be a number >= 0, got {alpha!r}")
    rms = (stats.sq_norm / stats.n).sqrt()  # (K,) float64
    positive = rms[rms > 0]
    floor = positive.min() if positive.numel() else torch.ones((), dtype=rms.dtype)
    return rms.clamp(min=floor) ** alpha


def asvd_factor(W, rank: int, scale):
    """Activation-aware SVD: truncated SVD of W diag(scale), then A <- A diag(scale)^-1. `scale` (in,) positive, e.g.
    `activation_scale(stats)`."""
    _check_weight(W)
    _check_rank(rank, W)
    s = torch.as_tensor(scale, dtype=torch.float64, device=W.device)
    if s.shape != (W.shape[1],) or not bool((s > 0).all()):
        raise ValueError(f"scale must be a positive vector of W's in-features ({W.shape[1]},), got {tuple(s.shape)}")
    U, S, Vh = torch.linalg.svd(W.detach().double() * s[None, :], full_matrices=False)  # SVD of W diag(s)
    A, B = _truncate(U, S, Vh, rank)
    return (A / s[None, :]).to(W.dtype), B.to(W.dtype)


def _cholesky(hessian, damp: float):
    """Lower-triangular L with L L^T = H + damp * mean(diag H) * I (float64)."""
    H = hessian.detach().double()
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"hessian must be a square (in, in) matrix, got {tuple(H.shape)}")
    if not isinstance(damp, numbers.Real) or damp < 0:
        raise ValueError(f"damp must be a number >= 0, got {damp!r}")
    mean_diag = H.diagonal().mean()
    level = damp * mean_diag if mean_diag > 0 else torch.ones((), dtype=H.dtype)
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for _ in range(6):  # H is a Gram matrix (PSD); rounding or too few tokens can still leave it singular
        L, info = torch.linalg.cholesky_ex(H + level * eye)
        if int(info) == 0:
            return L
        level = max(level * 10, 1e-8 * max(float(mean_diag), 1.0))
    raise ValueError("hessian is not positive semi-definite (Cholesky failed even after damping)")


def whiten_factor(W, rank: int, hessian, damp: float = 0.01):
    """SVD-LLM's whitened SVD: L = chol(H + damp * mean(diag H) * I), truncated SVD of W L, then A <- A L^-1. Minimises
    the output error tr(dW H dW^T) over rank-`rank` B @ A (for the damped H); `hessian` (in, in) = sum x x^T."""
    _check_weight(W)
    _check_rank(rank, W)
    if not isinstance(hessian, torch.Tensor) or hessian.shape != (W.shape[1], W.shape[1]):
        got = tuple(hessian.shape) if isinstance(hessian, torch.Tensor) else type(hessian).__name__
        raise ValueError(f"hessian must be (in, in) = {(W.shape[1], W.shape[1])}, got {got}")
    L = _cholesky(hessian.to(W.device), damp)  # (K, K) lower
    U, S, Vh = torch.linalg.svd(W.detach().double() @ L, full_matrices=False)  # SVD of W L
    A, B = _truncate(U, S, Vh, rank)
    A = torch.linalg.solve_triangular(L, A, upper=False, left=False)  # A L^-1: solves X L = A for X (r, K)
    return A.to(W.dtype), B.to(W.dtype)


def rank_from_ratio(n_out: int, n_in: int, rank_ratio: float) -> int:
    """The rank that keeps `rank_ratio` of an (n_out, n_in) layer's weights: floor(ratio * out * in / (out + in)),
    at least 1."""
    _check_fraction("rank_ratio", rank_ratio, closed=False)
    return max(1, math.floor(rank_ratio * n_out * n_in / (n_out + n_in)))


def rank_from_energy(singular_values, energy: float) -> int:
    """The smallest r whose top-r squared singular values hold at least `energy` of their total."""
    _check_fraction("energy", energy, closed=True)
    s2 = torch.as_tensor(singular_values, dtype=torch.float64).flatten() ** 2
    if s2.numel() == 0:
        raise ValueError("singular_values is empty")
    cum = s2.sort(descending=True).values.cumsum(0)  # (k,)
    # a relative slack of 1e-12 so that energy=1.0 (or a hand-computed boundary) is not lost to rounding
    return min(int((cum < energy * cum[-1] * (1 - 1e-12)).sum()) + 1, s2.numel())


def output_error(W, W_approx, hessian) -> float:
    """tr(dW H dW^T) with dW = W - W_approx: the summed squared output error over the inputs whose H = sum x x^T."""
    dW = (W.detach() - W_approx.detach()).double()  # (N, K)
    return float(((dW @ hessian.double()) * dW).sum())


def _check_fraction(name, value, closed: bool):
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = ok and (0 < value <= 1 if closed else 0 < value < 1)
    if not ok:
        raise ValueError(f"{name} must be a number in (0, 1{']' if closed else ')'}, got {value!r}")


# ----------------------------------------------------------------------------------------------------------------------
# the verb
def _targets(block) -> list[tuple[str, Linear]]:
    """(name in block, Linear) of the block's float linears, not counting the factors of an earlier lowrank_."""
    factored = [n for n, m in block.named_modules() if isinstance(m, LowRankLinear)]
    return [(n, m) for n, m in _calib.linears(block) if not any(n.startswith(f + ".") for f in factored)]


def _factor(lin: Linear, method, stats, rank_ratio, energy, alpha, damp):
    """The LowRankLinear for `lin`, or None when factoring would not make it smaller."""
    W = lin.weight.detach()
    n_out, n_in = W.shape
    if method == "svd":
        M = W.double()
    elif method == "asvd":
        s = activation_scale(stats, alpha).to(W.device)
        M = W.double() * s[None, :]  # W diag(s)
    else:
        L = _cholesky(stats.hessian.to(W.device), damp)
        M = W.double() @ L  # W L
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)  # (N, k), (k,), (k, K)
    r = rank_from_energy(S, energy) if energy is not None else rank_from_ratio(n_out, n_in, rank_ratio)
    if r * (n_out + n_in) >= n_out * n_in:
        return None
    A, B = _truncate(U, S, Vh, r)  # (r, K), (N, r)
    if method == "asvd":
        A = A / s[None, :]
    elif method == "whiten":
        A = torch.linalg.solve_triangular(L, A, upper=False, left=False)  # A L^-1
    return LowRankLinear.from_factors(A.to(W.dtype), B.to(W.dtype), lin.bias)


def lowrank_(model, rank_ratio: float = 0.5, method: str = "svd", calib=None, energy: float | None = None,
             alpha: float = 0.5, damp: float = 0.01, batch_size: int = 8, progress: bool = False):
    """Factor every float `Linear` of the model's transformer blocks into a `LowRankLinear` (two thin linears), in
    place; returns the model.

    rank_ratio: the fraction of each layer's parameters kept (0 < ratio < 1): r = floor(ratio * out * in / (out + in)).
    energy: if given, chooses each layer's rank instead (the smallest r keeping that share of sum(sigma^2) of the
        matrix that is factored), and `rank_ratio` is ignored.
    method: "svd" (data-free), "asvd" (activation-aware column scaling, `alpha`) or "whiten" (SVD-LLM, `damp`); the
        last two need `calib` token ids (N, T) and gather statistics block by block on the already-factored model.
    Embeddings and the output head stay as they are; a layer that factoring would not shrink is skipped (listed in
    `model.lowrank_skipped`), and so are the factors of an earlier lowrank_ call.
    """
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model must be a tinyformer model, got {type(model).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if energy is None:
        _check_fraction("rank_ratio", rank_ratio, closed=False)
    else:
        _check_fraction("energy", energy, closed=True)
    if not isinstance(alpha, numbers.Real) or alpha < 0:
        raise ValueError(f"alpha must be a number >= 0, got {alpha!r}")
    if not isinstance(damp, numbers.Real) or damp < 0:
        raise ValueError(f"damp must be a number >= 0, got {damp!r}")
    stacks = _calib.stacks(model)
    if not any(_targets(b) for s in stacks for b in s.blocks):
        raise ValueError("the model has no float Linear layers to factor (already factored or quantized?)")
    skipped, names = [], {id(m): n for n, m in model.named_modules()}

    @torch.no_grad()
    def factor_block(block, stats):
        for name, lin in _targets(block):
            new = _factor(lin, method, stats.get(name) if stats else None, rank_ratio, energy, alpha, damp)
            if new is None:
                skipped.append(f"{names[id(block)]}.{name}")
            else:
                _set(block, name, new.to(lin.weight.device))

    if method == "svd":
        for stack in stacks:
            for block in stack.blocks:
                factor_block(block, None)
    else:
        _calib.blockwise(model, calib, factor_block, batch_size=batch_size, hessian=method == "whiten",
                         progress=progress)
    model.lowrank_skipped = skipped
    return model


def linear_params(model) -> int:
    """Parameters of the float linear layers inside the transformer blocks (weights and biases, factors included):
    the count that `rank_ratio` shrinks."""
    return sum(p.numel() for s in _calib.stacks(model) for b in s.blocks for _, m in _calib.linears(b)
               for p in m.parameters())


# ----------------------------------------------------------------------------------------------------------------------
# recovery
def finetune(model, ids, steps: int = 200, block_size: int = 256, batch_size: int = 4, lr: float = 1e-4,
             weight_decay: float = 0.0, warmup: int = 10, train: str = "linears", grad_clip: float = 1.0,
             seed: int = 0, log_every: int = 0) -> list[float]:
    """A short next-token fine-tune of a decoder after factoring: `steps` AdamW steps on random windows of the 1-D
    token ids `ids`, learning rate warmed up over `warmup` steps then cosine-decayed to lr/10. train="linears" trains
    only the float linears of the blocks (after lowrank_: the factors, plus any layer it skipped); the rest is frozen,
    which also saves the optimizer state of the embeddings, and the same call on the dense model is the control that
    tells recovery from plain extra training. train="all" trains every float parameter. Returns the training losses;
    the model is left in eval mode with its requires_grad flags as they were."""
    if getattr(getattr(model, "config", None), "arch", None) != "decoder":
        raise ValueError("finetune needs a decoder language model (next-token loss)")
    if train not in ("linears", "all"):
        raise ValueError(f"train must be 'linears' or 'all', got {train!r}")
    for name, v in (("steps", steps), ("block_size", block_size), ("batch_size", batch_size)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if block_size > model.config.max_seq_len:
        raise ValueError(f"block_size {block_size} exceeds max_seq_len={model.config.max_seq_len}")
    ids = torch.as_tensor(ids).reshape(-1).long()
    if ids.numel() < block_size + 2:
        raise ValueError(f"ids must hold more than block_size + 1 = {block_size + 1} tokens, got {ids.numel()}")
    flags = {p: p.requires_grad for p in model.parameters()}
    if train == "linears":
        chosen = {p for s in _calib.stacks(model) for b in s.blocks for _, m in _calib.linears(b)
                  for p in m.parameters()}
    else:
        chosen = set(flags)
    params = [p for p in model.parameters() if p in chosen and p.is_floating_point()]
    if not params:
        raise ValueError("finetune found no float parameters to train (are all the block linears quantized?)")
    for p in flags:
        p.requires_grad_(p in chosen)
    device = params[0].device
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    try:
        for step in range(steps):
            warm = (step + 1) / (warmup + 1) if step < warmup else 1.0
            progress = max(0, step - warmup) / max(1, steps - warmup)
            for g in opt.param_groups:  # warmup, then cosine from lr to lr / 10
                g["lr"] = lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
            starts = torch.randint(0, ids.numel() - block_size - 1, (batch_size,), generator=gen)
            rows = torch.stack([ids[s:s + block_size + 1] for s in starts.tolist()]).to(device)  # (B, T + 1)
            logits = model(rows[:, :-1])  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), rows[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            losses.append(loss.item())
            if log_every and (step % log_every == 0 or step == steps - 1):
                print(f"  finetune step {step + 1}/{steps}: loss {losses[-1]:.4f}", flush=True)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.eval()
    return losses
