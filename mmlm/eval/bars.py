"""Quality bars: the figures a run must reach, and how a figure is written beside its bar.

A :class:`Bar` names a metric key of a run's results (``"test/exact_match"``), a label for people and
the threshold. The demo, its report and ``benchmarks/time_to_quality.py`` share the bars below, so a
figure is judged the same way everywhere. Rates print as percentages, counts as integers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping

# Metric names that are rates in [0, 1] (shown as percentages) and counts (shown as integers).
RATE_NAMES = ("exact_match", "accuracy", "fidelity", "round_trip", "bleu", "rouge", "meteor", "f1", "precision",
              "recall", "hit_rate")
COUNT_NAMES = ("step", "steps", "samples", "num_", "images", "skipped", "n_", "size")


@dataclasses.dataclass(frozen=True)
class Bar:
    """``key`` (a metric of the stage's results) must reach ``threshold`` (a rate in [0, 1])."""

    key: str
    label: str
    threshold: float

    def met(self, value: float | None) -> bool:
        return value is not None and math.isfinite(value) and value >= self.threshold

    def describe(self, value: float | None) -> str:
        """``"exact match, test 97.1% (bar 95%)"``; a missing figure reads ``not measured``."""
        shown = "not measured" if value is None else percent(value)
        return f"{self.label} {shown} (bar {percent(self.threshold, digits=0)})"


# The demo's bars, per stage (keys of the stage's metrics in metrics.json).
BARS: dict[str, tuple[Bar, ...]] = {
    "captioner": (Bar("test/exact_match", "exact match, test", 0.95),
                  Bar("compositional/exact_match", "exact match, compositional", 0.85)),
    "zero_shot_classification": (Bar("accuracy", "zero-shot colour+kind accuracy", 0.90),),
    "generator": (Bar("test/fidelity", "prompt fidelity, test", 0.90),),
    "vqa": (Bar("test/accuracy", "VQA accuracy, test", 0.95),
            Bar("compositional/accuracy", "VQA accuracy, compositional", 0.85),
            Bar("test/accuracy_count", "VQA counting accuracy, test", 0.90)),  # `mmlm demo --vqa` only
}


def percent(value: float, digits: int = 1) -> str:
    """0.9712 -> ``"97.1%"``."""
    return f"{100.0 * value:.{digits}f}%"


def is_rate(name: str) -> bool:
    return any(part in name for part in RATE_NAMES)


def is_count(name: str) -> bool:
    leaf = name.rsplit("/", 1)[-1]
    return leaf.startswith(COUNT_NAMES) or leaf.endswith(("_steps", "_images", "_samples", "steps"))


def format_metric(name: str, value) -> str:
    """A metric as a person reads it: rates in [0, 1] as percentages, counts as integers with separators."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return str(value)
    if is_count(name) and float(value).is_integer():
        return f"{int(value):,}"
    if is_rate(name) and 0.0 <= value <= 1.0:
        return percent(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) < 1e4 else f"{value:.4g}"


def bar_results(stage: str, metrics: Mapping[str, float]) -> list[tuple[Bar, float | None, bool]]:
    """Each bar of ``stage`` with the stage's figure and whether it is met."""
    rows = []
    for bar in BARS[stage]:
        value = metrics.get(bar.key)
        value = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        rows.append((bar, value, bar.met(value)))
    return rows


def steps_to_bar(curve: Iterable[tuple[int, float]], threshold: float) -> int | None:
    """The first step of ``(step, value)`` points (in step order) whose value reaches ``threshold``."""
    for step, value in sorted(curve):
        if value is not None and value >= threshold:
            return int(step)
    return None
