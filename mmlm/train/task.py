"""What differs per task: the model, the data, ``batch -> loss`` and the evaluation.

The :class:`~mmlm.train.trainer.Trainer` owns everything else (devices, precision,
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
    every process except :meth:`evaluate`, which the trainer calls on the main process only.
    """

    name: str = "task"

    def __init__(self, config: RunConfig):
        self.config = config

    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """Build the model. Called once per process, before :meth:`build_datasets`."""

    @abc.abstractmethod
    def build_datasets(self, model: nn.Module) -> dict[str, Dataset]:
        """Return the splits: ``"train"`` is required, ``"val"`` and ``"test"`` are optional.

        ``model`` is given so preprocessing can follow it (image size, tokenizer).
        """

    @abc.abstractmethod
    def collate(self, samples: list) -> Any:
        """Turn a list of dataset items into one batch. Must be picklable (DataLoader workers)."""

    @abc.abstractmethod
    def training_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The scalar loss of one batch.

        ``model`` may be the accelerate-wrapped one (DDP): call it, do not reach into it.
        Randomness (noise, timesteps, dropout) must come from torch's global RNG so that
        resumed runs replay it exactly.
        """

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, dataset: Dataset, out_dir: Path, split: str) -> dict[str, float]:
        """Metrics of the unwrapped ``model`` on ``dataset``; write qualitative samples under ``out_dir``.

        Runs on the main process only, under ``torch.no_grad()`` with the model in eval mode
        (EMA weights when enabled). Keys are plain names ("accuracy"); the trainer prefixes the split.
        """

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
