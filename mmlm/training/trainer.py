"""The one training loop, on accelerate: one process or many (``accelerate launch`` / torchrun).

A :class:`~mmlm.training.task.Task` supplies the model, the data, ``batch -> loss`` and the
evaluation; the :class:`Trainer` owns the rest: precision, accumulation, AdamW with per-part
LRs, warmup + cosine, clipping, EMA, logging, evaluation, best model, atomic checkpoints and
exact resume.

Batch sizes: ``data.batch_size`` is per process and per micro-batch, so one optimiser step
sees ``batch_size * processes * grad_accum_steps`` samples. A "step" is one optimiser update.

Accumulation is the trainer's own: it takes the ``grad_accum_steps`` micro-batches of a step
first, so a task that counts its loss items (:meth:`~mmlm.training.task.Task.num_items`, e.g. label
tokens) gets the loss normalised by the count over the whole step and every process; other tasks
average their micro-batch losses. Gradients are synchronised on the last micro-batch only.

Exact resume: data order comes from accelerate's seedable sampler (seed ``train.seed`` + epoch,
the same on every process), or, for streamed shards, from the dataset's own split and shuffle; a
checkpoint stores the number of micro-batches consumed in the current epoch and resume skips them
(``skip_first_batches``; streamed: before decoding). Model, optimiser, schedule,
EMA and the RNG states are restored; evaluation runs with forked RNG so it never shifts the
training stream. Step-based runs resume bitwise (on CPU); wall-clock runs schedule the LR on
elapsed time (see :mod:`mmlm.training.optim`) and so cannot.

This file is the loop; its parts live beside it: :mod:`~mmlm.training.checkpoint` (save, restore,
resume), :mod:`~mmlm.training.evaluation` (main-process evaluation, best model),
:mod:`~mmlm.training.logging` (metrics log), :mod:`~mmlm.training.report` (the end of a run),
:mod:`~mmlm.training.distributed` (processes, devices, collectives).
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType, set_seed
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

from mmlm.config import ConfigError, RunConfig, save_yaml, to_dict, validate_train_config
from mmlm.training import checkpoint as ckpt
from mmlm.training import evaluation
from mmlm.training.distributed import (
    broadcast_module,
    build_accelerator,
    reset_accelerate_state,
    resolve_mixed_precision,
    run_on_main,
    set_fsdp_wrap_classes,
)
from mmlm.training.ema import EMA
from mmlm.training.errors import CheckpointWriteError, NonFiniteLossError, TrainingError
from mmlm.training.logging import MetricsLog, StepWindow
from mmlm.training.optim import WarmupDecaySchedule, build_optimizer
from mmlm.training.report import finish
from mmlm.training.steps import enable_gradient_checkpointing, epoch_steps, train_step
from mmlm.training.task import Task

__all__ = [  # the names this module has always offered (several now live beside it)
    "CheckpointWriteError", "MetricsLog", "NonFiniteLossError", "Trainer", "TrainingError",
    "enable_gradient_checkpointing", "reset_accelerate_state", "resolve_mixed_precision", "validate_train_config",
]


class Trainer:
    """Train ``task`` as ``config`` says; ``resume=True`` continues from the latest checkpoint.

    ``resume`` may also be the path of one checkpoint folder. With ``resume=True`` and no
    checkpoint yet, training starts from scratch (handy for preemptible jobs).
    """

    def __init__(self, config: RunConfig, task: Task, *, resume: bool | str | Path = False):
        if not isinstance(task, Task):
            raise TypeError(f"task must be a mmlm.training.Task, got {type(task).__name__}")
        self.config = config
        self.task = task
        train = config.train
        validate_train_config(train)
        self.output_dir = Path(config.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        if train.num_threads:
            torch.set_num_threads(train.num_threads)

        self.accelerator = build_accelerator(train, self.output_dir)
        self.is_main = self.accelerator.is_main_process
        resume_from = ckpt.find_resume_checkpoint(resume, self.output_dir)

        set_seed(train.seed)  # identical initial weights on every process
        model = task.build_model()
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(task).__name__}.build_model must return an nn.Module, got {type(model).__name__}")
        if type(task).prepare_once is not Task.prepare_once:  # e.g. the VAE pre-stage: once, on the device
            model.to(self.accelerator.device)
            run_on_main(self.accelerator, f"{type(task).__name__}.prepare_once", lambda: task.prepare_once(model), 0)
            broadcast_module(self.accelerator, model)
        self.datasets = dict(task.build_datasets(model))
        if "train" not in self.datasets:
            raise ValueError(f"{type(task).__name__}.build_datasets returned {sorted(self.datasets)}; "
                             "'train' is required")
        if train.best_metric is not None and "val" not in self.datasets:
            raise ConfigError(f"train.best_metric={train.best_metric!r} needs a 'val' split; "
                              f"the task has {sorted(self.datasets)}")
        if train.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        optimizer = build_optimizer(model, task.trainable_groups(model), train,
                                    freeze=lambda name, part: task.freeze_part(model, name, part))
        self.fsdp = self.accelerator.distributed_type == DistributedType.FSDP
        if self.fsdp:
            if train.optimizer == "muon":
                raise ConfigError("train.optimizer='muon' with train.fsdp: Muon orthogonalises whole matrices and "
                                  "FSDP shards them; use DDP, or train.optimizer='adamw'")
            if train.ema_decay is not None:
                raise ConfigError("train.ema_decay with train.fsdp: the EMA keeps full weights per process; "
                                  "not supported with sharded parameters")
            set_fsdp_wrap_classes(self.accelerator, train.fsdp.auto_wrap or task.fsdp_wrap_classes(model))
            # the full model for evaluation and saving, filled from the gathered shards: on the main process, and on
            # every process when each evaluates its part of a split
            self._replica_everywhere = evaluation.evaluates_in_parts(task)
            self._replica = (copy.deepcopy(model).to(self.accelerator.device)
                             if self.is_main or self._replica_everywhere else None)

        self._loader_generator = torch.Generator().manual_seed(train.seed)
        train_set = self.datasets["train"]
        self.streamed = isinstance(train_set, IterableDataset) and hasattr(train_set, "set_distributed")
        if self.streamed:
            train_set.set_distributed(self.accelerator.process_index, self.accelerator.num_processes)
        # A streamed split is split by the dataset itself: accelerate only moves its batches to the device.
        loader = self._build_train_loader()
        self.train_loader = loader if self.streamed else self.accelerator.prepare(loader)
        self.micro_batches_per_epoch = self._micro_batches_per_epoch()
        per_epoch = self.micro_batches_per_epoch
        self.steps_per_epoch = None if per_epoch is None else math.ceil(per_epoch / train.grad_accum_steps)
        self.total_steps = self._total_steps()
        if train.schedule == "cosine" and self.total_steps is None and train.max_minutes is None:
            raise ConfigError("train.schedule='cosine' needs max_steps or max_minutes when the train split "
                              "has no length")

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
        self.metrics_log: MetricsLog | None = None  # open during fit(), on the main process
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        else:
            set_seed(train.seed, device_specific=True)  # training randomness differs per process

    # -- setup helpers -----------------------------------------------------------------------

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

    # -- checkpoints and evaluation (in their own modules) ----------------------------------

    def save_checkpoint(self) -> Path:
        """Write an atomic checkpoint of the whole training state; keep the last ``train.keep_last``."""
        return ckpt.save_checkpoint(self)

    def load_checkpoint(self, path: Path) -> None:
        """Restore model, optimiser, schedule, EMA, RNG and the position in the data from ``path``."""
        ckpt.load_checkpoint(self, path)

    def evaluate(self, split: str) -> dict[str, float]:
        """Metrics of the current model (EMA weights when enabled) on ``split``, keyed ``"<split>/<name>"``.

        Runs on the main process; the others wait and receive the same dict (no hang, even if
        the evaluation raises: then every process raises).
        """
        return evaluation.evaluate(self, split)

    # -- the loop --------------------------------------------------------------------------

    def evaluation_model(self):
        """The model to evaluate or save (EMA applied; a full copy under FSDP); every process enters."""
        return evaluation.evaluation_model(self)

    def _epoch_loader(self):
        self._loader_generator.manual_seed(self.config.train.seed + self.epoch)  # worker seeds per epoch
        dataset = self.datasets["train"]
        if hasattr(dataset, "set_epoch"):  # accelerate skips it once the batch sampler is sharded (>1 process)
            dataset.set_epoch(self.epoch)
        if self.streamed:
            dataset.skip(self.batch_in_epoch, self.config.data.batch_size)
            return self.train_loader
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

    def fit(self) -> dict[str, Any]:
        """Train until ``max_steps`` / ``epochs`` / ``max_minutes``; return final metrics and paths."""
        self.metrics_log = None
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_yaml(to_dict(self.config), self.output_dir / "config.yaml")
            self.metrics_log = MetricsLog(self.output_dir / "metrics.jsonl", self.step if self.resumed_from else None)
            if self.config.train.report_to:  # the same records to experiment trackers (mmlm.training.trackers)
                from mmlm.training.trackers import TrackedMetricsLog

                self.metrics_log = TrackedMetricsLog(self.metrics_log, self.config.train.report_to, self.output_dir,
                                                     to_dict(self.config))
        self.accelerator.wait_for_everyone()
        self._bar = tqdm(total=self.total_steps, initial=self.step, desc="train", disable=not self.is_main,
                         dynamic_ncols=True)
        self._announce()
        self._clock_start = time.perf_counter() - self.elapsed_s
        self._window = StepWindow()
        self._last_loss, self._grad_norm = float("nan"), None
        self._loss_sum, self._micro_batches = None, 0
        self._last_metrics: dict[str, float] = {}
        self._last_eval_step = self._last_save_step = None
        try:
            while not self._done():
                loader = self._epoch_loader()
                finished_epoch = True
                for window in epoch_steps(self, loader):
                    train_step(self, window)
                    if self._end_of_step():
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
            return finish(self, self._last_metrics, self._last_loss)
        finally:
            self._bar.close()
            if self.metrics_log is not None:
                self.metrics_log.close()

    def _announce(self) -> None:
        if not self.is_main:
            return
        acc = self.accelerator
        trainable = sum(p.numel() for p in self.unwrapped.parameters() if p.requires_grad)
        init_from = getattr(self.config.model, "init_from", None)  # a VLM's saved starting weights
        if self.resumed_from:
            where = f"resumed from {self.resumed_from} at step {self.step}"
        else:
            where = f"started from {init_from}" if init_from else "a new run"
        self._bar.write(
            f"mmlm: {type(self.task).__name__} {where} on {acc.num_processes} x {acc.device.type} "
            f"({acc.mixed_precision}), {trainable:,} trainable parameters, global batch {self.global_batch_size}, "
            f"{self.total_steps or '?'} steps"
        )

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
            record = self._window.record(step=self.step, epoch=self.epoch_progress,
                                         lr=train.lr * self._lr_factor_used, group_lrs=self._lrs_used,
                                         elapsed_s=self.elapsed_s, grad_norm=self._grad_norm)
            if self.metrics_log is not None:
                self.metrics_log.write(record)
            postfix = {"loss": f"{record['loss']:.4f}", "samples_s": f"{record['samples_per_s']:.1f}"}
            if self.config.train.max_minutes is not None:  # the bar's own ETA needs a step count; a budget has none
                left = max(0.0, self.config.train.max_minutes * 60 - self.elapsed_s)
                postfix["eta"] = f"{int(left // 60)}:{int(left % 60):02d}"
            self._bar.set_postfix(postfix)
            self._window = StepWindow()
        pause_start = time.perf_counter()  # evaluation and saving count neither in samples/s nor in max_minutes
        if train.eval_every and self.step % train.eval_every == 0 and "val" in self.datasets:
            self._last_metrics = evaluation.evaluate_and_log(self, "val")
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
            self._last_metrics = evaluation.evaluate_and_log(self, "val")
        for split in self.config.eval.splits:
            if split != "val" and split in self.datasets:
                self._last_metrics.update(evaluation.evaluate_and_log(self, split, track_best=False))
