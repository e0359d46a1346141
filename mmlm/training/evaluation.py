"""Evaluation during training: every process on its part of the split (or the main one alone), and the best model.

A task with ``predict`` / ``score`` is evaluated by all processes: each predicts a contiguous part
of the split (``split_between_processes`` over its indices; streamed splits: every ``W``-th sample),
the rows are gathered in split order (``gather_object``) and the main process scores them, so the
metrics equal a 1-process evaluation. Other tasks run ``evaluate`` on the main process only. Either
way the model is the unwrapped one (EMA weights when enabled; under FSDP a full copy gathered from
the shards), under ``no_grad`` and with forked RNG so evaluation never shifts the training stream.
The result is broadcast, so every process returns the same metrics; if it raises anywhere, every
process raises (evaluating on rank 0 while the others wait is the classic multi-GPU hang).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from accelerate.utils import broadcast_object_list, gather_object
from torch.utils.data import IterableDataset, Subset
from tqdm.auto import tqdm

from mmlm.config import ConfigError
from mmlm.training import checkpoint as ckpt
from mmlm.training.distributed import full_state_dict, run_on_main
from mmlm.training.errors import TrainingError
from mmlm.training.task import Task

if TYPE_CHECKING:
    from mmlm.training.trainer import Trainer


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


@contextlib.contextmanager
def evaluation_model(trainer: Trainer):
    """The model to evaluate or save: the unwrapped one with the EMA weights applied; under FSDP a full
    copy gathered from the shards, on the main process and, when the task evaluates in parts, on every
    process (None on the others). Every process enters."""
    ema = trainer.ema.applied() if trainer.ema is not None else contextlib.nullcontext()
    with ema:
        if not trainer.fsdp:
            yield trainer.unwrapped
            return
        state = full_state_dict(trainer.model, everywhere=trainer._replica_everywhere)  # a collective
        if trainer._replica is not None:
            trainer._replica.load_state_dict(state)
        yield trainer._replica


def evaluates_in_parts(task: Task) -> bool:
    """Whether every process evaluates a part of a split (the task has ``predict`` / ``score``)."""
    return type(task).predict is not Task.predict


def evaluate(trainer: Trainer, split: str) -> dict[str, float]:
    """Metrics of the current model on ``split``, keyed ``"<split>/<name>"``, the same on every process."""
    if split not in trainer.datasets:
        raise ValueError(f"no '{split}' split; the task built {sorted(trainer.datasets)}")
    distributed = evaluates_in_parts(trainer.task)
    result: dict[str, float] | str = {}
    failure: Exception | None = None
    rows: list[dict] | None = None
    with trainer.evaluation_model() as model:  # a collective under FSDP: every process enters
        if distributed:
            try:
                rows = _predict_part(trainer, model, split)
            except Exception as err:  # noqa: BLE001 - re-raised below, after telling the other processes
                failure = err
            if _any_failed(trainer, failure):
                result = f"{type(failure).__name__}: {failure}" if failure else "on another process"
            elif trainer.accelerator.num_processes > 1:
                rows = [row for _, row in sorted(gather_object(rows))]
            else:
                rows = [row for _, row in sorted(rows)]
        if trainer.is_main and not isinstance(result, str):
            try:
                result = _evaluate_here(trainer, model, split, rows)
            except Exception as err:  # noqa: BLE001 - re-raised below, after telling the other processes
                failure = err
                result = f"{type(err).__name__}: {err}"
    if trainer.accelerator.num_processes > 1:
        result = broadcast_object_list([result])[0]
    if isinstance(result, str):
        if failure is not None:
            raise failure
        raise TrainingError(f"evaluation of '{split}' failed: {result}")
    return result


def _any_failed(trainer: Trainer, error: BaseException | None) -> bool:
    from mmlm.training.distributed import any_failed

    return any_failed(trainer.accelerator, error)


def split_for_process(dataset, limit: int | None, rank: int, world: int):
    """This process's part of a split and the split position of its first item: a contiguous slice of the
    first ``limit`` items, or every ``world``-th sample of a stream (positions then step by ``world``)."""
    if isinstance(dataset, IterableDataset):
        part = dataset.with_transform(dataset.transform)
        part.set_distributed(rank, world)
        return part, rank, world, None if limit is None else max(0, (limit - rank + world - 1) // world)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    per, extra = divmod(n, world)
    start = rank * per + min(rank, extra)
    stop = start + per + (1 if rank < extra else 0)
    return Subset(dataset, range(start, stop)), start, 1, None


def _predict_part(trainer: Trainer, model, split: str) -> list[tuple[int, dict]]:
    acc = trainer.accelerator
    limit = trainer.config.eval.max_samples
    part, start, stride, part_limit = split_for_process(trainer.datasets[split], limit, acc.process_index,
                                                        acc.num_processes)
    with _in_eval_mode(model), preserved_rng(acc.device), torch.no_grad():
        rows = trainer.task.predict(model, part, split)
    if part_limit is not None:
        rows = rows[:part_limit]
    return [(start + stride * k, row) for k, row in enumerate(rows)]


@contextlib.contextmanager
def _in_eval_mode(model) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _evaluate_here(trainer: Trainer, model, split: str, rows: list[dict] | None) -> dict[str, float]:
    task = trainer.task
    out_dir = trainer.output_dir / "eval" / f"{split}_{ckpt.checkpoint_name(trainer.step)}"
    out_dir.mkdir(parents=True, exist_ok=True)
    with _in_eval_mode(model), preserved_rng(trainer.accelerator.device), torch.no_grad():
        if rows is None:
            raw = task.evaluate(model, trainer.datasets[split], out_dir, split)
        else:
            raw = task.score(rows, trainer.datasets[split], out_dir, split)
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

    with trainer.evaluation_model() as model:  # EMA weights applied; a full copy under FSDP
        def save() -> None:
            ckpt.save_model(trainer.task, model, None, trainer.output_dir / "best", record)

        run_on_main(trainer.accelerator, "saving the best model", save, trainer.step)
