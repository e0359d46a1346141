"""DataLoader workers that fail loudly: a skip log every worker shares, and what each worker is reading, so a
crashed or hung worker is reported with the file it was on."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Iterable, Iterator

from torch.utils.data import get_worker_info

from mmlm.errors import DataError


def _remove_if_owner(path: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:
        try:
            os.remove(path)
        except OSError:
            pass


class SkipLog:
    """(source, reason) pairs appended to a temp file that every DataLoader worker shares."""

    def __init__(self):
        fd, self.path = tempfile.mkstemp(prefix="mmlm-skipped-", suffix=".tsv")
        os.close(fd)
        self._finalizer = weakref.finalize(self, _remove_if_owner, self.path, os.getpid())

    def __getstate__(self):
        return {"path": self.path}  # workers append to the same file; only the creator deletes it

    def __setstate__(self, state):
        self.path = state["path"]

    def add(self, source: str, reason: str) -> None:
        line = f"{source}\t{reason}".replace("\n", " ") + "\n"
        with open(self.path, "a", encoding="utf-8") as f:  # one small O_APPEND write: atomic across processes
            f.write(line)

    def entries(self) -> list[tuple[str, str]]:
        """Unique (source, reason) pairs, first occurrence first."""
        try:
            lines = Path(self.path).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        seen: dict[str, str] = {}
        for line in lines:
            source, _, reason = line.partition("\t")
            seen.setdefault(source, reason)
        return list(seen.items())


class DataWorkerError(DataError):
    """A DataLoader worker died or hung; the message names the item(s) it was reading."""


class WorkerProgress:
    """What each DataLoader worker process is reading right now: one small file per worker pid.

    A worker that crashes (a decoder segfault, the OOM killer) or hangs takes its Python state with
    it; this record survives it, so the error can name the file instead of a bare "worker exited
    unexpectedly" or "DataLoader timed out". In the main process nothing is written.
    """

    def __init__(self):
        self.folder = tempfile.mkdtemp(prefix="mmlm-workers-")
        self._finalizer = weakref.finalize(self, _remove_tree_if_owner, self.folder, os.getpid())

    def __getstate__(self):
        return {"folder": self.folder}  # workers write into the same folder; only the creator deletes it

    def __setstate__(self, state):
        self.folder = state["folder"]

    def start(self, source: str) -> None:
        if get_worker_info() is not None:
            Path(self.folder, str(os.getpid())).write_text(source, encoding="utf-8", errors="replace")

    def done(self) -> None:
        if get_worker_info() is not None:
            Path(self.folder, str(os.getpid())).write_text("", encoding="utf-8")

    def in_flight(self, alive_only: bool = False) -> dict[int, str]:
        """{worker pid: the item it started and has not finished}; ``alive_only`` drops exited workers."""
        found = {}
        for path in Path(self.folder).glob("[0-9]*"):
            try:
                source = path.read_text(encoding="utf-8")
            except OSError:
                continue
            if source and (not alive_only or _is_running(int(path.name))):
                found[int(path.name)] = source
        return found

    def forget(self, pid: int) -> None:
        Path(self.folder, str(pid)).unlink(missing_ok=True)


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) still answers kill(0)
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return True


def _remove_tree_if_owner(path: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:
        shutil.rmtree(path, ignore_errors=True)


_WORKER_DIED = re.compile(r"DataLoader worker \(pids?\(?s?\)? ([\d, ]+)\)")


def explain_worker_failure(error: BaseException, dataset: Any) -> DataWorkerError | None:
    """A DataWorkerError naming what the dead or stuck worker(s) were reading, or None if ``error`` is not
    a worker death / timeout (or ``dataset`` does not track its workers)."""
    progress = getattr(dataset, "worker_progress", None)
    text = str(error)
    if progress is None or not isinstance(error, RuntimeError):
        return None
    in_flight = progress.in_flight()
    died = _WORKER_DIED.search(text)
    if died:
        pids = [int(p) for p in re.findall(r"\d+", died.group(1))]
        items = [f"pid {pid} was reading {in_flight[pid]}" for pid in pids if pid in in_flight]
        for pid in pids:
            progress.forget(pid)
        what = "; ".join(items) or f"it had finished its last item (pids {', '.join(map(str, pids))})"
        return DataWorkerError(f"a DataLoader worker died: {what}. Check that file (a decoder crash) or the "
                               f"memory limit; data.num_workers=0 reproduces it in the main process [{text.strip()}]")
    if "timed out" in text:
        in_flight = progress.in_flight(alive_only=True)
        items = "; ".join(f"pid {pid} is reading {source}" for pid, source in sorted(in_flight.items()))
        return DataWorkerError(f"{text.strip()}: {items or 'no worker was inside an item (a stalled collate?)'}")
    return None


def guard_workers(batches: Iterable, dataset: Any) -> Iterator:
    """Iterate ``batches`` (a DataLoader over ``dataset``); a dead or stuck worker raises a DataWorkerError
    naming the item it was reading, instead of torch's bare RuntimeError."""
    iterator = iter(batches)  # held here, so its workers are still alive while the failure is explained
    try:
        yield from iterator
    except RuntimeError as err:
        explained = explain_worker_failure(err, dataset)
        if explained is None:
            raise
        # The traceback's frames hold the loader iterator; dropping them lets it shut its workers down now,
        # instead of in a garbage-collection pass where its queues may already be torn down (a 5 s join each).
        err.__traceback__ = None
        del iterator
        raise explained from err
