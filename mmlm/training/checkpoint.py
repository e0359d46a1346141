"""Checkpoints: atomic folders (write to a temp folder, fsync, mark complete, rename) and the
trainer's save / restore / resume discovery on top of them.

Layout of ``<output_dir>/checkpoints/``::

    step_000120/           accelerate save_state (model.safetensors, optimizer.bin, scheduler.bin,
                           random_states_<rank>.pkl) + ema.safetensors + trainer_state.json + COMPLETE
    .tmp-step_000140/      a write in progress (or one that crashed): never picked up

Only folders holding the ``COMPLETE`` marker count, so a crash mid-write never resumes from
a half-written checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmlm.training.distributed import any_failed
from mmlm.training.ema import EMA
from mmlm.training.errors import CheckpointError, CheckpointWriteError, TrainingError

if TYPE_CHECKING:
    from torch import nn

    from mmlm.training.task import Task
    from mmlm.training.trainer import Trainer

COMPLETE_MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
EMA_FILE = "ema.safetensors"
TMP_PREFIX = ".tmp-"
_NAME = re.compile(r"^step_(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def checkpoint_step(path: Path) -> int:
    match = _NAME.match(Path(path).name)
    if not match:
        raise CheckpointError(f"{path}: not a checkpoint folder (expected a name like step_000123)")
    return int(match.group(1))


def is_complete(path: Path) -> bool:
    return (Path(path) / COMPLETE_MARKER).is_file()


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and is_complete(p)]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def temp_dir_for(final: Path) -> Path:
    return final.parent / f"{TMP_PREFIX}{final.name}"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush every file under ``path`` (and the folders themselves) to disk."""
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def prepare_temp_dir(final: Path) -> Path:
    """A fresh, empty temp folder next to ``final`` (a stale one from a crash is removed)."""
    tmp = temp_dir_for(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")


def finalize(tmp: Path, final: Path, marker: bool = True) -> Path:
    """Flush ``tmp``, mark it complete (checkpoints) and move it to ``final`` atomically.

    An older ``final`` is moved aside first and deleted after the swap.
    """
    if marker:
        (tmp / COMPLETE_MARKER).write_text("ok\n", encoding="utf-8")
    fsync_tree(tmp)
    old = None
    if final.exists():  # same step written again (e.g. after resume): move the old one aside first
        old = final.parent / f"{TMP_PREFIX}old-{final.name}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def discard(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


def prune(root: Path, keep_last: int, protect: Path | None = None) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints; return the deleted ones."""
    if keep_last < 1:
        return []
    old = list_checkpoints(root)[:-keep_last]
    deleted = []
    for path in old:
        if protect is not None and path.resolve() == Path(protect).resolve():
            continue
        shutil.rmtree(path, ignore_errors=True)
        deleted.append(path)
    return deleted


def read_state(path: Path) -> dict[str, Any]:
    """The trainer state of a complete checkpoint, with errors that name the folder."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not is_complete(path):
        raise CheckpointError(f"{path}: incomplete checkpoint (no {COMPLETE_MARKER} marker); it was never finished")
    try:
        return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path / STATE_FILE}: unreadable trainer state ({err})") from err


# ------------------------------------------------------------------------------------------
# The trainer's checkpoints: what a checkpoint holds, writing it, restoring it, finding it
# ------------------------------------------------------------------------------------------


def find_resume_checkpoint(resume: bool | str | Path | None, output_dir: Path) -> Path | None:
    """The checkpoint a run starts from: ``resume=True`` the latest (None: from scratch), a path that one.

    Without ``resume``, an output folder that already holds checkpoints is an error (no silent overwrite).
    """
    root = Path(output_dir) / "checkpoints"
    if resume is False or resume is None:
        existing = latest_checkpoint(root)
        if existing is not None:
            raise TrainingError(
                f"{output_dir} already holds checkpoints (latest {existing.name}); "
                "pass resume=True to continue that run, or choose another output_dir"
            )
        return None
    if resume is True:
        return latest_checkpoint(root)
    path = Path(resume)
    read_state(path)  # names the problem if the folder is missing or incomplete
    return path


def trainer_state(trainer: Trainer) -> dict[str, Any]:
    """What ``trainer_state.json`` records beside accelerate's state: position, clock, best model, layout."""
    data, train = trainer.config.data, trainer.config.train
    return {
        "format": 1,
        "step": trainer.step,
        "epoch": trainer.epoch,
        "batch_in_epoch": trainer.batch_in_epoch,
        "samples_in_epoch": trainer.batch_in_epoch * data.batch_size * trainer.accelerator.num_processes,
        "samples_seen": trainer.samples_seen,
        "elapsed_s": trainer.elapsed_s,
        "best_metric": train.best_metric,
        "best_value": trainer.best_value,
        "best_step": trainer.best_step,
        "ema_updates": trainer.ema.num_updates if trainer.ema is not None else None,
        "num_processes": trainer.accelerator.num_processes,
        "batch_size": data.batch_size,
        "grad_accum_steps": train.grad_accum_steps,
    }


def save_checkpoint(trainer: Trainer) -> Path:
    """Write an atomic checkpoint of the whole training state (every process calls this); prune old ones.

    A failure on any process raises :class:`CheckpointWriteError` on all of them and leaves the
    previous checkpoint as it was.
    """
    acc = trainer.accelerator
    root = trainer.output_dir / "checkpoints"
    target = root / checkpoint_name(trainer.step)
    tmp = temp_dir_for(target)

    def fail(what: str, error: BaseException | None) -> None:
        if not any_failed(acc, error):
            return
        if acc.is_main_process:
            discard(tmp)
        reason = f"{type(error).__name__}: {error}" if error is not None else "it failed on another process"
        previous = trainer.last_checkpoint or "none (no checkpoint was written yet)"
        raise CheckpointWriteError(
            f"could not write checkpoint {target} at step {trainer.step} ({what}: {reason}); "
            f"the last complete checkpoint is {previous}"
        ) from error

    error: BaseException | None = None
    if acc.is_main_process:
        try:
            prepare_temp_dir(target)
        except OSError as err:
            error = err
    fail("creating the temp folder", error)
    try:
        acc.save_state(str(tmp))
    except OSError as err:
        error = err
    fail("saving model, optimiser and RNG states", error)
    if acc.is_main_process:
        try:
            if trainer.ema is not None:
                trainer.ema.save(tmp / EMA_FILE)
            write_json(tmp / STATE_FILE, trainer_state(trainer))
            finalize(tmp, target)
        except OSError as err:
            error = err
    fail("finalising", error)
    trainer.last_checkpoint = target
    if acc.is_main_process:
        prune(root, trainer.config.train.keep_last, protect=target)
    acc.wait_for_everyone()
    return target


def load_checkpoint(trainer: Trainer, path: Path) -> None:
    """Restore model, optimiser, schedule, EMA, RNG and the position in the data from ``path``."""
    path = Path(path)
    state = read_state(path)
    try:
        trainer.accelerator.load_state(str(path))
    except Exception as err:  # e.g. a truncated file, or a pickle that weights_only loading refuses
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else "")  # what was blocked
        raise CheckpointError(
            f"{path}: cannot restore the training state ({type(err).__name__}: {reason}); "
            "resume from another checkpoint (resume=<path>) or start a new run"
        ) from err
    trainer.step = int(state["step"])
    trainer.epoch = int(state["epoch"])
    trainer.samples_seen = int(state["samples_seen"])
    trainer.elapsed_s = float(state["elapsed_s"])
    trainer.best_value = state.get("best_value")
    trainer.best_step = state.get("best_step")
    per_batch = trainer.config.data.batch_size * trainer.accelerator.num_processes
    samples_in_epoch = int(state["samples_in_epoch"])
    if samples_in_epoch % per_batch:
        raise TrainingError(
            f"{path}: stopped {samples_in_epoch} samples into epoch {trainer.epoch}, which is not a whole number of "
            f"batches of {per_batch} (data.batch_size x processes now); resume with the original batch size"
        )
    trainer.batch_in_epoch = samples_in_epoch // per_batch
    if trainer.micro_batches_per_epoch is not None and trainer.batch_in_epoch >= trainer.micro_batches_per_epoch:
        trainer.epoch, trainer.batch_in_epoch = trainer.epoch + 1, 0
    if trainer.ema is not None:
        ema_file = path / EMA_FILE
        if ema_file.is_file():
            trainer.ema.load(ema_file, state.get("ema_updates") or 0)
        else:  # EMA switched on for a run that had none: start it from the restored weights
            trainer.ema = EMA(trainer.unwrapped, trainer.config.train.ema_decay)
    trainer.last_checkpoint = path
    trainer.resumed_from = path


def save_model(task: Task, model: nn.Module, ema: EMA | None, target: Path,
               best: dict[str, Any] | None = None) -> None:
    """``task.save_model`` of the unwrapped model (EMA weights when enabled), swapped in atomically."""
    tmp = prepare_temp_dir(target)
    try:
        with ema.applied() if ema is not None else contextlib.nullcontext():
            task.save_model(model, tmp)
        if best is not None:
            write_json(tmp / "best_metric.json", best)
        finalize(tmp, target, marker=False)
    except BaseException:
        discard(tmp)
        raise
