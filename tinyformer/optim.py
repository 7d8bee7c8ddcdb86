"""Muon: momentum orthogonalised by a Newton-Schulz iteration, for a network's hidden weight matrices, with AdamW for
every other parameter (embeddings, output head, norm gains, biases), in one torch optimizer.

For a matrix W with gradient G, Muon keeps a momentum buffer M <- mu M + (1 - mu) G, takes the Nesterov step
U = (1 - mu) G + mu M, and moves W by -lr * sqrt(max(1, rows / cols)) * O(U), where O(U) = P Q^T is the orthogonal
polar factor of U = P S Q^T: every singular value of the update set to (about) one. O(U) comes from five steps of a
quintic Newton-Schulz iteration X <- a X + b (X X^T) X + c (X X^T)^2 X from X = U / ||U||_F, whose coefficients
trade exact convergence for speed: the singular values end in roughly [0.7, 1.2], not at 1.

References: Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks" (the blog post, and
KellerJordan/modded-nanogpt's train_gpt.py, whose quintic coefficients and shape scale these are; the `use_muon`
parameter groups follow KellerJordan/Muon's MuonWithAuxAdam); Bernstein & Newhouse 2024, "Old optimizer, new norm"
(steepest descent under the spectral norm); Higham 2008, "Functions of Matrices", ch. 8 (Newton-Schulz iterations for
the polar decomposition); Loshchilov & Hutter 2017 (AdamW).
"""
from __future__ import annotations

import math

import torch

from tinyformer.kernels.device import cpu_has_bf16

NS_QUINTIC = (3.4445, -4.7750, 2.0315)  # Muon's: the steepest slope at zero that five steps keep stable
NS_CUBIC = (1.5, -0.5, 0.0)  # the classic Newton-Schulz step: converges to the polar factor itself


def newton_schulz(G: torch.Tensor, steps: int = 5, coefficients=NS_QUINTIC, dtype=None) -> torch.Tensor:
    """The orthogonal polar factor of each matrix of G (..., m, n), approximately (exactly in the limit for
    NS_CUBIC). Computed in `dtype`, by default bf16 where the hardware multiplies it (CUDA, CPUs with AVX512-BF16 or
    AMX: about twice fp32's speed on the speedrun's 128-wide matrices), else fp32; returned in G's dtype."""
    a, b, c = coefficients
    X = G.to(dtype or (torch.bfloat16 if G.is_cuda or cpu_has_bf16() else torch.float32))
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT  # (..., n, m): the Gram matrix X X^T is then the smaller one
    X = X.reshape(-1, *X.shape[-2:])  # (..., k, l) -> (batch, k, l) with k = min(m, n), for baddbmm
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # Frobenius >= spectral norm: singular values <= 1
    for _ in range(steps):
        A = X @ X.mT  # (batch, k, k)
        # b A + c A A, then a X + (..) X, each one fused product-and-sum: no separate scalings and sums, and in bf16
        # each result rounded once (timings and errors in docs/speedrun.md)
        X = torch.baddbmm(X, torch.baddbmm(A, A, A, beta=b, alpha=c), X, beta=a)
    X = X.reshape(G.shape[:-2] + X.shape[-2:])  # (batch, k, l) -> (..., k, l)
    return (X.mT if tall else X).to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for the parameter groups with `use_muon=True` (2-D matrices only), AdamW for the others, in one optimizer:
    one step, one state dict, one GradScaler. Muon groups take lr, momentum (0.95), nesterov (True), ns_steps (5),
    ns_dtype (None: newton_schulz's default; or "float32", "bfloat16"), weight_decay (0); AdamW groups take lr, betas, eps (1e-8), weight_decay. Matrices of one shape are orthogonalised
    together, as one batched iteration."""

    def __init__(self, param_groups):
        groups = []
        for group in param_groups:
            group = dict(group)
            if "use_muon" not in group:
                raise ValueError("Muon: every parameter group needs use_muon=True or False")
            if group["use_muon"]:
                group = {"lr": 0.02, "momentum": 0.95, "nesterov": True, "ns_steps": 5, "ns_dtype": None,
                         "weight_decay": 0.0, **group}
                if group["ns_dtype"] not in (None, "float32", "bfloat16"):
                    raise ValueError(f"Muon: ns_dtype must be None, 'float32' or 'bfloat16', got {group['ns_dtype']!r}")
                shapes = [tuple(p.shape) for p in group["params"] if p.dim() != 2]
                if shapes:
                    raise ValueError(f"Muon: use_muon groups take 2-D matrices only, got shapes {shapes}")
            else:
                group = {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.0, **group}
            groups.append(group)
        super().__init__(groups, {})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (self._muon_step if group["use_muon"] else self._adamw_step)(group)
        return loss

    def _muon_step(self, group):
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        by_shape = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - mu)
            update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
            by_shape.setdefault(tuple(p.shape), []).append((p, update))
        for (rows, cols), items in by_shape.items():
            name = group.get("ns_dtype")  # a name, not a torch.dtype: checkpoints load it with weights_only
            ortho = newton_schulz(torch.stack([u for _, u in items]), group["ns_steps"],
                                  dtype=getattr(torch, name) if name else None)  # (k, rows, cols)
            scale = math.sqrt(max(1.0, rows / cols))
            for (p, _), o in zip(items, ortho):
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(o, alpha=-lr * scale)

    def _adamw_step(self, group):
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        (beta1, beta2), lr, wd, eps = group["betas"], group["lr"], group["weight_decay"], group["eps"]
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            state["step"] += 1
        states = [self.state[p] for p in params]
        grads = [p.grad for p in params]
        m, v = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        torch._foreach_lerp_(m, grads, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, 1 - beta2)
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, [math.sqrt(1 - beta2 ** s["step"]) for s in states])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, m, denom, [-lr / (1 - beta1 ** s["step"]) for s in states])
