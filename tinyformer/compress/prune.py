"""Pruning (`prune_`, `prune_iterative_`), in place: weights set to exactly zero (unstructured, N:M) or whole attention
heads and feed-forward neurons removed so that the matrices really shrink (structured).

Which weights go is decided by a score per weight, compared inside a group:
- "magnitude": score |W_ij| (Han et al. 2015), compared over the whole layer: the layer's `sparsity` share of
  smallest |W| is zeroed (the magnitude baseline of Sun et al. 2023, whose reference code, locuslab/wanda
  lib/prune.py, thresholds each layer as a whole).
- "wanda": score |W_ij| * ||X_j||_2, with ||X_j|| the L2 norm over calibration tokens of input feature j
  (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models", arXiv 2306.11695),
  compared per output row: every row of W loses the same share of its weights (the paper's section 3: per-output
  comparison groups worked better than per layer for LLMs). The norms come from `calib.InputStats.col_norm`,
  gathered block by block by `calib.blockwise(..., hessian=False)`, so each block is scored on the inputs that the
  already-pruned blocks before it produce (as the reference code does; within a block, every linear is scored on
  one pass of the unpruned block).

Patterns:
- "unstructured": the share `sparsity` of each layer's weights (of each row, for wanda) becomes 0. The model stays
  an ordinary float model (same shapes, same file size): pruning alone speeds nothing up on dense kernels.
- "N:M", e.g. "2:4": in every run of M consecutive input weights of a row, the N largest scores are kept (NVIDIA's
  semi-structured sparsity, Mishra et al. 2021, arXiv 2104.08378, which sparse tensor cores run at up to 2x);
  `sparsity` must be 1 - N/M.
- "heads": attention heads removed. A head is scored by the output projection columns it writes through: the sum over
  wo's columns of the head of |W| (magnitude) or of |W| * ||X_j|| (wanda, X = the heads' concatenated outputs).
  A head whose output or output projection is zero scores 0. With grouped-query attention whole KV groups go (the
  group's query heads, their wq rows and wo columns, and its wk/wv rows), so H / Hkv stays valid; the group's score is
  the sum of its query heads'. The nearest whole number of groups to `sparsity * Hkv` is removed, at least one kept.
- "neurons": feed-forward hidden units removed (rows of w1 and w3, columns of w2), scored like heads by w2's column:
  sum_i |W2_ij| (magnitude) or sum_i |W2_ij| * ||H_j|| (wanda, H = the hidden activations).
  Structured scores, like Wanda's, are compared inside each layer: every layer loses the same share (the per-layer
  shapes still differ after rounding, and are saved: config.json "structure" records them per module and
  `tinyformer.load` rebuilds them before assigning the tensors). Related structured methods score by activation
  statistics the same way: Michel et al. 2019 ("Are Sixteen Heads Really Better than One?"), Ma et al. 2023
  (LLM-Pruner: coupled structures removed together), An et al. 2024 (FLAP: channel scores from input statistics).

Only the linears inside the transformer blocks are pruned; embeddings and the (usually tied) output head are not,
as in Wanda and SparseGPT. `model.pruning` records what was done and the resulting zero share of every layer; it is
saved in config.json.

`prune_iterative_` is gradual pruning (Zhu & Gupta 2017, "To prune, or not to prune", arXiv 1710.01878): the
sparsity rises along the cubic schedule s_k = s_f + (s_i - s_f) (1 - k / n)^3 over n pruning events spread across a
short next-token fine-tune, and the masks are re-applied after every optimizer step, so pruned weights stay zero.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyformer.compress import calib as _calib
from tinyformer.model import Attention, FeedForward, Linear

__all__ = ["prune_", "prune_iterative_", "magnitude_scores", "wanda_scores", "unstructured_mask", "nm_mask",
           "cubic_sparsity", "head_scores", "neuron_scores", "shrink_attention_", "shrink_feedforward_",
           "apply_structure", "layer_sparsity"]

METHODS = ("magnitude", "wanda")
STRUCTURED = ("heads", "neurons")


# ----------------------------------------------------------------------------------------------------------------------
# scores and masks: pure functions of one weight
def _check_weight(weight, name="weight"):
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        got = f"{weight.dtype} tensor of shape {tuple(weight.shape)}" if isinstance(weight, torch.Tensor) else \
            type(weight).__name__
        raise ValueError(f"{name} must be a 2-D float tensor (out, in), got {got}")


def _check_sparsity(sparsity, name="sparsity"):
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {sparsity!r}")


def magnitude_scores(weight) -> torch.Tensor:
    """|W| (out, in) in float32."""
    _check_weight(weight)
    return weight.detach().float().abs()


def wanda_scores(weight, col_norm) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 (out, in): col_norm (in,) is the L2 norm of each input feature over the calibration tokens."""
    _check_weight(weight)
    if not isinstance(col_norm, torch.Tensor) or col_norm.shape != (weight.shape[1],):
        got = tuple(col_norm.shape) if isinstance(col_norm, torch.Tensor) else type(col_norm).__name__
        raise ValueError(f"col_norm must have shape (in,) = ({weight.shape[1]},), got {got}")
    return weight.detach().float().abs() * col_norm.to(weight.device, torch.float32)[None, :]  # (out, in)


def _n_pruned(sparsity: float, n: int) -> int:
    return int(math.floor(sparsity * n + 0.5))  # nearest whole number, halves rounded up


def unstructured_mask(scores, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """Bool keep-mask (out, in): False on the nearest whole number to `sparsity * n` lowest scores of the whole matrix
    (per_row=False, n = out * in) or of each row (per_row=True, n = in). Ties are cut by index, so the count is
    exact whatever the scores."""
    _check_weight(scores, "scores")
    _check_sparsity(sparsity)
    mask = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if per_row:
        k = _n_pruned(sparsity, scores.shape[1])
        if k:
            idx = torch.topk(scores, k, dim=1, largest=False).indices  # (out, k)
            mask.scatter_(1, idx, False)
    else:
        k = _n_pruned(sparsity, scores.numel())
        if k:
            idx = torch.topk(scores.reshape(-1), k, largest=False).indices  # (k,) into the flattened (out * in)
            mask.view(-1)[idx] = False
    return mask


def nm_mask(scores, n: int = 2, m: int = 4) -> torch.Tensor:
    """Bool keep-mask (out, in) with exactly n True in every run of m consecutive inputs of a row (the n largest)."""
    _check_weight(scores, "scores")
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
        raise ValueError(f"N:M sparsity needs integers 0 < n < m, got n={n!r}, m={m!r}")
    out, k = scores.shape
    if k % m:
        raise ValueError(f"N:M sparsity with m={m} needs in-features divisible by {m}, got {k}")
    groups = scores.reshape(out, k // m, m)  # (out, in/m, m)
    keep = torch.topk(groups, n, dim=-1).indices  # (out, in/m, n)
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device)
    mask.scatter_(-1, keep, True)
    return mask.reshape(out, k)  # (out, in/m, m) -> (out, in)


def parse_pattern(pattern: str):
    """"unstructured" | "heads" | "neurons" -> (pattern, None); "N:M" -> ("nm", (N, M))."""
    if pattern in ("unstructured",) + STRUCTURED:
        return pattern, None
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern) if isinstance(pattern, str) else None
    if m is None or not 0 < int(m.group(1)) < int(m.group(2)):
        raise ValueError(f"pattern must be 'unstructured', an N:M pattern such as '2:4', 'heads' or 'neurons'; "
                         f"got {pattern!r}")
    return "nm", (int(m.group(1)), int(m.group(2)))


def cubic_sparsity(step: int, n_steps: int, final: float, initial: float = 0.0) -> float:
    """Zhu & Gupta's schedule: s = final + (initial - final) * (1 - step / n_steps)^3 (step clipped to n_steps), which
    prunes fast while many redundant weights remain and slowly near the end."""
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    t = min(max(step, 0), n_steps) / n_steps
    return final + (initial - final) * (1.0 - t) ** 3


# ----------------------------------------------------------------------------------------------------------------------
# structured: scores per head group / neuron, and shrinking the modules
def head_scores(wo_weight, n_head: int, n_kv_head: int, col_norm=None) -> torch.Tensor:
    """Score of each KV group (n_kv_head,): the sum over the wo columns of the group's query heads of |W| (or of
    |W| * col_norm, col_norm (H * Dh,) being the norms of wo's inputs). Query head h belongs to group h // (H / Hkv),
    as grouped-query attention shares k/v heads (each k/v head serves H / Hkv consecutive query heads)."""
    _check_weight(wo_weight, "wo_weight")
    if n_head % n_kv_head or wo_weight.shape[1] % n_head:
        raise ValueError(f"wo_weight in-features {wo_weight.shape[1]} must split into n_head={n_head} heads, "
                         f"n_head into n_kv_head={n_kv_head} groups")
    s = magnitude_scores(wo_weight) if col_norm is None else wanda_scores(wo_weight, col_norm)  # (C, H*Dh)
    return s.sum(0).reshape(n_kv_head, -1).sum(1)  # (H*Dh,) -> (Hkv, H/Hkv * Dh) -> (Hkv,)


def neuron_scores(w2_weight, col_norm=None) -> torch.Tensor:
    """Score of each feed-forward neuron (F,): sum_i |W2_ij| (or |W2_ij| * col_norm_j, col_norm (F,) being the norms
    of the hidden activations that w2 reads)."""
    s = magnitude_scores(w2_weight) if col_norm is None else wanda_scores(w2_weight, col_norm)  # (C, F)
    return s.sum(0)  # (F,)


def _keep_top(scores, n_keep: int) -> torch.Tensor:
    """Indices of the n_keep highest scores, in increasing index order (so kept units keep their order)."""
    return torch.topk(scores, n_keep).indices.sort().values


def _take(lin: Linear, rows=None, cols=None) -> None:
    """Replace lin's parameters by their rows / columns `rows` / `cols` (new tensors; the old ones are released)."""
    w = lin.weight.detach()
    w = w[rows] if rows is not None else w  # (out', in)
    w = (w[:, cols] if cols is not None else w).contiguous()  # (out', in')
    lin.weight = nn.Parameter(w, requires_grad=lin.weight.requires_grad)
    if lin.bias is not None and rows is not None:
        lin.bias = nn.Parameter(lin.bias.detach()[rows].contiguous(), requires_grad=lin.bias.requires_grad)


def _float_linears(module, names):
    for n in names:
        m = getattr(module, n)
        if m is not None and type(m) is not Linear:
            raise ValueError(f"structured pruning needs float Linear layers, but {n} is a {type(m).__name__}: "
                             f"prune heads/neurons before quantizing or factoring")


@torch.no_grad()
def shrink_attention_(attn: Attention, keep_groups) -> Attention:
    """Keep only the KV groups `keep_groups` (indices into 0..Hkv-1) of `attn`, with their query heads: wq rows and
    wo columns of the kept query heads, wk and wv rows of the kept k/v heads. Sets attn.n_head / n_kv_head."""
    _float_linears(attn, ("wq", "wk", "wv", "wo"))
    H, Hkv, Dh = attn.n_head, attn.n_kv_head, attn.head_dim
    keep = torch.as_tensor(keep_groups, dtype=torch.long).reshape(-1)
    if keep.numel() == 0 or keep.unique().numel() != keep.numel() or int(keep.min()) < 0 or int(keep.max()) >= Hkv:
        raise ValueError(f"keep_groups must be distinct group indices in 0..{Hkv - 1}, at least one; got "
                         f"{keep.tolist()}")
    keep = keep.sort().values
    r = H // Hkv  # query heads per group
    dev = attn.wq.weight.device
    heads_q = (keep[:, None] * r + torch.arange(r)[None, :]).reshape(-1)  # (G', r) -> (G' * r,) query heads kept
    rows_q = (heads_q[:, None] * Dh + torch.arange(Dh)[None, :]).reshape(-1).to(dev)  # (G' * r * Dh,)
    rows_kv = (keep[:, None] * Dh + torch.arange(Dh)[None, :]).reshape(-1).to(dev)  # (G' * Dh,)
    _take(attn.wq, rows=rows_q)
    _take(attn.wk, rows=rows_kv)
    _take(attn.wv, rows=rows_kv)
    _take(attn.wo, cols=rows_q)
    attn.n_head, attn.n_kv_head = int(heads_q.numel()), int(keep.numel())
    return attn


@torch.no_grad()
def shrink_feedforward_(mlp: FeedForward, keep) -> FeedForward:
    """Keep only the hidden neurons `keep` (indices into 0..F-1): rows of w1 (and w3), columns of w2. Sets mlp.d_ff."""
    _float_linears(mlp, ("w1", "w3", "w2"))
    F_ = mlp.w1.weight.shape[0]
    keep = torch.as_tensor(keep, dtype=torch.long).reshape(-1)
    if keep.numel() == 0 or keep.unique().numel() != keep.numel() or int(keep.min()) < 0 or int(keep.max()) >= F_:
        raise ValueError(f"keep must be distinct neuron indices in 0..{F_ - 1}, at least one")
    keep = keep.sort().values.to(mlp.w1.weight.device)
    _take(mlp.w1, rows=keep)
    if mlp.w3 is not None:
        _take(mlp.w3, rows=keep)
    _take(mlp.w2, cols=keep)
    mlp.d_ff = int(keep.numel())
    return mlp


def apply_structure(model, structure: dict) -> None:
    """Give the named modules the recorded shapes with fresh, uninitialised linears (on the current default device:
    `tinyformer.load` calls this on the meta device, then assigns the saved tensors)."""
    cfg = model.config
    if not isinstance(structure, dict):
        raise ValueError(f"structure must be a dict of module name -> shape, got {type(structure).__name__}")
    for name, spec in structure.items():
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"structure names {name!r}, which the model does not have") from None
        ok = isinstance(spec, dict) and all(isinstance(v, int) and v > 0 for v in spec.values())
        if isinstance(m, Attention) and ok and set(spec) == {"n_head", "n_kv_head"} and \
                spec["n_head"] % spec["n_kv_head"] == 0:
            H, Hkv, Dh, C = spec["n_head"], spec["n_kv_head"], m.head_dim, cfg.d_model
            bias = m.wq.bias is not None
            m.wq, m.wk, m.wv = Linear(C, H * Dh, bias), Linear(C, Hkv * Dh, bias), Linear(C, Hkv * Dh, bias)
            m.wo = Linear(H * Dh, C, m.wo.bias is not None)
            m.n_head, m.n_kv_head = H, Hkv
        elif isinstance(m, FeedForward) and ok and set(spec) == {"d_ff"}:
            bias = m.w1.bias is not None
            m.w1 = Linear(cfg.d_model, spec["d_ff"], bias)
            m.w3 = Linear(cfg.d_model, spec["d_ff"], bias) if m.w3 is not None else None
            m.w2 = Linear(spec["d_ff"], cfg.d_model, m.w2.bias is not None)
            m.d_ff = spec["d_ff"]
        else:
            raise ValueError(f"structure[{name!r}] = {spec!r} does not fit a {type(m).__name__} (expected "
                             f"{{'n_head', 'n_kv_head'}} for attention, {{'d_ff'}} for a feed-forward)")


# ----------------------------------------------------------------------------------------------------------------------
# the verbs
def _block_linears(model) -> list[tuple[str, Linear]]:
    """(full name, Linear) of the float linears inside the transformer blocks, in order."""
    names = {id(m): n for n, m in model.named_modules()}
    return [(f"{names[id(b)]}.{n}", lin) for s in _calib.stacks(model) for b in s.blocks for n, lin in
            _calib.linears(b)]


def layer_sparsity(model) -> dict[str, float]:
    """{block linear name: share of its weight entries that are exactly zero}."""
    return {n: round(float((lin.weight == 0).float().mean()), 6) for n, lin in _block_linears(model)}


def _check_model(model):
    if not hasattr(model, "config") or not hasattr(model, "named_modules"):
        raise TypeError(f"model must be a tinyformer model, got {type(model).__name__}")


def _check_args(sparsity, method, pattern):
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    kind, nm = parse_pattern(pattern)
    _check_sparsity(sparsity)
    if kind == "nm" and not math.isclose(sparsity, 1 - nm[0] / nm[1]):
        raise ValueError(f"pattern {pattern!r} prunes {nm[1] - nm[0]} of every {nm[1]} weights: sparsity must be "
                         f"{1 - nm[0] / nm[1]:g}, got {sparsity!r}")
    return kind, nm


def _mask(scores, kind, nm, sparsity, per_row):
    return nm_mask(scores, *nm) if kind == "nm" else unstructured_mask(scores, sparsity, per_row)


@torch.no_grad()
def _prune_block_structured(block, kind, sparsity, stats=None) -> int:
    """Remove the lowest-scoring head groups or neurons of every attention / feed-forward module in `block`; returns
    how many units went."""
    names = {id(m): n for n, m in block.named_modules()}
    removed = 0
    for m in list(block.modules()):
        col_norm = None
        if kind == "heads" and isinstance(m, Attention):
            if stats is not None:
                col_norm = _seen(stats, f"{names[id(m)]}.wo").col_norm
            _float_linears(m, ("wo",))
            scores = head_scores(m.wo.weight, m.n_head, m.n_kv_head, col_norm)  # (Hkv,)
            n_keep = max(1, m.n_kv_head - _n_pruned(sparsity, m.n_kv_head))
            if n_keep < m.n_kv_head:
                removed += m.n_kv_head - n_keep
                shrink_attention_(m, _keep_top(scores, n_keep))
        elif kind == "neurons" and isinstance(m, FeedForward):
            if stats is not None:
                col_norm = _seen(stats, f"{names[id(m)]}.w2").col_norm
            _float_linears(m, ("w2",))
            scores = neuron_scores(m.w2.weight, col_norm)  # (F,)
            n = scores.numel()
            n_keep = max(1, n - _n_pruned(sparsity, n))
            if n_keep < n:
                removed += n - n_keep
                shrink_feedforward_(m, _keep_top(scores, n_keep))
    return removed


def _seen(stats, name):
    """The InputStats of `name`, which must have seen calibration tokens (a zero norm would prune blindly)."""
    s = stats.get(name)
    if s is None or s.n == 0:
        raise RuntimeError(f"calibration saw no inputs of {name}: its Wanda scores would be meaningless")
    return s


@torch.no_grad()
def prune_(model, sparsity: float = 0.5, method: str = "magnitude", pattern: str = "unstructured", calib=None,
           batch_size: int = 8, masks: dict | None = None):
    """Prune `model` in place and return it.

    sparsity: the share of weights (unstructured; of each row for wanda), of KV head groups ("heads") or of
        feed-forward neurons ("neurons") removed in every block linear / attention / feed-forward; for N:M patterns it
        must equal 1 - N/M.
    method: "magnitude" (|W|; no data, `calib` is ignored) or "wanda" (|W| * ||X||; `calib` token ids (N, T) needed).
    pattern: "unstructured", "N:M" (e.g. "2:4"), "heads" or "neurons" (module docstring).
    masks: for unstructured / N:M, an optional dict that receives {linear name: bool keep-mask} (prune_iterative_
        keeps them applied during fine-tuning); weights already zero stay pruned.
    Records model.pruning = {"method", "pattern", "sparsity", "previous": [earlier calls' settings] (when there were
    any), "layers": {block linear name: share of zero weights}}, saved in config.json.
    """
    _check_model(model)
    kind, nm = _check_args(sparsity, method, pattern)
    if method == "wanda":
        calib = _calib.check_calib(model, calib)
    targets = _block_linears(model)
    if not targets and kind not in STRUCTURED:
        raise ValueError("the model has no float Linear layers in its blocks to prune (already quantized?)")
    names = {id(m): n for n, m in model.named_modules()}
    per_row = method == "wanda"
    removed = [0]

    def prune_block(block, stats=None):
        if kind in STRUCTURED:
            removed[0] += _prune_block_structured(block, kind, sparsity, stats)
            return
        prefix = names[id(block)]
        for n, lin in _calib.linears(block):
            if method == "wanda":
                scores = wanda_scores(lin.weight, _seen(stats, n).col_norm)
            else:
                scores = magnitude_scores(lin.weight)
            scores = scores.masked_fill(lin.weight == 0, -1.0)  # zeros stay zero (and are counted in the share)
            mask = _mask(scores, kind, nm, sparsity, per_row)
            lin.weight.mul_(mask)
            if masks is not None:
                masks[f"{prefix}.{n}"] = mask

    if method == "wanda":
        _calib.blockwise(model, calib, prune_block, batch_size=batch_size, hessian=False)
    else:
        for stack in _calib.stacks(model):
            for block in stack.blocks:
                prune_block(block)
    if kind in STRUCTURED:
        if sparsity > 0 and not removed[0]:
            unit = "KV groups (whole groups go, so one KV head means none can)" if kind == "heads" else "neurons"
            raise ValueError(f"sparsity={sparsity} of each layer's {unit} rounds to nothing to remove")
    _record(model, {"method": method, "pattern": pattern, "sparsity": sparsity})
    return model


def _record(model, what: dict) -> None:
    """model.pruning = this call's settings + earlier calls' settings ("previous") + every layer's zero share."""
    earlier = getattr(model, "pruning", None) or {}
    previous = earlier.get("previous", []) + ([{k: v for k, v in earlier.items() if k not in ("previous", "layers")}]
                                              if earlier else [])
    model.pruning = {**what, **({"previous": previous} if previous else {}), "layers": layer_sparsity(model)}


def prune_iterative_(model, data_ids, final_sparsity: float, steps: int, method: str = "magnitude",
                     pattern: str = "unstructured", n_prunes: int = 5, initial_sparsity: float = 0.0,
                     lr: float = 1e-4, batch_size: int = 8, block_size: int | None = None, calib=None,
                     n_calib: int = 16, seed: int = 0, log_every: int = 0):
    """Gradual pruning with fine-tuning (Zhu & Gupta 2017), in place; returns the model.

    `steps` AdamW next-token steps on random windows of the 1-D token ids `data_ids` (a decoder model). Pruning
    events k = 0 .. n_prunes-1 happen before step k * steps // n_prunes and raise the sparsity to
    cubic_sparsity(k + 1, n_prunes, final_sparsity, initial_sparsity), so the last event reaches `final_sparsity`
    and the last steps // n_prunes steps fine-tune at it. Masks only grow (a pruned weight never returns) and are
    re-applied after every optimizer step. An N:M pattern has a fixed sparsity: it prunes once, at step 0, then
    fine-tunes with the mask. Wanda uses `calib` (N, T) if given, else `n_calib` windows of `data_ids`.
    Records model.pruning with the schedule and returns the model in eval mode.
    """
    _check_model(model)
    if model.config.arch != "decoder":
        raise ValueError("prune_iterative_ fine-tunes with a next-token loss: it needs a decoder model")
    kind, nm = _check_args(final_sparsity, method, pattern)
    if kind in STRUCTURED:
        raise ValueError("prune_iterative_ takes 'unstructured' or an N:M pattern; for heads/neurons call prune_ "
                         "and fine-tune afterwards")
    _check_sparsity(initial_sparsity, "initial_sparsity")
    for name, v in (("steps", steps), ("n_prunes", n_prunes), ("batch_size", batch_size), ("n_calib", n_calib)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if kind == "unstructured" and n_prunes > steps:
        raise ValueError(f"n_prunes ({n_prunes}) cannot exceed steps ({steps})")
    block_size = block_size or model.config.max_seq_len
    if not 2 <= block_size <= model.config.max_seq_len:
        raise ValueError(f"block_size must be in 2..max_seq_len={model.config.max_seq_len}, got {block_size}")
    if not isinstance(data_ids, torch.Tensor) or data_ids.is_floating_point():
        raise ValueError("data_ids must be an integer tensor of token ids")
    ids = data_ids.reshape(-1).long()
    if ids.numel() < block_size + 2:
        raise ValueError(f"data_ids must hold more than block_size + 1 = {block_size + 1} tokens, got {ids.numel()}")
    gen = torch.Generator().manual_seed(seed)

    def windows(n):  # (n, block_size + 1) random windows of ids
        starts = torch.randint(0, ids.numel() - block_size - 1, (n,), generator=gen).tolist()
        return torch.stack([ids[s:s + block_size + 1] for s in starts])

    if method == "wanda" and calib is None:
        calib = windows(n_calib)[:, :-1]  # (n_calib, block_size)
    n_events = 1 if kind == "nm" else n_prunes
    at = {k * steps // n_events: k for k in range(n_events)}  # step -> pruning event
    lookup = {id(lin): n for n, lin in _block_linears(model)}
    masks: dict[str, torch.Tensor] = {}
    before = getattr(model, "pruning", None)
    params = [p for p in model.parameters() if p.is_floating_point()]
    device = params[0].device
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    history = []
    model.train()
    try:
        for step in range(steps):
            if step in at:
                k = at[step]
                s = final_sparsity if kind == "nm" else cubic_sparsity(k + 1, n_events, final_sparsity,
                                                                       initial_sparsity)
                prune_(model, s, method, pattern, calib=calib, masks=masks)
                history.append({"step": step, "sparsity": round(s, 6)})
                model.train()
            rows = windows(batch_size).to(device)  # (B, T + 1)
            logits = model(rows[:, :-1])  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), rows[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for _, lin in _block_linears(model):
                    lin.weight.mul_(masks[lookup[id(lin)]])  # pruned weights back to exactly 0
            if log_every and (step % log_every == 0 or step == steps - 1):
                print(f"  prune_iterative_ step {step + 1}/{steps}: loss {float(loss):.4f}", flush=True)
    finally:
        model.eval()
    model.pruning = before  # the events are listed in this call's record, not as earlier calls
    _record(model, {"method": method, "pattern": pattern, "sparsity": final_sparsity, "schedule": "cubic",
                    "steps": steps, "events": history})
    return model
