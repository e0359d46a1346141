"""One freeze semantics for every part: no gradients, and inference mode (BatchNorm, dropout) for good.

``freeze(module)`` turns gradients off, puts the module in eval mode and keeps it there when a
parent's ``.train()`` is called later (the trainer calls ``model.train()`` every step). It is used
for ``freeze: true`` in the configs and for a ``train.module_lr`` of 0.
"""

from __future__ import annotations

import functools

from torch import nn

_FROZEN = "_mmlm_frozen"


def _train_frozen(module: nn.Module, mode: bool = True) -> nn.Module:
    """A frozen module's ``train``: whatever ``mode`` is asked for, it and its children stay in eval mode."""
    return nn.Module.train(module, False)


def freeze(module: nn.Module) -> nn.Module:
    """Freeze ``module`` in place (no gradients, eval mode that survives ``.train()``); returns it."""
    module.requires_grad_(False)
    object.__setattr__(module, _FROZEN, True)
    # An instance attribute shadows nn.Module.train, so parents' train() (which calls each child's
    # .train) cannot switch it back; a partial, unlike a bound method, survives deepcopy and pickling.
    object.__setattr__(module, "train", functools.partial(_train_frozen, module))
    module.eval()
    return module


def is_frozen(module: nn.Module) -> bool:
    """True for a module passed to :func:`freeze`."""
    return getattr(module, _FROZEN, False)

