"""``train.report_to``: the metrics log mirrored to experiment trackers through accelerate's tracker classes.

``report_to: [tensorboard, wandb, mlflow]``. Every record the trainer logs (loss, learning rate, samples/s at each
``log_every``; evaluation metrics at each evaluation) goes to each tracker at its step; with an evaluation
record, the pictures that evaluation wrote (captions under test images, generated grids: ``eval/*_step_N/*.png``)
go too (TensorBoard / W&B images, MLflow artifacts). Runs' settings come from the usual environment variables
(``WANDB_MODE=offline``, ``WANDB_PROJECT``, ``MLFLOW_TRACKING_URI``, ...); without them W&B writes under the
run folder and MLflow to ``<output_dir>/mlflow.db`` (SQLite)
with artifacts in ``<output_dir>/mlartifacts``. TensorBoard here is accelerate's tracker in
``<output_dir>/trackers/tensorboard`` (scalars and images), beside the metrics log's own scalar-only writer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mmlm.config import ConfigError

TRACKERS = ("tensorboard", "wandb", "mlflow")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_report_to(names: list[str]) -> list[str]:
    """The tracker names, validated (unknown name or missing package: ConfigError naming it)."""
    import importlib.util

    names = [names] if isinstance(names, str) else list(names or [])
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"train.report_to: unknown tracker {name!r}; expected some of {', '.join(TRACKERS)}")
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise ConfigError(f"train.report_to: {name} is not installed (pip install {PACKAGES[name]}, "
                              "or pip install \"mmlm[trackers]\")")
    return names


def _build(name: str, output_dir: Path, run_name: str):
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    if name == "tensorboard":
        return TensorBoardTracker(run_name, output_dir / "trackers" / "tensorboard")
    if name == "wandb":
        return WandBTracker(os.environ.get("WANDB_PROJECT", "mmlm"), name=run_name,
                            dir=os.environ.get("WANDB_DIR", str(output_dir)))
    artifacts = None
    if "MLFLOW_TRACKING_URI" not in os.environ:  # a local store in the run folder (MLflow 3 wants a database)
        import mlflow

        mlflow.set_tracking_uri(f"sqlite:///{(output_dir / 'mlflow.db').resolve()}")
        artifacts = (output_dir / "mlartifacts").resolve().as_uri()
    return MLflowTracker(experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", "mmlm"), logging_dir=artifacts,
                         run_name=run_name)


class TrackedMetricsLog:
    """A metrics log (``write`` / ``close``) whose records also go to the trackers in ``report_to``."""

    def __init__(self, log, report_to: list[str], output_dir: Path, config: dict[str, Any] | None = None):
        self.log, self.output_dir = log, Path(output_dir)
        self.trackers = []
        for name in check_report_to(report_to):
            tracker = _build(name, self.output_dir, self.output_dir.name)
            tracker.start()
            if config:
                tracker.store_init_configuration(_flat(config))
            self.trackers.append(tracker)

    def __getattr__(self, name: str):  # everything else is the metrics log's
        return getattr(self.log, name)

    def write(self, record: dict[str, Any]) -> None:
        self.log.write(record)
        step = int(record["step"])
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))
                   and not isinstance(v, bool)}
        pictures = self._pictures(step) if any("/" in k and not k.startswith("lr/") for k in scalars) else []
        for tracker in self.trackers:
            tracker.log(scalars, step=step)
            if pictures:
                _log_pictures(tracker, pictures, step)

    def _pictures(self, step: int) -> list[Path]:
        return sorted(self.output_dir.glob(f"eval/*_step_{step:06d}/*.png"))

    def close(self) -> None:
        self.log.close()
        for tracker in self.trackers:
            tracker.finish()


def _log_pictures(tracker, pictures: list[Path], step: int) -> None:
    if tracker.name == "mlflow":
        for path in pictures:
            tracker.log_artifact(str(path), artifact_path=f"eval/step_{step:06d}/{path.parent.name}")
        return
    import numpy as np
    from PIL import Image

    for path in pictures:
        image = np.asarray(Image.open(path).convert("RGB"))
        key = f"{path.parent.name.split('_step_')[0]}/{path.stem}"
        if tracker.name == "tensorboard":
            tracker.log_images({key: image[None]}, step=step, dataformats="NHWC")
        else:
            tracker.log_images({key: [image]}, step=step)


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"train.lr": ...} with values trackers store (numbers, strings, bools)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            out[name] = "None" if value is None else value
        else:
            out[name] = str(value)
    return out
