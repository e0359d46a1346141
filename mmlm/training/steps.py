"""One optimiser step of the loop: the epoch cut into steps of micro-batches, and forward / backward / update.

Accumulation is the trainer's own: the ``grad_accum_steps`` micro-batches of a step are taken first, so a
task that counts its loss items (``Task.num_items``, e.g. label tokens) gets each micro-batch's summed loss
divided by the step's count over every process (divided by the processes, since DDP averages gradients):
every item weighs the same however the step is split (``num_items_in_batch``, as transformers' Trainer).
Other tasks average their micro-batch losses. Gradients are synchronised on the last micro-batch only.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device
from torch import nn

from mmlm.config import ConfigError
from mmlm.data.datasets import guard_workers
from mmlm.training.distributed import all_have, clip_gradients, mean_loss_and_elapsed, optimizer_step, reduce_sum
from mmlm.training.errors import NonFiniteLossError, TrainingError

if TYPE_CHECKING:
    from mmlm.training.trainer import Trainer


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Switch on the model's own gradient checkpointing (our models, transformers, diffusers)."""
    for method in ("enable_gradient_checkpointing", "gradient_checkpointing_enable"):
        if callable(getattr(model, method, None)):
            getattr(model, method)()
            return
    raise ConfigError(
        f"train.gradient_checkpointing: {type(model).__name__} has neither enable_gradient_checkpointing() "
        "nor gradient_checkpointing_enable()"
    )


def autocast(accelerator: Accelerator):
    if accelerator.mixed_precision == "no":
        return contextlib.nullcontext()
    return accelerator.autocast()


def epoch_steps(trainer: Trainer, loader) -> Iterator[list]:
    """The epoch as lists of up to ``grad_accum_steps`` micro-batches (one optimiser step each); streamed
    data ends the epoch on every process as soon as one process runs out."""
    batches = guard_workers(loader, trainer.datasets["train"])  # a dead worker names its file
    if trainer.streamed:
        batches = _while_all_have(trainer.accelerator, batches)
    window = []
    for batch in batches:
        window.append(batch)
        if len(window) == trainer.config.train.grad_accum_steps:
            yield window
            window = []
    if window:
        yield window



def _while_all_have(accelerator: Accelerator, batches) -> Iterator:
    """The batches, moved to the device, while every process still has one (a collective per batch)."""
    iterator = iter(batches)
    while True:
        batch = next(iterator, None)
        if not all_have(accelerator, batch is not None):
            return
        yield send_to_device(batch, accelerator.device)


def train_step(trainer: Trainer, window: list) -> None:
    """Forward and backward every micro-batch of one step (gradients synchronised on the last), then
    clip and step the optimiser. Losses are normalised over the whole step (see the module docstring)."""
    acc, train = trainer.accelerator, trainer.config.train
    n = len(window)
    counts = [trainer.task.num_items(trainer.unwrapped, batch) for batch in window]
    num_items = None
    if all(c is not None for c in counts):
        # gradients add up over the micro-batches and DDP averages them over the processes: so each summed
        # loss is divided by the step's count over all processes / processes (transformers' num_items_in_batch)
        num_items = reduce_sum(acc, sum(counts)) / acc.num_processes
        if num_items == 0:
            raise TrainingError(f"step {trainer.step + 1}: {type(trainer.task).__name__}.num_items is 0 for every "
                                "micro-batch; the loss would cover nothing")
    for j, batch in enumerate(window):
        sync = contextlib.nullcontext() if j == n - 1 else acc.no_sync(trainer.model)
        with sync:
            with autocast(acc):
                if num_items is None:
                    loss = trainer.task.training_loss(trainer.train_model, batch)
                else:
                    loss = trainer.task.training_loss(trainer.train_model, batch, num_items_in_batch=num_items)
            if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
                raise TrainingError(
                    f"{type(trainer.task).__name__}.training_loss must return a scalar tensor, got "
                    f"{getattr(loss, 'shape', type(loss).__name__)}"
                )
            acc.backward(loss if num_items is not None else loss / n)
        # logged: the mean over the micro-batches of a per-micro-batch loss (token path: its share times n)
        logged = loss.detach() if num_items is None else loss.detach() * n
        trainer._loss_sum = logged if trainer._loss_sum is None else trainer._loss_sum + logged
        trainer._micro_batches += 1
        trainer.batch_in_epoch += 1
    trainer._last_loss, trainer.elapsed_s = mean_loss_and_elapsed(acc, trainer._loss_sum, trainer._micro_batches,
                                                                  trainer._clock_start)
    if not math.isfinite(trainer._last_loss):
        raise NonFiniteLossError(
            f"loss is {trainer._last_loss} at step {trainer.step + 1} (epoch {trainer.epoch}); the optimiser did "
            "not step on it. Last good checkpoint: "
            f"{trainer.last_checkpoint or 'none (no checkpoint was written yet)'}"
        )
    if train.max_grad_norm is not None:
        trainer._grad_norm = clip_gradients(acc, trainer.model, trainer.optimizer, train.max_grad_norm)
    optimizer_step(acc, trainer.optimizer)
