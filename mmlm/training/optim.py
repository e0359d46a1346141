"""AdamW (or Muon with AdamW, ``train.optimizer``) with per-part learning rates, and the warmup + cosine/constant
schedule.

Parameter groups: every named part from ``Task.trainable_groups`` gets ``train.module_lr[name]``
(default ``train.lr``; 0 freezes the part: ``requires_grad=False`` and left out of the optimiser).
Trainable parameters outside every named part form the group ``"other"``. Within a part, 1-D
parameters (norms, biases), position embeddings and anything the module lists in timm's
``no_weight_decay()`` get no weight decay. With ``train.optimizer: muon`` the other matrices and kernels of a
part form its Muon group, except embedding tables and output heads (``get_output_embeddings()``), which stay AdamW.

Schedule: ``lr = base_lr * warmup(step) * decay(progress)``. ``progress`` in [0, 1] is the
larger of the step fraction (after warmup, when the total number of steps is known) and the
elapsed fraction of ``train.max_minutes`` (when a time budget is set). Wall-clock runs
therefore decay on elapsed time: no step-time estimate to get wrong, at the price of
bitwise-reproducible LR (only step-based runs resume bitwise).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

import torch
from torch import nn

from mmlm.config import ConfigError, TrainConfig
from mmlm.training.muon import MuonAdamW

OTHER_GROUP = "other"
_POSITION_EMBEDDING = re.compile(r"(^|[._])(pos_embed\w*|pos_emb\w*|position_embeddings?|wpe)($|[._])")


def no_decay_names(module: nn.Module) -> set[str]:
    """Names of the parameters of ``module`` that should not be weight-decayed."""
    names = set()
    listed = set()
    for sub_name, sub in module.named_modules():
        if hasattr(sub, "no_weight_decay") and callable(sub.no_weight_decay):
            prefix = f"{sub_name}." if sub_name else ""
            listed.update(prefix + n for n in sub.no_weight_decay())
    for name, param in module.named_parameters():
        if param.ndim <= 1 or name in listed or _POSITION_EMBEDDING.search(name):
            names.add(name)
    return names


def parameter_groups(
    model: nn.Module, groups: dict[str, nn.Module], train: TrainConfig,
    freeze: Callable[[str, nn.Module], None] | None = None,
) -> list[dict[str, Any]]:
    """AdamW param groups for ``model``, freezing the parts whose ``module_lr`` is 0.

    ``freeze(name, part)`` freezes a part (the trainer passes the task's ``freeze_part``, which may also keep
    it in eval mode); by default its parameters stop requiring gradients. A frozen ``"other"`` (the
    parameters outside every named part) only stops requiring gradients. Each group dict carries ``name``
    (the part) and ``decay`` (bool) next to the torch keys.
    """
    unknown = sorted(set(train.module_lr) - set(groups) - {OTHER_GROUP})
    if unknown:
        raise ConfigError(
            f"train.module_lr: unknown part(s) {unknown}; the task's parts are "
            f"{sorted(groups) + [OTHER_GROUP]}"
        )
    for name, lr in train.module_lr.items():
        if lr < 0:
            raise ConfigError(f"train.module_lr.{name}: expected >= 0, got {lr}")
    param_ids_in_model = {id(p) for p in model.parameters()}
    seen: set[int] = set()
    result = []
    not_muon = _embedding_and_head_ids(model) if train.optimizer == "muon" else set()

    def add(name: str, module_params: list[tuple[str, nn.Parameter]], skip_decay: set[str],
            module: nn.Module | None = None) -> None:
        lr = train.module_lr.get(name, train.lr)
        if lr == 0:
            if module is not None and freeze is not None:
                freeze(name, module)
            for _, p in module_params:
                p.requires_grad_(False)
            return
        decay = [p for n, p in module_params if p.requires_grad and n not in skip_decay]
        plain = [p for n, p in module_params if p.requires_grad and n in skip_decay]
        if train.optimizer == "muon":
            matrices = [p for p in decay if p.ndim >= 2 and id(p) not in not_muon]
            decay = [p for p in decay if p.ndim < 2 or id(p) in not_muon]
            if matrices:
                result.append({"params": matrices, "lr": lr, "weight_decay": train.weight_decay, "name": name,
                               "decay": True, "muon": True})
        if decay:
            result.append({"params": decay, "lr": lr, "weight_decay": train.weight_decay, "name": name, "decay": True})
        if plain:
            result.append({"params": plain, "lr": lr, "weight_decay": 0.0, "name": name, "decay": False})

    for name, module in groups.items():
        if not isinstance(module, nn.Module):
            raise TypeError(f"trainable_groups()['{name}'] must be an nn.Module, got {type(module).__name__}")
        params = []
        for pname, p in module.named_parameters():
            if id(p) in seen:  # tied/shared weights: the first part that lists them owns them
                continue
            if id(p) not in param_ids_in_model:
                raise ValueError(f"trainable_groups()['{name}'] holds parameter '{pname}' that is not in the model")
            seen.add(id(p))
            params.append((pname, p))
        add(name, params, no_decay_names(module), module)

    rest = [(n, p) for n, p in model.named_parameters() if id(p) not in seen]
    if rest:
        add(OTHER_GROUP, rest, no_decay_names(model))
    if not result:
        raise ConfigError("nothing to train: every parameter is frozen (train.module_lr all 0 or requires_grad False)")
    return result


def _embedding_and_head_ids(model: nn.Module) -> set[int]:
    """Parameters Muon should not take: embedding tables and output heads (Jordan et al. keep them on AdamW)."""
    ids = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            ids.add(id(module.weight))
        head = module.get_output_embeddings() if callable(getattr(module, "get_output_embeddings", None)) else None
        if isinstance(head, nn.Module):
            ids.update(id(p) for p in head.parameters())
    return ids


def build_optimizer(model: nn.Module, groups: dict[str, nn.Module], train: TrainConfig,
                    freeze: Callable[[str, nn.Module], None] | None = None) -> torch.optim.Optimizer:
    """AdamW over :func:`parameter_groups`, with torch's fused kernel where every parameter allows it
    (``train.fused_adamw``): on CPU the default is a per-tensor loop (the generator's step: 1.08x steps/s fused).
    ``train.optimizer: muon`` gives :class:`~mmlm.training.muon.MuonAdamW` over the same groups."""
    param_groups = parameter_groups(model, groups, train, freeze)
    if train.optimizer == "muon":
        return MuonAdamW(param_groups, lr=train.lr, betas=tuple(train.betas), momentum=train.muon_momentum,
                         ns_steps=train.muon_ns_steps)
    fused = train.fused_adamw and all(_fusable(p) for group in param_groups for p in group["params"])
    return torch.optim.AdamW(param_groups, lr=train.lr, betas=tuple(train.betas), fused=fused or None)


def _fusable(param: torch.Tensor) -> bool:
    return param.device.type in ("cpu", "cuda") and param.dtype in (torch.float32, torch.float16, torch.bfloat16)


def lr_factor(step: int, warmup_steps: int, progress: float, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the base LR for update number ``step`` (0-based) at ``progress`` in [0, 1]."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if schedule == "constant":
        return warm
    if schedule != "cosine":
        raise ConfigError(f"train.schedule: expected 'cosine' or 'constant', got {schedule!r}")
    progress = min(1.0, max(0.0, progress))
    return warm * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


class WarmupDecaySchedule(torch.optim.lr_scheduler.LRScheduler):
    """Linear warmup, then cosine decay to ``min_lr_ratio`` (or constant), over steps and/or time.

    Call :meth:`set_time_fraction` before :meth:`step` in wall-clock runs. Only the running
    state is checkpointed; the shape (warmup, total steps, ...) comes from the config, so a
    resumed run may extend ``max_steps``.
    """

    _STATE_KEYS = ("last_epoch", "_step_count", "_last_lr", "time_fraction")

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        warmup_steps: int,
        schedule: str,
        min_lr_ratio: float,
        total_steps: int | None,
    ):
        if warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps: expected >= 0, got {warmup_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio: expected in [0, 1], got {min_lr_ratio}")
        self.warmup_steps = warmup_steps
        self.schedule = schedule
        self.min_lr_ratio = min_lr_ratio
        self.total_steps = total_steps
        self.time_fraction = 0.0
        lr_factor(0, warmup_steps, 0.0, schedule, min_lr_ratio)  # validates ``schedule``
        super().__init__(optimizer)

    def set_time_fraction(self, fraction: float) -> None:
        """Elapsed fraction of the wall-clock budget (0 when there is none)."""
        self.time_fraction = float(fraction)

    def progress(self, step: int) -> float:
        by_steps = 0.0
        if self.total_steps is not None and self.total_steps > self.warmup_steps:
            by_steps = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return max(by_steps, self.time_fraction)

    def factor(self, step: int) -> float:
        return lr_factor(step, self.warmup_steps, self.progress(step), self.schedule, self.min_lr_ratio)

    def get_lr(self) -> list[float]:
        step = max(self.last_epoch, 0)
        return [base * self.factor(step) for base in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        return {k: self.__dict__[k] for k in self._STATE_KEYS}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.__dict__.update({k: state_dict[k] for k in self._STATE_KEYS if k in state_dict})
