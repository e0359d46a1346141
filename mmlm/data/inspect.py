"""Reports behind ``mmlm data inspect MANIFEST`` and ``mmlm data shapes --out DIR``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmlm.config import ShapesConfig

from .datasets import summarize
from .images import DEFAULT_MAX_PIXELS
from .shapes import generate_shapes, write_dataset
from .sources import DataError, scan_records


def _histogram(title: str, counts: dict, limit: int = 12) -> list[str]:
    lines = [f"{title}:"]
    items = list(counts.items())
    for key, value in items[:limit]:
        lines.append(f"  {key:<24} {value}")
    if len(items) > limit:
        lines.append(f"  ... {len(items) - limit} more")
    return lines if items else [f"{title}: none"]


def format_summary(summary: dict, bad_rows: list[str] = ()) -> str:
    """The text of a ``summarize`` dict plus the bad rows (messages naming file and row), one per line."""
    cap, length = summary["captions_per_record"], summary["caption_length"]
    lines = [
        f"records: {summary['records']}",
        f"captions: {summary['captions']} (per record min {cap['min']}, mean {cap['mean']}, max {cap['max']})",
        f"caption length (words): min {length['min']}, median {length['median']}, mean {length['mean']}, "
        f"max {length['max']}",
    ]
    lines += _histogram("labels", summary["labels"])
    lines += _histogram("image sizes", summary["image_sizes"])
    lines += _histogram("image modes", summary["image_modes"])
    bad = list(bad_rows) + [f"{source}: {reason}" for source, reason in summary["bad_images"]]
    lines.append(f"bad rows: {len(bad)}")
    lines += [f"  {message}" for message in bad]
    return "\n".join(lines)


def inspect_manifest(path: Any, format: str = "auto", *, allow_absolute_paths: bool = False,
                     label_field: str = "label", max_pixels: int = DEFAULT_MAX_PIXELS) -> str:
    """Read every row of a data source (never stopping at a bad one), decode every image, and report."""
    records, bad_rows = [], []
    for item in scan_records(path, format, allow_absolute_paths=allow_absolute_paths, label_field=label_field):
        if isinstance(item, DataError):
            bad_rows.append(str(item))
        else:
            records.append(item)
    summary = summarize(records, max_pixels=max_pixels)
    return f"source: {path}\n" + format_summary(summary, bad_rows)


def write_shapes_cli(out: str | Path, n: int, seed: int = 0, *, split: str = "train", image_size: int = 64,
                     min_shapes: int = 1, max_shapes: int = 3, language: str = "en") -> str:
    """Generate ``n`` shapes images into ``out`` (PNGs + manifest.jsonl) and return a short summary."""
    config = ShapesConfig(image_size=image_size, min_shapes=min_shapes, max_shapes=max_shapes,
                          language=language, seed=seed)
    records = generate_shapes(n, split=split, config=config)
    manifest = write_dataset(records, out)
    summary = summarize(records)
    return (f"wrote {n} {split} images ({image_size}x{image_size}, seed {seed}, {language}) to {manifest}\n"
            + format_summary(summary))
