"""The one training loop, on accelerate: one process or many (``accelerate launch`` / torchrun).

A :class:`~mmlm.train.task.Task` supplies the model, the data, ``batch -> loss`` and the
evaluation; the :class:`Trainer` owns the rest: precision, accumulation, AdamW with per-part
LRs, warmup + cosine, clipping, EMA, logging, evaluation, best model, atomic checkpoints and
exact resume.

Batch sizes: ``data.batch_size`` is per process and per micro-batch, so one optimiser step
sees ``batch_size * processes * grad_accum_steps`` samples. A "step" is one optimiser update.

Exact resume: data order comes from accelerate's seedable sampler (seed ``train.seed`` + epoch,
the same on every process); a checkpoint stores the number of micro-batches consumed in the
current epoch and resume skips them with ``skip_first_batches``. Model, optimiser, schedule,
EMA and the RNG states are restored; evaluation runs with forked RNG so it never shifts the
training stream. Step-based runs resume bitwise (on CPU); wall-clock runs schedule the LR on
elapsed time (see :mod:`mmlm.train.optim`) and so cannot.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DistributedType, broadcast_object_list, gather_object, set_seed
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

from mmlm.eval.plots import plot_loss_curve, read_metrics_jsonl
from mmlm.eval.report import write_run_report
from mmlm.config import ConfigError, RunConfig, TrainConfig, save_yaml, to_dict
from mmlm.data.datasets import guard_workers
from mmlm.train import checkpoint as ckpt
from mmlm.train.ema import EMA
from mmlm.train.optim import WarmupDecaySchedule, build_optimizer
from mmlm.train.task import Task


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and where (step, checkpoint)."""


class NonFiniteLossError(TrainingError, FloatingPointError):
    """The loss became NaN or infinite; raised before the optimiser steps on it."""


class CheckpointWriteError(TrainingError, ckpt.CheckpointError):
    """A checkpoint could not be written; the previous one is left intact."""


def resolve_mixed_precision(value: str) -> str:
    """``"auto"`` -> ``"bf16"`` on CUDA devices that support it, else ``"no"`` (fp32 is faster on CPU)."""
    if value == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if value in ("no", "bf16", "fp16"):
        return value
    raise ConfigError(f"train.mixed_precision: expected 'auto', 'no', 'bf16' or 'fp16', got {value!r}")


def launched_processes() -> int:
    """Process count set by the launcher (torchrun / accelerate launch / MPI), 1 when run plainly."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide state (precision, accumulation) left by an earlier Trainer."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def has_accelerator() -> bool:
    """Whether torch sees a GPU-like device (CUDA, XPU, MPS, ...)."""
    if hasattr(torch, "accelerator"):
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def validate_train_config(train: TrainConfig) -> None:
    """Checks that need more than one field, or that the dataclass itself does not make."""
    if train.max_steps is None and train.epochs is None and train.max_minutes is None:
        raise ConfigError("train: set at least one of max_steps, epochs or max_minutes")
    positive = {"max_steps": train.max_steps, "epochs": train.epochs, "max_minutes": train.max_minutes,
                "eval_every": train.eval_every, "save_every": train.save_every, "log_every": train.log_every,
                "keep_last": train.keep_last, "num_threads": train.num_threads}
    for key, value in positive.items():
        if value is not None and value <= 0:
            raise ConfigError(f"train.{key}: expected > 0, got {value}")
    if train.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps: expected >= 0, got {train.warmup_steps}")
    if train.max_grad_norm is not None and train.max_grad_norm <= 0:
        raise ConfigError(f"train.max_grad_norm: expected > 0 or null, got {train.max_grad_norm}")
    if train.ema_decay is not None and not 0.0 < train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay: expected a value in (0, 1) or null, got {train.ema_decay}")
    if train.lr <= 0:
        raise ConfigError(f"train.lr: expected > 0, got {train.lr}")
    resolve_mixed_precision(train.mixed_precision)


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


# ------------------------------------------------------------------------------------------
# Metrics on disk and the loss curve
# ------------------------------------------------------------------------------------------


class MetricsLog:
    """Appends JSON records to ``metrics.jsonl`` and, when installed, to TensorBoard."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = Path(path)
        kept = []
        if resume_step is not None:  # drop records a crashed run wrote after its last checkpoint
            kept = [r for r in read_metrics_jsonl(self.path) if r.get("step", 0) <= resume_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        self._file = self.path.open("a", encoding="utf-8")
        self._tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(self.path.parent / "tensorboard"))
        except ImportError:  # tensorboard is optional
            pass

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


# ------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Window:
    """Steps since the last log record: mean loss and samples/s."""

    loss_sum: float = 0.0
    steps: int = 0
    samples: int = 0
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def add(self, loss: float, samples: int) -> None:
        self.loss_sum += loss
        self.steps += 1
        self.samples += samples


class Trainer:
    """Train ``task`` as ``config`` says; ``resume=True`` continues from the latest checkpoint.

    ``resume`` may also be the path of one checkpoint folder. With ``resume=True`` and no
    checkpoint yet, training starts from scratch (handy for preemptible jobs).
    """

    def __init__(self, config: RunConfig, task: Task, *, resume: bool | str | Path = False):
        if not isinstance(task, Task):
            raise TypeError(f"task must be a mmlm.train.Task, got {type(task).__name__}")
        self.config = config
        self.task = task
        train = config.train
        validate_train_config(train)
        self.output_dir = Path(config.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        if train.num_threads:
            torch.set_num_threads(train.num_threads)

        if launched_processes() == 1:
            reset_accelerate_state()  # several runs in one process (the demo, notebooks) each get their own settings
        # accelerate treats a plain torchrun on a CPU-only machine as one process unless told cpu=True
        cpu_processes = launched_processes() > 1 and not has_accelerator()
        self.accelerator = Accelerator(
            cpu=cpu_processes,
            gradient_accumulation_steps=train.grad_accum_steps,
            mixed_precision=resolve_mixed_precision(train.mixed_precision),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=train.seed),
            project_dir=str(self.output_dir),
            step_scheduler_with_optimizer=False,  # we step it once per update, whatever the process count
        )
        if launched_processes() != self.accelerator.num_processes:
            raise TrainingError(
                f"launched as {launched_processes()} processes but accelerate runs {self.accelerator.num_processes} "
                f"({self.accelerator.distributed_type}); every process would train alone and overwrite the others' files"
            )
        self.is_main = self.accelerator.is_main_process
        resume_from = self._find_resume_checkpoint(resume)

        set_seed(train.seed)  # identical initial weights on every process
        model = task.build_model()
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(task).__name__}.build_model must return an nn.Module, got {type(model).__name__}")
        self.datasets = dict(task.build_datasets(model))
        if "train" not in self.datasets:
            raise ValueError(f"{type(task).__name__}.build_datasets returned {sorted(self.datasets)}; 'train' is required")
        if train.best_metric is not None and "val" not in self.datasets:
            raise ConfigError(f"train.best_metric={train.best_metric!r} needs a 'val' split; the task has {sorted(self.datasets)}")
        if train.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        optimizer = build_optimizer(model, task.trainable_groups(model), train)

        self._loader_generator = torch.Generator().manual_seed(train.seed)
        self.train_loader = self.accelerator.prepare(self._build_train_loader())
        self.micro_batches_per_epoch = self._micro_batches_per_epoch()
        self.steps_per_epoch = (
            None if self.micro_batches_per_epoch is None else math.ceil(self.micro_batches_per_epoch / train.grad_accum_steps)
        )
        self.total_steps = self._total_steps()
        if train.schedule == "cosine" and self.total_steps is None and train.max_minutes is None:
            raise ConfigError("train.schedule='cosine' needs max_steps or max_minutes when the train split has no length")

        self.schedule = WarmupDecaySchedule(
            optimizer, warmup_steps=train.warmup_steps, schedule=train.schedule,
            min_lr_ratio=train.min_lr_ratio, total_steps=self.total_steps,
        )
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, self.schedule)
        self.unwrapped = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        # The compiled wrapper is only used for the training forward; checkpoints and saved
        # models come from the plain modules, so they never carry ``_orig_mod.`` prefixes.
        self.train_model = torch.compile(self.model) if train.compile else self.model
        self.ema = EMA(self.unwrapped, train.ema_decay) if train.ema_decay is not None else None

        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0  # micro-batches of the current epoch consumed, per process
        self.samples_seen = 0
        self.elapsed_s = 0.0
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.last_checkpoint: Path | None = None
        self.resumed_from: Path | None = None
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        else:
            set_seed(train.seed, device_specific=True)  # training randomness differs per process

    # -- setup helpers -----------------------------------------------------------------------

    def _find_resume_checkpoint(self, resume: bool | str | Path) -> Path | None:
        if resume is False or resume is None:
            existing = ckpt.latest_checkpoint(self.checkpoint_dir)
            if existing is not None:
                raise TrainingError(
                    f"{self.output_dir} already holds checkpoints (latest {existing.name}); "
                    "pass resume=True to continue that run, or choose another output_dir"
                )
            return None
        if resume is True:
            return ckpt.latest_checkpoint(self.checkpoint_dir)
        path = Path(resume)
        ckpt.read_state(path)  # names the problem if the folder is missing or incomplete
        return path

    def _build_train_loader(self) -> DataLoader:
        data = self.config.data
        dataset = self.datasets["train"]
        iterable = isinstance(dataset, IterableDataset)
        return DataLoader(
            dataset,
            batch_size=data.batch_size,
            shuffle=not iterable,
            drop_last=True,  # equal batches on every process and every step
            collate_fn=self.task.collate,
            num_workers=data.num_workers,
            generator=self._loader_generator,
            pin_memory=torch.cuda.is_available(),
            # a hung worker becomes an error naming its file (guard_workers) instead of blocking forever
            timeout=data.worker_timeout_s if data.num_workers > 0 else 0,
        )

    def _micro_batches_per_epoch(self) -> int | None:
        try:
            n = len(self.train_loader)
        except TypeError:
            return None
        if n == 0:
            global_batch = self.config.data.batch_size * self.accelerator.num_processes
            raise TrainingError(
                f"the train split has {len(self.datasets['train'])} samples, fewer than one batch of "
                f"{global_batch} (data.batch_size x processes); lower data.batch_size"
            )
        return n

    def _total_steps(self) -> int | None:
        train = self.config.train
        candidates = []
        if train.max_steps is not None:
            candidates.append(train.max_steps)
        if train.epochs is not None and self.steps_per_epoch is not None:
            candidates.append(max(1, round(train.epochs * self.steps_per_epoch)))
        return min(candidates) if candidates else None

    @property
    def epoch_progress(self) -> float:
        """Epochs done, with the fraction of the current one (when the train split has a length)."""
        fraction = self.batch_in_epoch / self.micro_batches_per_epoch if self.micro_batches_per_epoch else 0.0
        return round(self.epoch + fraction, 4)

    @property
    def global_batch_size(self) -> int:
        return self.config.data.batch_size * self.accelerator.num_processes * self.config.train.grad_accum_steps

    # -- checkpoints ------------------------------------------------------------------------

    def _trainer_state(self) -> dict[str, Any]:
        return {
            "format": 1,
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "samples_in_epoch": self.batch_in_epoch * self.config.data.batch_size * self.accelerator.num_processes,
            "samples_seen": self.samples_seen,
            "elapsed_s": self.elapsed_s,
            "best_metric": self.config.train.best_metric,
            "best_value": self.best_value,
            "best_step": self.best_step,
            "ema_updates": self.ema.num_updates if self.ema is not None else None,
            "num_processes": self.accelerator.num_processes,
            "batch_size": self.config.data.batch_size,
            "grad_accum_steps": self.config.train.grad_accum_steps,
        }

    def _any_failed(self, error: BaseException | None) -> bool:
        """Whether ``error`` happened on any process (a collective: every process must call it)."""
        failed = torch.tensor([0.0 if error is None else 1.0], device=self.accelerator.device)
        return self.accelerator.reduce(failed, "sum").item() > 0

    def _on_main(self, what: str, fn) -> None:
        """Run ``fn`` on the main process; if it raises, every process raises (no one waits forever)."""
        error = None
        if self.is_main:
            try:
                fn()
            except Exception as err:  # noqa: BLE001 - re-raised below on every process
                error = err
        if self._any_failed(error):
            if error is not None:
                raise error
            raise TrainingError(f"{what} failed on the main process at step {self.step}")

    def save_checkpoint(self) -> Path:
        """Write an atomic checkpoint of the whole training state; keep the last ``train.keep_last``."""
        target = self.checkpoint_dir / ckpt.checkpoint_name(self.step)
        tmp = ckpt.temp_dir_for(target)

        def fail(what: str, error: BaseException | None) -> None:
            if not self._any_failed(error):
                return
            if self.is_main:
                ckpt.discard(tmp)
            reason = f"{type(error).__name__}: {error}" if error is not None else "it failed on another process"
            previous = self.last_checkpoint or "none (no checkpoint was written yet)"
            raise CheckpointWriteError(
                f"could not write checkpoint {target} at step {self.step} ({what}: {reason}); "
                f"the last complete checkpoint is {previous}"
            ) from error

        error: BaseException | None = None
        if self.is_main:
            try:
                ckpt.prepare_temp_dir(target)
            except OSError as err:
                error = err
        fail("creating the temp folder", error)
        try:
            self.accelerator.save_state(str(tmp))
        except OSError as err:
            error = err
        fail("saving model, optimiser and RNG states", error)
        if self.is_main:
            try:
                if self.ema is not None:
                    self.ema.save(tmp / ckpt.EMA_FILE)
                ckpt.write_json(tmp / ckpt.STATE_FILE, self._trainer_state())
                ckpt.finalize(tmp, target)
            except OSError as err:
                error = err
        fail("finalising", error)
        self.last_checkpoint = target
        if self.is_main:
            ckpt.prune(self.checkpoint_dir, self.config.train.keep_last, protect=target)
        self.accelerator.wait_for_everyone()
        return target

    def load_checkpoint(self, path: Path) -> None:
        """Restore model, optimiser, schedule, EMA, RNG and the position in the data from ``path``."""
        path = Path(path)
        state = ckpt.read_state(path)
        try:
            self.accelerator.load_state(str(path))
        except Exception as err:  # e.g. a truncated file, or a pickle that weights_only loading refuses
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            reason = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else "")  # what was blocked
            raise ckpt.CheckpointError(
                f"{path}: cannot restore the training state ({type(err).__name__}: {reason}); "
                "resume from another checkpoint (resume=<path>) or start a new run"
            ) from err
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.samples_seen = int(state["samples_seen"])
        self.elapsed_s = float(state["elapsed_s"])
        self.best_value = state.get("best_value")
        self.best_step = state.get("best_step")
        per_batch = self.config.data.batch_size * self.accelerator.num_processes
        samples_in_epoch = int(state["samples_in_epoch"])
        if samples_in_epoch % per_batch:
            raise TrainingError(
                f"{path}: stopped {samples_in_epoch} samples into epoch {self.epoch}, which is not a whole number of "
                f"batches of {per_batch} (data.batch_size x processes now); resume with the original batch size"
            )
        self.batch_in_epoch = samples_in_epoch // per_batch
        if self.micro_batches_per_epoch is not None and self.batch_in_epoch >= self.micro_batches_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        if self.ema is not None:
            ema_file = path / ckpt.EMA_FILE
            if ema_file.is_file():
                self.ema.load(ema_file, state.get("ema_updates") or 0)
            else:  # EMA switched on for a run that had none: start it from the restored weights
                self.ema = EMA(self.unwrapped, self.config.train.ema_decay)
        self.last_checkpoint = path
        self.resumed_from = path

    # -- evaluation ------------------------------------------------------------------------

    def evaluate(self, split: str) -> dict[str, float]:
        """Metrics of the current model (EMA weights when enabled) on ``split``, keyed ``"<split>/<name>"``.

        Runs on the main process; the others wait and receive the same dict (no hang, even if
        the evaluation raises: then every process raises).
        """
        if split not in self.datasets:
            raise ValueError(f"no '{split}' split; the task built {sorted(self.datasets)}")
        result: dict[str, float] | str = {}
        failure: Exception | None = None
        if self.is_main:
            try:
                result = self._evaluate_here(split)
            except Exception as err:  # noqa: BLE001 - re-raised below, after telling the other processes
                failure = err
                result = f"{type(err).__name__}: {err}"
        if self.accelerator.num_processes > 1:
            result = broadcast_object_list([result])[0]
        if isinstance(result, str):
            if failure is not None:
                raise failure
            raise TrainingError(f"evaluation of '{split}' failed on the main process: {result}")
        return result

    def _evaluate_here(self, split: str) -> dict[str, float]:
        out_dir = self.output_dir / "eval" / f"{split}_{ckpt.checkpoint_name(self.step)}"
        out_dir.mkdir(parents=True, exist_ok=True)
        model = self.unwrapped
        was_training = model.training
        ema = self.ema.applied() if self.ema is not None else contextlib.nullcontext()
        try:
            with preserved_rng(self.accelerator.device), ema, torch.no_grad():
                model.eval()
                raw = self.task.evaluate(model, self.datasets[split], out_dir, split)
        finally:
            model.train(was_training)
        if not isinstance(raw, dict):
            raise TypeError(f"{type(self.task).__name__}.evaluate must return dict[str, float], got {type(raw).__name__}")
        metrics = {}
        for key, value in raw.items():
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{type(self.task).__name__}.evaluate: metric '{key}' must be a number, got {value!r}")
            name = key if key.startswith(f"{split}/") else f"{split}/{key}"
            metrics[name] = float(value)
        return metrics

    def _is_better(self, value: float) -> bool:
        if self.best_value is None:
            return True
        lower_is_better = self.config.train.best_metric.endswith("loss")
        return value < self.best_value if lower_is_better else value > self.best_value

    def _track_best(self, metrics: dict[str, float]) -> None:
        name = self.config.train.best_metric
        if name is None:
            return
        if name not in metrics:
            raise ConfigError(f"train.best_metric={name!r} is not among the evaluation metrics {sorted(metrics)}")
        if not self._is_better(metrics[name]):
            return
        self.best_value, self.best_step = metrics[name], self.step
        target = self.output_dir / "best"
        record = {"metric": name, "value": self.best_value, "step": self.step}
        self._on_main("saving the best model", lambda: self._save_model_to(target, record))

    def _save_model_to(self, target: Path, best: dict[str, Any] | None = None) -> None:
        """``task.save_model`` of the unwrapped model (EMA weights when enabled), swapped in atomically."""
        tmp = ckpt.prepare_temp_dir(target)
        try:
            with self.ema.applied() if self.ema is not None else contextlib.nullcontext():
                self.task.save_model(self.unwrapped, tmp)
            if best is not None:
                ckpt.write_json(tmp / "best_metric.json", best)
            ckpt.finalize(tmp, target, marker=False)
        except BaseException:
            ckpt.discard(tmp)
            raise

    # -- the loop --------------------------------------------------------------------------

    def _epoch_loader(self):
        self._loader_generator.manual_seed(self.config.train.seed + self.epoch)  # worker seeds per epoch
        self.train_loader.set_epoch(self.epoch)
        if self.batch_in_epoch:
            return self.accelerator.skip_first_batches(self.train_loader, self.batch_in_epoch)
        return self.train_loader

    def _done(self) -> bool:
        train = self.config.train
        return (
            (self.total_steps is not None and self.step >= self.total_steps)
            or (train.max_minutes is not None and self.elapsed_s >= train.max_minutes * 60)
            # a train split without a length ends epochs only when it runs out
            or (self.steps_per_epoch is None and train.epochs is not None and self.epoch >= train.epochs)
        )

    def _autocast(self):
        if self.accelerator.mixed_precision == "no":
            return contextlib.nullcontext()
        return self.accelerator.autocast()

    # accelerate's AcceleratedOptimizer.step/zero_grad and clip_grad_norm_ look up optional
    # packages, signatures and DTensors on every call (~0.4 ms per step on a small CPU). For
    # plain DDP or one device without a GradScaler (fp16) they only forward to torch, so the
    # trainer calls torch directly there and leaves FSDP/DeepSpeed/XLA/fp16 to accelerate.
    @property
    def _plain_torch_path(self) -> bool:
        return self.accelerator.scaler is None and self.accelerator.distributed_type in (
            DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)

    def _clip_gradients(self, max_norm: float) -> float:
        if self._plain_torch_path:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        return float(self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm))

    def _optimizer_step(self) -> None:
        plain = self._plain_torch_path and isinstance(self.optimizer, AcceleratedOptimizer)
        optimizer = self.optimizer.optimizer if plain else self.optimizer
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def _sync_step_stats(self, loss_sum: torch.Tensor, micro_batches: int, clock_start: float) -> tuple[float, float]:
        """Mean loss over processes and the main process's elapsed time, in one collective."""
        if self.accelerator.num_processes == 1:
            return (loss_sum.float() / micro_batches).item(), time.perf_counter() - clock_start
        elapsed = time.perf_counter() - clock_start if self.is_main else 0.0
        stats = torch.stack([loss_sum.float() / micro_batches, torch.tensor(elapsed, device=loss_sum.device)])
        stats = self.accelerator.reduce(stats, "sum")
        return stats[0].item() / self.accelerator.num_processes, stats[1].item()

    def _log_record(self, window: _Window, grad_norm: float | None) -> dict[str, Any]:
        seconds = max(time.perf_counter() - window.start, 1e-9)
        record = {
            "step": self.step,
            "epoch": self.epoch_progress,
            "loss": window.loss_sum / window.steps,
            "lr": self.config.train.lr * self._lr_factor_used,
            "samples_per_s": window.samples / seconds,
            "elapsed_s": round(self.elapsed_s, 3),
        }
        if any(not math.isclose(lr, record["lr"]) for lr in self._lrs_used.values()):
            record.update({f"lr/{name}": lr for name, lr in self._lrs_used.items()})
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        return record

    def fit(self) -> dict[str, Any]:
        """Train until ``max_steps`` / ``epochs`` / ``max_minutes``; return final metrics and paths."""
        self._log = None
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_yaml(to_dict(self.config), self.output_dir / "config.yaml")
            self._log = MetricsLog(self.output_dir / "metrics.jsonl", self.step if self.resumed_from else None)
        self.accelerator.wait_for_everyone()
        self._bar = tqdm(total=self.total_steps, initial=self.step, desc="train", disable=not self.is_main,
                         dynamic_ncols=True)
        self._announce()
        self._clock_start = time.perf_counter() - self.elapsed_s
        self._window = _Window()
        self._last_loss, self._grad_norm = float("nan"), None
        self._loss_sum, self._micro_batches = None, 0
        self._last_metrics: dict[str, float] = {}
        self._last_eval_step = self._last_save_step = None
        try:
            while not self._done():
                loader = self._epoch_loader()
                finished_epoch = True
                for batch in guard_workers(loader, self.datasets["train"]):  # a dead worker names its file
                    if self._train_micro_batch(batch) and self._end_of_step():
                        finished_epoch = False
                        break
                if not finished_epoch:
                    if hasattr(loader, "end"):
                        loader.end()  # leaving an epoch early: unregister it from accelerate's gradient state
                    break
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            self._final_evaluation()
            if self._last_save_step != self.step:
                self.save_checkpoint()
            return self._finish(self._last_metrics, self._last_loss)
        finally:
            self._bar.close()
            if self._log is not None:
                self._log.close()

    def _announce(self) -> None:
        if not self.is_main:
            return
        acc = self.accelerator
        trainable = sum(p.numel() for p in self.unwrapped.parameters() if p.requires_grad)
        where = f"resumed from {self.resumed_from} at step {self.step}" if self.resumed_from else "from scratch"
        self._bar.write(
            f"mmlm: {type(self.task).__name__} {where} on {acc.num_processes} x {acc.device.type} "
            f"({acc.mixed_precision}), {trainable:,} trainable parameters, global batch {self.global_batch_size}, "
            f"{self.total_steps or '?'} steps"
        )

    def _train_micro_batch(self, batch: Any) -> bool:
        """Forward and backward one micro-batch; step the optimiser when accumulation is complete.

        Returns whether an optimiser step happened.
        """
        acc, train = self.accelerator, self.config.train
        with acc.accumulate(self.model):
            with self._autocast():
                loss = self.task.training_loss(self.train_model, batch)
            if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
                raise TrainingError(
                    f"{type(self.task).__name__}.training_loss must return a scalar tensor, got "
                    f"{getattr(loss, 'shape', type(loss).__name__)}"
                )
            acc.backward(loss)
            self._loss_sum = loss.detach() if self._loss_sum is None else self._loss_sum + loss.detach()
            self._micro_batches += 1
            self.batch_in_epoch += 1
            if not acc.sync_gradients:
                return False
            self._last_loss, self.elapsed_s = self._sync_step_stats(self._loss_sum, self._micro_batches,
                                                                    self._clock_start)
            if not math.isfinite(self._last_loss):
                raise NonFiniteLossError(
                    f"loss is {self._last_loss} at step {self.step + 1} (epoch {self.epoch}); the optimiser did not "
                    f"step on it. Last good checkpoint: {self.last_checkpoint or 'none (no checkpoint was written yet)'}"
                )
            if train.max_grad_norm is not None:
                self._grad_norm = self._clip_gradients(train.max_grad_norm)
            self._optimizer_step()
            return True

    def _end_of_step(self) -> bool:
        """Book-keeping after an optimiser step: schedule, EMA, logging, evaluation, checkpoint.

        Returns whether training is done.
        """
        train = self.config.train
        samples = self._micro_batches * self.config.data.batch_size * self.accelerator.num_processes
        self._loss_sum, self._micro_batches = None, 0
        self.step += 1
        self.samples_seen += samples
        self._lrs_used = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
        self._lr_factor_used = self.schedule.get_last_lr()[0] / self.schedule.base_lrs[0]
        if train.max_minutes is not None:
            self.schedule.set_time_fraction(self.elapsed_s / (train.max_minutes * 60))
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update()
        self._window.add(self._last_loss, samples)
        self._bar.update(1)
        done = self._done()
        if self.step % train.log_every == 0 or done:
            record = self._log_record(self._window, self._grad_norm)
            if self._log is not None:
                self._log.write(record)
            postfix = {"loss": f"{record['loss']:.4f}", "samples_s": f"{record['samples_per_s']:.1f}"}
            if self.config.train.max_minutes is not None:  # the bar's own ETA needs a step count; a budget has none
                left = max(0.0, self.config.train.max_minutes * 60 - self.elapsed_s)
                postfix["eta"] = f"{int(left // 60)}:{int(left % 60):02d}"
            self._bar.set_postfix(postfix)
            self._window = _Window()
        pause_start = time.perf_counter()  # evaluation and saving count neither in samples/s nor in max_minutes
        if train.eval_every and self.step % train.eval_every == 0 and "val" in self.datasets:
            self._last_metrics = self._evaluate_and_log("val")
            self._last_eval_step = self.step
        if train.save_every and self.step % train.save_every == 0:
            self.save_checkpoint()
            self._last_save_step = self.step
        paused = time.perf_counter() - pause_start
        self._window.start += paused
        self._clock_start += paused
        return done

    def _final_evaluation(self) -> None:
        if "val" in self.datasets and self._last_eval_step != self.step:
            self._last_metrics = self._evaluate_and_log("val")
        for split in self.config.eval.splits:
            if split != "val" and split in self.datasets:
                self._last_metrics.update(self._evaluate_and_log(split, track_best=False))

    def _evaluate_and_log(self, split: str, track_best: bool = True) -> dict[str, float]:
        metrics = self.evaluate(split)
        if self._log is not None:
            self._log.write({"step": self.step, **metrics})
        if self.is_main:
            tqdm.write(f"step {self.step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        if track_best and split == "val":
            self._track_best(metrics)
        return metrics

    def _report_skipped(self) -> list[dict[str, str]]:
        """Images the splits skipped (``data.on_bad_image: skip``): written to ``skipped.jsonl`` and counted.

        Each process sees the images its own data loading skipped: the lists are gathered, and an image
        more than one process skipped is reported once.
        """
        skipped = [{"split": split, "source": source, "reason": reason}
                   for split, dataset in self.datasets.items() for source, reason in getattr(dataset, "skipped", [])]
        if self.accelerator.num_processes > 1:
            gathered = gather_object(skipped)
            skipped = [dict(t) for t in dict.fromkeys(tuple(r.items()) for r in gathered)]
        if self.is_main:
            path = self.output_dir / "skipped.jsonl"
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in skipped), encoding="utf-8")
            if skipped:
                tqdm.write(f"mmlm: skipped {len(skipped)} bad images (data.on_bad_image=skip); which and why: {path}")
        return skipped

    def _finish(self, metrics: dict[str, float], last_loss: float) -> dict[str, Any]:
        paths = {
            "output_dir": str(self.output_dir),
            "model_dir": str(self.output_dir / "model"),
            "checkpoint": str(self.last_checkpoint),
            "metrics_file": str(self.output_dir / "metrics.jsonl"),
            "loss_curve": str(self.output_dir / "loss_curve.png"),
        }
        if self.config.train.best_metric is not None:
            paths["best_dir"] = str(self.output_dir / "best")

        skipped = self._report_skipped()
        paths["skipped_file"] = str(self.output_dir / "skipped.jsonl")
        summary: dict[str, Any] = {"step": self.step, "epoch": self.epoch_progress, "train/loss": last_loss,
                                   "elapsed_s": self.elapsed_s, "samples_seen": self.samples_seen,
                                   "skipped_images": len(skipped)}
        if self.best_value is not None:
            summary["best/" + self.config.train.best_metric] = self.best_value
            summary["best/step"] = self.best_step

        def save_final() -> None:
            self._save_model_to(self.output_dir / "model")
            plot_loss_curve(self.output_dir / "metrics.jsonl", self.output_dir / "loss_curve.png")
            pictures = sorted(self.output_dir.glob(f"eval/*_step_{self.step:06d}/*.png"))
            write_run_report(self.output_dir, f"{type(self.task).__name__}: {self.output_dir.name}",
                             {**summary, **metrics}, pictures, self.output_dir / "metrics.jsonl")

        self._on_main("saving the final model and the report", save_final)
        return {**summary, **metrics, **paths}
