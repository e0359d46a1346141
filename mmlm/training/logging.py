"""The metrics log: ``metrics.jsonl`` (+ TensorBoard when installed) and the window stats between records."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

from mmlm.eval.plots import read_metrics_jsonl


class MetricsLog:
    """Appends JSON records to ``metrics.jsonl`` and, when installed, to TensorBoard."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = Path(path)
        kept = []
        if resume_step is not None:  # drop records a crashed run wrote after its last checkpoint
            kept = [r for r in _records_before_a_crash(self.path) if r.get("step", 0) <= resume_step]
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


def _records_before_a_crash(path: Path) -> list[dict[str, Any]]:
    """The records of a run being resumed: none when the folder is new (a checkpoint resumed elsewhere), and
    without a last line cut short by the crash (a bad line anywhere else is still an error)."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):  # the write the crash interrupted
        text = text[: text.rfind("\n") + 1]
        path.write_text(text, encoding="utf-8")
    return read_metrics_jsonl(path)


@dataclasses.dataclass
class StepWindow:
    """Steps since the last log record: mean loss and samples/s (pauses are taken out of ``start``)."""

    loss_sum: float = 0.0
    steps: int = 0
    samples: int = 0
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def add(self, loss: float, samples: int) -> None:
        self.loss_sum += loss
        self.steps += 1
        self.samples += samples

    def record(self, *, step: int, epoch: float, lr: float, group_lrs: dict[str, float], elapsed_s: float,
               grad_norm: float | None) -> dict[str, Any]:
        """The log record of this window; per-group LRs only when they differ from the base one."""
        seconds = max(time.perf_counter() - self.start, 1e-9)
        record = {
            "step": step,
            "epoch": epoch,
            "loss": self.loss_sum / self.steps,
            "lr": lr,
            "samples_per_s": self.samples / seconds,
            "elapsed_s": round(elapsed_s, 3),
        }
        if any(not math.isclose(value, lr) for value in group_lrs.values()):
            record.update({f"lr/{name}": value for name, value in group_lrs.items()})
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        return record
