"""Exponential moving average of the trainable weights.

Only parameters that train are averaged (frozen ones never change; buffers are taken from the
live model). The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, as
in timm and diffusers, so short runs are not dominated by the random initialisation.
Shadow weights are kept in fp32 on the parameters' device and saved as safetensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


class EMA:
    """Shadow copy of ``model``'s trainable parameters, updated after every optimiser step."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay: expected a value in (0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self._params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.shadow = {name: p.detach().float().clone() for name, p in self._params.items()}

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self) -> None:
        """Move the shadow towards the live weights (call after ``optimizer.step()``)."""
        decay = self.current_decay()
        shadow = list(self.shadow.values())
        live = [p.detach().float() for p in self._params.values()]
        torch._foreach_lerp_(shadow, live, 1.0 - decay)
        self.num_updates += 1

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Temporarily put the EMA weights into the model (for evaluation and saving)."""
        backup = {name: p.detach().clone() for name, p in self._params.items()}
        self.copy_to_model()
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self._params.items():
                    p.copy_(backup[name])

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for name, p in self._params.items():
            p.copy_(self.shadow[name].to(p.dtype))

    def save(self, path: Path) -> None:
        save_file({k: v.contiguous() for k, v in self.shadow.items()}, str(path))

    @torch.no_grad()
    def load(self, path: Path, num_updates: int) -> None:
        tensors = load_file(str(path))
        missing = sorted(set(self.shadow) - set(tensors))
        extra = sorted(set(tensors) - set(self.shadow))
        if missing or extra:
            raise ValueError(f"{path}: EMA weights do not match the model "
                             f"(missing {missing[:5]}, unexpected {extra[:5]})")
        for name, value in tensors.items():
            self.shadow[name].copy_(value)
        self.num_updates = int(num_updates)
