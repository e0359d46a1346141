"""What differs per task: the model, the data, ``batch -> loss`` and the evaluation.

The :class:`~mmlm.training.trainer.Trainer` owns everything else (devices, precision,
accumulation, optimiser, schedule, EMA, logging, checkpoints). A feature added there works
for every task at once.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from mmlm.config import RunConfig


class Task(abc.ABC):
    """One kind of training (captioning, classification, diffusion, ...).

    Subclasses set ``name`` and implement the five abstract methods. Every method runs on
    every process except :meth:`evaluate` and :meth:`score`, which the trainer calls on the main process
    only. A task that implements :meth:`predict` and :meth:`score` is evaluated by every process on its
    part of the split (``evaluate`` then serves single-process callers).
    """

    name: str = "task"

    def __init__(self, config: RunConfig):
        self.config = config

    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """Build the model. Called once per process, before :meth:`build_datasets`."""

    def prepare_once(self, model: nn.Module) -> None:
        """One-off preparation of the built model (e.g. a VAE pre-stage). The trainer runs it on the main
        process only, with the model on the accelerator's device, then copies the model's parameters and
        buffers to the other processes, which wait meanwhile. Default: nothing to prepare."""

    @abc.abstractmethod
    def build_datasets(self, model: nn.Module) -> dict[str, Dataset]:
        """Return the splits: ``"train"`` is required, ``"val"`` and ``"test"`` are optional.

        ``model`` is given so preprocessing can follow it (image size, tokenizer).
        """

    @abc.abstractmethod
    def collate(self, samples: list) -> Any:
        """Turn a list of dataset items into one batch. Must be picklable (DataLoader workers)."""

    def num_items(self, model: nn.Module, batch: Any) -> int | None:
        """How many items (e.g. label tokens) the loss of ``batch`` sums over; None: a plain mean loss.

        When every micro-batch of a step has a count, the trainer adds them up over the step's micro-batches
        and the processes, and calls ``training_loss(model, batch, num_items_in_batch=n)``: the task returns
        the summed loss divided by ``n`` (the trainer picks ``n`` so that every item weighs the same however
        the step is split). ``model`` is the unwrapped model; the task may cache work in ``batch``.
        """
        return None

    @abc.abstractmethod
    def training_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The scalar loss of one batch (see :meth:`num_items` for the token-normalised variant).

        ``model`` may be the accelerate-wrapped one (DDP): call it, do not reach into it.
        Randomness (noise, timesteps, dropout) must come from torch's global RNG, or from generators
        seeded by the sample (as diffusion's), so that resumed runs replay it exactly.
        """

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, dataset: Dataset, out_dir: Path, split: str) -> dict[str, float]:
        """Metrics of the unwrapped ``model`` on ``dataset``; write qualitative samples under ``out_dir``.

        Runs on the main process only, under ``torch.no_grad()`` with the model in eval mode
        (EMA weights when enabled). Keys are plain names ("accuracy"); the trainer prefixes the split.
        """

    def predict(self, model: nn.Module, dataset: Dataset, split: str) -> list[dict] | None:
        """Per-sample results (picklable rows, in ``dataset`` order) of the unwrapped ``model`` on a part of a
        split, for :meth:`score`; None (the default): the task evaluates on the main process only."""
        return None

    def score(self, rows: list[dict], dataset: Dataset, out_dir: Path, split: str) -> dict[str, float]:
        """Metrics from the rows :meth:`predict` gave on every part, in split order (main process only)."""
        raise NotImplementedError(f"{type(self).__name__} implements predict() but not score()")

    def freeze_part(self, model: nn.Module, name: str, part: nn.Module) -> None:
        """Freeze a part whose ``train.module_lr`` is 0: no gradients (default); tasks that know their
        models may also keep it in eval mode for good (dropout off, norms' statistics fixed)."""
        part.requires_grad_(False)

    def fsdp_wrap_classes(self, model: nn.Module) -> list[str]:
        """Module class names FSDP shards as units: the transformers ``_no_split_modules`` of every submodule
        (the LM's decoder layer) and the class of the blocks of timm towers (``.blocks``)."""
        names: list[str] = []
        for module in model.modules():
            names += [n for n in getattr(module, "_no_split_modules", None) or [] if n not in names]
            blocks = getattr(module, "blocks", None)
            if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks):
                name = type(blocks[0]).__name__
                if name not in names:
                    names.append(name)
        return names

    def save_model(self, model: nn.Module, directory: Path) -> None:
        """Write the final model as a folder ``from_pretrained`` reads (default: ``save_pretrained``)."""
        if not hasattr(model, "save_pretrained"):
            raise TypeError(
                f"{type(model).__name__} has no save_pretrained(); override {type(self).__name__}.save_model"
            )
        model.save_pretrained(directory)

    def trainable_groups(self, model: nn.Module) -> dict[str, nn.Module]:
        """Named parts of the model that ``train.module_lr`` addresses (LR per part, 0 freezes).

        Default: ``model.trainable_groups()`` when the model has it, else ``{"model": model}``.
        """
        if hasattr(model, "trainable_groups"):
            return dict(model.trainable_groups())
        return {"model": model}
