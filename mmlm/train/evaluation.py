"""Evaluation during training: on the main process, with the others waiting for its result, and the best model.

The task's ``evaluate`` runs on the main process only, on the unwrapped model (EMA weights when
enabled), under ``no_grad`` and with forked RNG so it never shifts the training stream. Its result
is broadcast, so every process returns the same metrics; if it raises, every process raises
(evaluating on rank 0 while the others wait is the classic multi-GPU hang).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm

from mmlm.config import ConfigError
from mmlm.train import checkpoint as ckpt
from mmlm.train.distributed import run_on_main
from mmlm.train.errors import TrainingError

if TYPE_CHECKING:
    from mmlm.train.trainer import Trainer


@contextlib.contextmanager
def preserved_rng(device: torch.device) -> Iterator[None]:
    """Run a block without moving the python, numpy and torch RNG streams of training."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def evaluate(trainer: Trainer, split: str) -> dict[str, float]:
    """Metrics of the current model on ``split``, keyed ``"<split>/<name>"``, the same on every process."""
    if split not in trainer.datasets:
        raise ValueError(f"no '{split}' split; the task built {sorted(trainer.datasets)}")
    result: dict[str, float] | str = {}
    failure: Exception | None = None
    if trainer.is_main:
        try:
            result = _evaluate_here(trainer, split)
        except Exception as err:  # noqa: BLE001 - re-raised below, after telling the other processes
            failure = err
            result = f"{type(err).__name__}: {err}"
    if trainer.accelerator.num_processes > 1:
        result = broadcast_object_list([result])[0]
    if isinstance(result, str):
        if failure is not None:
            raise failure
        raise TrainingError(f"evaluation of '{split}' failed on the main process: {result}")
    return result


def _evaluate_here(trainer: Trainer, split: str) -> dict[str, float]:
    task = trainer.task
    out_dir = trainer.output_dir / "eval" / f"{split}_{ckpt.checkpoint_name(trainer.step)}"
    out_dir.mkdir(parents=True, exist_ok=True)
    model = trainer.unwrapped
    was_training = model.training
    ema = trainer.ema.applied() if trainer.ema is not None else contextlib.nullcontext()
    try:
        with preserved_rng(trainer.accelerator.device), ema, torch.no_grad():
            model.eval()
            raw = task.evaluate(model, trainer.datasets[split], out_dir, split)
    finally:
        model.train(was_training)
    if not isinstance(raw, dict):
        raise TypeError(f"{type(task).__name__}.evaluate must return dict[str, float], got {type(raw).__name__}")
    metrics = {}
    for key, value in raw.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{type(task).__name__}.evaluate: metric '{key}' must be a number, got {value!r}")
        name = key if key.startswith(f"{split}/") else f"{split}/{key}"
        metrics[name] = float(value)
    return metrics


def evaluate_and_log(trainer: Trainer, split: str, track_best: bool = True) -> dict[str, float]:
    """Evaluate ``split``, write the metrics to the log and the console, and keep the best model on "val"."""
    metrics = evaluate(trainer, split)
    if trainer.metrics_log is not None:
        trainer.metrics_log.write({"step": trainer.step, **metrics})
    if trainer.is_main:
        tqdm.write(f"step {trainer.step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    if track_best and split == "val":
        keep_best(trainer, metrics)
    return metrics


def is_better(value: float, best: float | None, metric: str) -> bool:
    """Higher is better, unless the metric's name ends in "loss"."""
    if best is None:
        return True
    return value < best if metric.endswith("loss") else value > best


def keep_best(trainer: Trainer, metrics: dict[str, float]) -> None:
    """Save the model to ``<output_dir>/best`` when ``train.best_metric`` improved."""
    name = trainer.config.train.best_metric
    if name is None:
        return
    if name not in metrics:
        raise ConfigError(f"train.best_metric={name!r} is not among the evaluation metrics {sorted(metrics)}")
    if not is_better(metrics[name], trainer.best_value, name):
        return
    trainer.best_value, trainer.best_step = metrics[name], trainer.step
    record = {"metric": name, "value": trainer.best_value, "step": trainer.step}

    def save() -> None:
        ckpt.save_model(trainer.task, trainer.unwrapped, trainer.ema, trainer.output_dir / "best", record)

    run_on_main(trainer.accelerator, "saving the best model", save, trainer.step)
