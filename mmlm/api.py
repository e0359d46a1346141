"""The Python entry points: train, evaluate and load, for every task (the facade: only cli.py and users import it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmlm.config import ConfigError, RunConfig, build_run_config, load_config, read_yaml
from mmlm.tasks.common import (  # noqa: F401  (model_kind: part of the API)
    load_text_to_image_model,
    load_vision_language_model,
    model_folder,
    model_kind,
)


def get_task(config: RunConfig):
    """The Task object that plugs ``config.task`` into the shared Trainer."""
    from mmlm.tasks import TASKS

    if config.task not in TASKS:
        raise ConfigError(f"unknown task '{config.task}'; expected one of {', '.join(TASKS)}")
    return TASKS[config.task](config)


def train(config: RunConfig | str | Path | dict, overrides: list[str] = (), *, resume: bool | str = False) -> dict:
    """Train a recipe through the shared harness; returns the final metrics and paths.

    >>> mmlm.train("configs/shapes_captioner.yaml", ["train.max_minutes=5"])
    """
    from mmlm.training import Trainer

    if not isinstance(config, RunConfig):
        config = load_config(config, list(overrides))
    return Trainer(config, get_task(config), resume=resume).fit()


def _run_config_for(path: Path, data: str | None, overrides: list[str]) -> tuple[RunConfig, Path | None]:
    """The config of a run folder (or of the run a saved model folder belongs to)."""
    for candidate in (path / "config.yaml", path.parent / "config.yaml"):
        if candidate.is_file():
            raw = read_yaml(candidate)
            break
    else:
        raw = None
    if raw is None:
        # A bare saved model: evaluate it with default settings for its kind.
        kind = model_kind(path)
        raw = {"task": "diffusion" if kind == "text_to_image" else "captioning"}
    from mmlm.config import apply_overrides

    raw = apply_overrides(raw, list(overrides))
    if data:
        raw.setdefault("data", {})["source"] = data
    return build_run_config(raw), None


def evaluate(run: str | Path, *, data: str | None = None, split: str = "test", out_dir: str | Path | None = None,
             overrides: list[str] = ()) -> dict[str, Any]:
    """Evaluate a run folder (its final model) or a saved model folder on a data split."""
    from mmlm.eval.report import write_run_report

    run = Path(run)
    if not run.exists():
        raise FileNotFoundError(f"no such run or model folder: {run}")
    config, _ = _run_config_for(run, data, overrides)
    model_dir = run / "model" if (run / "model").is_dir() else run
    out = Path(out_dir) if out_dir else (run / f"eval_{split}")
    task = get_task(config)
    model = load(model_dir)
    datasets = task.build_datasets(model)
    if split not in datasets:
        raise ValueError(f"split '{split}' not available for data '{config.data.source}'; have {', '.join(datasets)}")
    out.mkdir(parents=True, exist_ok=True)
    metrics = task.evaluate(model, datasets[split], out, split)
    write_run_report(out, f"{config.task} evaluation of {model_dir} on '{split}'", metrics, sorted(out.glob("*.png")))
    return metrics


def load_vlm(path: str | Path):
    """The VisionLanguageModel in a saved model folder or a run folder."""
    return load_vision_language_model(path)


def load_text_to_image(path: str | Path):
    """The TextToImage model in a saved model folder or a run folder."""
    return load_text_to_image_model(path)


def load(path: str | Path):
    """Load whatever model mmlm saved in ``path``: a VisionLanguageModel or a TextToImage."""
    folder = model_folder(path)
    return load_vlm(folder) if model_kind(folder) == "vision_language" else load_text_to_image(folder)
