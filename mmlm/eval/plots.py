"""Figures for reports: captioned image grids (PIL), loss curves and confusion matrices (matplotlib, Agg)."""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def to_pil(image: Any) -> Image.Image:
    """An RGB PIL image from a PIL image, an HWC/HW numpy array or a CHW/HW torch tensor.

    Float arrays and tensors are taken to be in [0, 1] (clamped); integer ones in [0, 255].
    """
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if hasattr(image, "detach"):  # torch tensor, CHW -> HWC
        array = image.detach().cpu().numpy()
        if array.ndim == 3:
            array = array.transpose(1, 2, 0)
    elif isinstance(image, np.ndarray):
        array = image
    else:
        raise TypeError(f"expected a PIL image, numpy array or torch tensor, got {type(image).__name__}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"expected an image shaped HW, HWC or CHW with 1, 3 or 4 channels, got {array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        array = np.round(np.clip(array, 0.0, 1.0) * 255.0)
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).convert("RGB")


def _wrap(text: str, font: ImageFont.ImageFont, width: int, draw: ImageDraw.ImageDraw) -> list[str]:
    """Greedy wrap by pixel width; breaks inside words when a word (or unspaced CJK text) is too long."""
    lines, line = [], ""
    for char in text.replace("\n", " "):
        candidate = line + char
        if line and draw.textlength(candidate, font=font) > width:
            cut = line.rfind(" ")
            if char != " " and cut > 0:
                lines.append(line[:cut])
                line = line[cut + 1 :] + char
            else:
                lines.append(line.rstrip())
                line = char.lstrip()
        else:
            line = candidate
    if line.strip():
        lines.append(line.strip())
    return lines


def image_grid(
    images: Sequence[Any],
    captions: Sequence[str] | None = None,
    ncols: int | None = None,
    path: str | Path | None = None,
    *,
    cell_size: int = 128,
    font_size: int = 12,
    max_caption_lines: int = 4,
) -> Image.Image:
    """Images in a grid, each scaled to ``cell_size`` (nearest, so tiny samples stay crisp) with its caption
    wrapped underneath. Saved to ``path`` when given. Glyphs missing from the default font (e.g. Chinese)
    render as boxes; they never raise."""
    if not len(images):
        raise ValueError("image_grid: expected at least one image, got none")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"image_grid: {len(images)} images but {len(captions)} captions")
    ncols = ncols or min(len(images), 8)
    if ncols < 1:
        raise ValueError(f"image_grid: ncols must be >= 1, got {ncols}")
    nrows = math.ceil(len(images) / ncols)
    font = ImageFont.load_default(size=font_size)
    line_height = font_size + 3
    text_height = (max_caption_lines * line_height + 4) if captions is not None else 0
    pad = 4
    cell_w, cell_h = cell_size + pad, cell_size + text_height + pad
    grid = Image.new("RGB", (ncols * cell_w + pad, nrows * cell_h + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        x, y = pad + (i % ncols) * cell_w, pad + (i // ncols) * cell_h
        tile = to_pil(image)
        scale = cell_size / max(tile.size)
        size = (max(1, round(tile.width * scale)), max(1, round(tile.height * scale)))
        resample = Image.NEAREST if scale >= 1 else Image.BILINEAR
        grid.paste(tile.resize(size, resample), (x, y))
        if captions is not None:
            lines = _wrap(str(captions[i]), font, cell_size, draw)
            if len(lines) > max_caption_lines:
                lines = lines[: max_caption_lines - 1] + [lines[max_caption_lines - 1][:-1] + "…"]
            for j, line in enumerate(lines):
                draw.text((x, y + cell_size + 2 + j * line_height), line, fill="black", font=font)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
    return grid


def read_metrics_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl file; a bad line raises ValueError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: invalid JSON ({err.msg})") from err
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextlib.contextmanager
def _missing_glyphs_ok():
    """Labels in scripts the installed fonts lack (e.g. Chinese) render as boxes; don't warn about each glyph."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from")
        yield


def plot_loss_curve(
    metrics_jsonl_path: str | Path, png_path: str | Path, keys: Sequence[str] | None = None
) -> Path:
    """Plot loss against step from a metrics.jsonl of ``{"step": .., "loss": .., ...}`` rows.

    ``keys`` defaults to every numeric key ending in "loss" (e.g. "loss" and "val/loss"); rows lacking a key
    are skipped for that curve. The training loss also gets a smoothed line (EMA) when it has many points.
    """
    rows = read_metrics_jsonl(metrics_jsonl_path)
    numeric = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    if keys is None:
        keys = sorted({k for row in rows for k, v in row.items() if k.endswith("loss") and numeric(v)})
    curves = {}
    for key in keys:
        points = [(row["step"], row[key]) for row in rows if numeric(row.get(key)) and numeric(row.get("step"))]
        if points:
            curves[key] = points
    if not curves:
        raise ValueError(f"{metrics_jsonl_path}: no rows with a numeric 'step' and any of {list(keys) or ['*loss']}")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for key, points in curves.items():
        steps, values = zip(*points)
        ax.plot(steps, values, label=key, alpha=0.45 if len(points) > 20 else 1.0, linewidth=1)
        if len(points) > 20:
            smoothed, value = [], values[0]
            for v in values:
                value = 0.9 * value + 0.1 * v
                smoothed.append(value)
            ax.plot(steps, smoothed, label=f"{key} (smoothed)", linewidth=1.8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save_figure(plt, fig, png_path)


def save_confusion_matrix_png(matrix: Any, labels: Sequence[str], path: str | Path, normalize: bool = False) -> Path:
    """Confusion matrix heatmap (rows: true class, columns: predicted) with the counts written in the cells.

    ``normalize=True`` colours by the fraction of each true class (row) while still printing counts.
    """
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] != len(labels):
        raise ValueError(f"confusion matrix must be square with {len(labels)} rows (one per label), got {matrix.shape}")
    colours = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1) if normalize else matrix
    plt = _pyplot()
    side = min(2.0 + 0.45 * len(labels), 14.0)
    fig, ax = plt.subplots(figsize=(side, side), dpi=100)
    ax.imshow(colours, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels=[str(label) for label in labels], rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels=[str(label) for label in labels])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(labels) <= 30:
        threshold = colours.max() / 2 if colours.size else 0
        for i in range(len(labels)):
            for j in range(len(labels)):
                value = matrix[i, j]
                text = f"{value:.2g}" if np.issubdtype(matrix.dtype, np.floating) else str(value)
                ax.text(j, i, text, ha="center", va="center", fontsize=8,
                        color="white" if colours[i, j] > threshold else "black")
    return _save_figure(plt, fig, path)


def _save_figure(plt, fig, path: str | Path) -> Path:
    """Lay out, write and close a matplotlib figure (parents created, missing glyphs tolerated)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _missing_glyphs_ok():
        fig.tight_layout()
        fig.savefig(path)
    plt.close(fig)
    return path
