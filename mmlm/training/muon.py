"""Muon for the weight matrices and convolution kernels, AdamW for everything else, in one optimizer.

Muon (Jordan et al., 2024) takes SGD momentum and replaces each matrix's update by its nearest semi-orthogonal
matrix (quintic Newton-Schulz iterations: five by default, ``train.muon_ns_steps``), so every direction of the
weight moves at the same rate. The update is scaled by ``0.2 * sqrt(max(rows, cols))`` (Liu et al., 2025, "Muon is
scalable for LLM training"), which gives it AdamW's update RMS: one learning rate and one schedule serve both kinds
of group.

torch's ``torch.optim.Muon`` takes 2-D parameters only; here a convolution kernel ``(out, in, kh, kw)`` is
orthogonalised as the ``(out, in * kh * kw)`` matrix it multiplies with. Embedding tables, output heads and 1-D
parameters get AdamW (:func:`mmlm.training.optim.parameter_groups` decides which group is which).
"""

from __future__ import annotations

import math

import torch

_NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)


def orthogonalize(matrix: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately ``U @ V.T`` for ``matrix = U S V.T``: its singular values pushed towards 1.

    A stack ``(n, rows, cols)`` is orthogonalised matrix by matrix, in one batched product per iteration."""
    a, b, c = _NEWTON_SCHULZ
    x = matrix / (matrix.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    wide = x.size(-2) <= x.size(-1)
    if not wide:
        x = x.mT
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.mT


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the groups marked ``muon: True``, AdamW (decoupled weight decay) on the others.

    Every group takes ``lr`` and ``weight_decay``; Muon groups use ``momentum`` (Nesterov), AdamW groups
    ``betas`` and ``eps``. State is per parameter, so ``state_dict`` and LR schedulers work as for any optimizer.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.95, ns_steps: int = 5):
        if lr <= 0:
            raise ValueError(f"lr: expected > 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum: expected in [0, 1), got {momentum}")
        if ns_steps < 1:
            raise ValueError(f"ns_steps: expected >= 1, got {ns_steps}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, momentum=momentum,
                        ns_steps=ns_steps, muon=False)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["muon"]:
                flat = [tuple(p.shape) for p in group["params"] if p.ndim < 2]
                if flat:
                    raise ValueError(f"Muon group {group.get('name', '')!r} holds parameters of shape {flat}; "
                                     "Muon needs matrices or kernels (2-D or more)")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if group["muon"]:
                self._muon_step(group, params)
            else:
                self._adamw_step(group, params)
        return loss

    def _muon_step(self, group: dict, params: list[torch.Tensor]) -> None:
        lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
        grads = [p.grad for p in params]
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        buffers = [self.state[p]["momentum_buffer"] for p in params]
        torch._foreach_lerp_(buffers, grads, 1 - momentum)
        updates = torch._foreach_lerp(grads, buffers, momentum)  # Nesterov
        by_shape: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            by_shape.setdefault((p.shape[0], p[0].numel()), []).append(i)
        for (rows, cols), indices in by_shape.items():  # a step is many small matrices: batch those alike
            stacked = torch.stack([updates[i].reshape(rows, cols) for i in indices])
            orthogonal = orthogonalize(stacked, group["ns_steps"]).unbind()
            alike = [params[i] for i in indices]
            if decay:
                torch._foreach_mul_(alike, 1 - lr * decay)
            torch._foreach_add_(alike, [u.view_as(p) for u, p in zip(orthogonal, alike)],
                                alpha=-lr * 0.2 * math.sqrt(max(rows, cols)))

    def _adamw_step(self, group: dict, params: list[torch.Tensor]) -> None:
        beta1, beta2 = group["betas"]
        grads = [p.grad for p in params]
        for p in params:
            if "step" not in self.state[p]:
                self.state[p].update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        states = [self.state[p] for p in params]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        for s in states:  # per parameter: one without a gradient on some step keeps its own count
            s["step"] += 1
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
        denominators = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denominators, [math.sqrt(1 - beta2 ** s["step"]) for s in states])
        torch._foreach_add_(denominators, group["eps"])
        torch._foreach_addcdiv_(params, exp_avgs, denominators,
                                [-group["lr"] / (1 - beta1 ** s["step"]) for s in states])
