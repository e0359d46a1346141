"""The Python entry points: train, evaluate and load, for every task."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmlm.config import ConfigError, RunConfig, load_config, read_yaml, build_run_config


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
    from mmlm.train import Trainer

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


def model_kind(path: str | Path) -> str:
    """'vision_language' or 'text_to_image', read from a saved folder's config.json."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a saved mmlm model (no config.json)")
    try:
        meta = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_file}: invalid JSON ({err})") from err
    class_name = meta.get("model_class") or meta.get("_class_name") if isinstance(meta, dict) else None
    if class_name not in _MODEL_KINDS:
        raise ValueError(f"{config_file}: model class is {class_name!r}; expected one of {', '.join(_MODEL_KINDS)} "
                         "(was this folder saved by mmlm?)")
    return _MODEL_KINDS[class_name]


_MODEL_KINDS = {"VisionLanguageModel": "vision_language", "TextToImage": "text_to_image"}


def load_vlm(path: str | Path):
    from mmlm.models import VisionLanguageModel

    path = _model_folder(path)
    if model_kind(path) != "vision_language":
        raise ValueError(f"{path} holds a text-to-image model; captioning and classification need a vision-language model")
    return VisionLanguageModel.from_pretrained(path)


def load_text_to_image(path: str | Path):
    from mmlm.models.diffusion import TextToImage

    path = _model_folder(path)
    if model_kind(path) != "text_to_image":
        raise ValueError(f"{path} holds a vision-language model; generation needs a text-to-image model")
    return TextToImage.from_pretrained(path)


def _model_folder(path: str | Path) -> Path:
    """Accept a run folder (uses its model/) as well as a saved model folder."""
    path = Path(path)
    if not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
        return path / "model"
    return path


def load(path: str | Path):
    """Load whatever model mmlm saved in ``path``: a VisionLanguageModel or a TextToImage."""
    folder = _model_folder(path)
    return load_vlm(folder) if model_kind(folder) == "vision_language" else load_text_to_image(folder)
