"""Atomic checkpoint folders: write to a temp folder, fsync, mark complete, rename.

Layout of ``<output_dir>/checkpoints/``::

    step_000120/           accelerate save_state (model.safetensors, optimizer.bin, scheduler.bin,
                           random_states_<rank>.pkl) + ema.safetensors + trainer_state.json + COMPLETE
    .tmp-step_000140/      a write in progress (or one that crashed): never picked up

Only folders holding the ``COMPLETE`` marker count, so a crash mid-write never resumes from
a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

COMPLETE_MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
EMA_FILE = "ema.safetensors"
TMP_PREFIX = ".tmp-"
_NAME = re.compile(r"^step_(\d+)$")


class CheckpointError(OSError):
    """A checkpoint could not be written or read; the message names the folder."""


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
