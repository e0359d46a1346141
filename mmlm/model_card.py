"""Model cards: the ``README.md`` of a saved model folder, in the Hugging Face Hub's format.

A YAML header (``library_name: mmlm``, ``tags``, ``pipeline_tag``) and a body that says what the model is
(read from the folder's ``config.json``), how to use it, and, when the trainer writes it, how it was made:
recipe, data, steps, the final metrics and a picture of its outputs (copied into the folder).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import yaml

CARD_NAME = "README.md"
PIPELINE_TAGS = {"VisionLanguageModel": "image-text-to-text", "TextToImage": "text-to-image"}
TASK_TAGS = {"VisionLanguageModel": ["image-to-text", "image-captioning", "vision-language"],
             "TextToImage": ["text-to-image", "diffusion"]}


def _describe(meta: Mapping[str, Any]) -> list[str]:
    """One line per part of the model, from its config.json."""
    config = meta.get("config", {})
    lines = []
    if meta.get("model_class") == "VisionLanguageModel":
        vision, projector, language = config.get("vision", {}), config.get("projector", {}), config.get("language", {})
        lm = language.get("name_or_path") or language.get("config", {}).get("model_type", "?")
        lines += [f"- vision encoder: timm `{vision.get('name', '?')}`",
                  f"- projector: `{projector.get('type', '?')}`",
                  f"- language model: `{lm}`" + ("" if language.get("name_or_path") else " (trained from scratch)")]
        if config.get("prompt"):
            lines.append(f"- default prompt: `{config['prompt']}`")
    else:
        for key in ("denoiser", "text_encoder", "autoencoder"):
            part = config.get(key)
            if isinstance(part, Mapping):
                kind = part.get("type") or part.get("name") or part.get("model_type") or "configured"
                lines.append(f"- {key.replace('_', ' ')}: `{kind}`")
    return lines or ["- see `config.json`"]


def _usage(model_class: str, folder_name: str) -> str:
    if model_class == "VisionLanguageModel":
        return (f"```bash\nmmlm caption {folder_name} image.png\nmmlm classify {folder_name} image.png "
                "--labels cat,dog\n```\n\nWith transformers (mmlm installed):\n\n```python\nimport mmlm.hf\n"
                "from transformers import AutoModelForImageTextToText, AutoProcessor\n"
                f"model = AutoModelForImageTextToText.from_pretrained(\"{folder_name}\")\n"
                f"processor = AutoProcessor.from_pretrained(\"{folder_name}\")\n```\n")
    return f"```bash\nmmlm generate {folder_name} \"a red circle\" --out red_circle.png\n```\n"


def _metric_rows(metrics: Mapping[str, Any]) -> list[str]:
    rows = ["| metric | value |", "|---|---|"]
    for key, value in sorted(metrics.items()):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        rows.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
    return rows if len(rows) > 2 else []


def write_model_card(folder: str | Path, *, recipe: str | None = None, data: str | None = None,
                     steps: int | None = None, metrics: Mapping[str, Any] | None = None,
                     image: str | Path | None = None, tags: list[str] | None = None) -> Path:
    """Write ``folder/README.md`` for the model saved in ``folder``; returns its path.

    ``recipe`` (the run's config file, copied as ``recipe.yaml``, or a name), ``data`` (source), ``steps`` and ``metrics`` describe the run that made the
    model; ``image`` (a PNG of its outputs) is copied next to the card and shown in it.
    """
    folder = Path(folder)
    meta = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    model_class = meta.get("model_class") or meta.get("_class_name") or "VisionLanguageModel"
    header = {"library_name": "mmlm", "pipeline_tag": PIPELINE_TAGS.get(model_class, "image-text-to-text"),
              "tags": ["mmlm", *TASK_TAGS.get(model_class, []), *(tags or [])]}
    body = [f"# {folder.resolve().name}", "", f"An mmlm `{model_class}`.", "", *_describe(meta), "",
            "## Usage", "", _usage(model_class, str(folder))]
    if recipe is not None and Path(recipe).is_file():  # the run's whole config travels with the model
        if Path(recipe).resolve() != (folder / "recipe.yaml").resolve():
            shutil.copyfile(recipe, folder / "recipe.yaml")
        recipe = "recipe.yaml (beside this card; `mmlm train recipe.yaml` repeats the run)"
    training = [f"- {name}: `{value}`" for name, value in (("recipe", recipe), ("data", data), ("steps", steps))
                if value is not None]
    if training:
        body += ["## Training", "", *training, ""]
    rows = _metric_rows(metrics or {})
    if rows:
        body += ["## Evaluation", "", *rows, ""]
    if image is not None and Path(image).is_file():
        target = folder / f"sample{Path(image).suffix or '.png'}"
        if Path(image).resolve() != target.resolve():
            shutil.copyfile(image, target)
        body += ["## Samples", "", f"![samples]({target.name})", ""]
    text = "---\n" + yaml.safe_dump(header, sort_keys=False, allow_unicode=True) + "---\n\n" + "\n".join(body)
    path = folder / CARD_NAME
    path.write_text(text.rstrip() + "\n", encoding="utf-8")
    return path


def read_model_card(folder: str | Path) -> tuple[dict[str, Any], str]:
    """(YAML header, body) of ``folder/README.md``; ValueError when it has no ``---`` header."""
    text = (Path(folder) / CARD_NAME).read_text(encoding="utf-8")
    if not text.startswith("---\n") or "\n---\n" not in text[4:]:
        raise ValueError(f"{Path(folder) / CARD_NAME}: no YAML header between '---' lines")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head) or {}, body
