"""The demo's plan: quality is set in optimizer steps; time only follows from the machine's speed.

Each stage trains its recipe's ``train.max_steps``. Its speed is measured over the first logged steps
(the very first ones, with their one-off costs, are left out) and turned into an ETA for the stage and the
whole run. ``--max-minutes`` caps the whole run: the cap is shared out over the stages in proportion to
their expected cost, each stage gets its share as ``train.max_minutes`` (training time; evaluation is
allowed for on top), and the run then says that the bars may not be reached.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable
from pathlib import Path

# Step costs relative to a captioner step (batch 32, Muon): a demo run alone ran the captioner at 4.60 steps/s and
# the generator (batch 16, Muon) at 7.30; vqa (AdamW) at 4.75 where the captioner on AdamW ran ~4.5 (Muon: 0.9x).
# The ETA of a stage that has not started yet comes from the stage before it.
RELATIVE_STEP_COST = {"captioner": 1.0, "generator": 0.63, "vqa": 0.85}
EVAL_SHARE = 0.15  # evaluation (and saving) allowed on top of each stage's training time
REPORT_SHARE = 0.05  # zero-shot classification, report pictures: a share of the whole run


@dataclasses.dataclass
class Stage:
    """One training stage of the demo: ``steps`` planned, ``steps_per_s`` once measured."""

    name: str
    steps: int
    steps_per_s: float | None = None
    done_s: float | None = None  # wall-clock seconds the finished stage took (training + evaluation)

    @property
    def relative_cost(self) -> float:
        return RELATIVE_STEP_COST.get(self.name, 1.0)


def matmul_gflops(size: int = 1024, repeats: int = 5) -> float:
    """This machine's fp32 matmul speed (best of ``repeats``, torch's current threads): the figure that places a
    run's steps/s beside other machines' (the same recipe ran 2.2 steps/s at ~63 GFLOP/s, ~9 at ~160)."""
    import time

    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # first-call costs stay out
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def format_duration(seconds: float) -> str:
    """125 -> ``"2 min 5 s"``; 42 -> ``"42 s"``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, secs = divmod(seconds, 60)
    return f"{minutes} min {secs} s" if minutes < 10 else f"{minutes + (secs >= 30)} min"


def stage_seconds(stage: Stage, reference_steps_per_s: float | None) -> float | None:
    """Expected wall-clock of a whole stage (training + evaluation allowance), or None without a speed."""
    speed = stage.steps_per_s
    if speed is None and reference_steps_per_s is not None:
        speed = reference_steps_per_s / stage.relative_cost
    if speed is None or speed <= 0:
        return None
    return stage.steps / speed * (1.0 + EVAL_SHARE)


def run_eta(stages: list[Stage], current: str, current_left_s: float, elapsed_s: float) -> float | None:
    """Seconds left for the whole run: the current stage's rest, the stages after it, the report."""
    measured = [s.steps_per_s * s.relative_cost for s in stages if s.steps_per_s]
    reference = measured[-1] if measured else None  # the machine's speed in captioner steps/s
    names = [s.name for s in stages]
    later = stages[names.index(current) + 1:]
    rest = [stage_seconds(s, reference) for s in later]
    if any(r is None for r in rest):
        return None
    total = elapsed_s + current_left_s + sum(rest)
    return current_left_s + sum(rest) + REPORT_SHARE * total


def cap_shares(stages: list[Stage], max_minutes: float) -> dict[str, float]:
    """``--max-minutes`` shared out over the stages by their expected cost: training minutes per stage."""
    if max_minutes <= 0:
        raise ValueError(f"--max-minutes: expected > 0, got {max_minutes}")
    costs = {s.name: s.steps * s.relative_cost for s in stages}
    total = sum(costs.values())
    usable = max_minutes * (1.0 - REPORT_SHARE) / (1.0 + EVAL_SHARE)
    return {name: usable * cost / total for name, cost in costs.items()}


def remaining_cap(max_minutes: float, elapsed_s: float, stages_left: list[Stage]) -> float:
    """Training minutes for the next stage from what the cap has left (at least 3 seconds' worth)."""
    left_min = max_minutes - elapsed_s / 60.0
    shares = cap_shares(stages_left, max(left_min, 1e-3))
    return max(shares[stages_left[0].name], 0.05)


class SpeedMeter:
    """Steps/s from ``(step, elapsed_s)`` log rows, leaving out everything up to the first row."""

    def __init__(self, min_steps: int = 40):
        self.min_steps = min_steps
        self.first: tuple[int, float] | None = None
        self.last: tuple[int, float] | None = None

    def add(self, step: int, elapsed_s: float) -> None:
        if self.first is None:
            self.first = (step, elapsed_s)
        self.last = (step, elapsed_s)

    @property
    def span(self) -> tuple[int, int] | None:
        return None if self.first is None or self.last is None else (self.first[0], self.last[0])

    @property
    def steps_per_s(self) -> float | None:
        """None until ``min_steps`` steps after the first row have been timed."""
        if self.first is None or self.last is None:
            return None
        steps, seconds = self.last[0] - self.first[0], self.last[1] - self.first[1]
        if steps < self.min_steps or seconds <= 0:
            return None
        return steps / seconds


class StageWatch:
    """Follows a training stage's metrics.jsonl in a thread; calls ``on_speed(meter, step)`` once when the
    speed is measured and again at half the stage (a second, steadier estimate)."""

    def __init__(self, metrics_file: Path, total_steps: int, on_speed: Callable[[SpeedMeter, int], None],
                 min_steps: int = 40, poll_s: float = 2.0):
        self.path = Path(metrics_file)
        self.total_steps = total_steps
        self.on_speed = on_speed
        self.meter = SpeedMeter(min_steps)
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"eta:{self.path.parent.name}", daemon=True)
        self._offset = 0
        self._reported: set[str] = set()

    def __enter__(self) -> "StageWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def feed(self, row: dict) -> None:
        """One log row (training rows carry ``step``, ``elapsed_s`` and ``loss``)."""
        if "loss" not in row or "elapsed_s" not in row or "step" not in row:
            return
        self.meter.add(int(row["step"]), float(row["elapsed_s"]))
        step = int(row["step"])
        if self.meter.steps_per_s is None:
            return
        if "first" not in self._reported:
            self._reported.add("first")
            self.on_speed(self.meter, step)
        elif "half" not in self._reported and step >= self.total_steps / 2:
            self._reported.add("half")
            self.on_speed(self.meter, step)

    def poll(self) -> None:
        if not self.path.is_file():
            return
        with self.path.open("rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        for line in complete.decode("utf-8", errors="replace").splitlines():
            try:
                self.feed(json.loads(line))
            except (json.JSONDecodeError, TypeError, ValueError):
                continue

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll()
            except OSError:
                continue
