"""Run reports: metrics.json, and report.md + a self-contained report.html built from the same blocks.

``ReportWriter`` collects blocks (headings, paragraphs, tables, images) and renders each block twice, to
Markdown and to HTML, so no Markdown parser is needed. Images are saved as PNGs under ``images/``; the
Markdown links them relatively and the HTML embeds them (base64), so report.html can be sent on its own.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from mmlm.eval import plots


def to_jsonable(value: Any) -> Any:
    """Plain JSON data from metrics: numpy/torch scalars and arrays become numbers and lists, paths and
    other objects strings, dataclasses dicts; NaN and infinities become null (JSON has no NaN)."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def write_metrics(metrics: Mapping[str, Any], path: str | Path) -> Path:
    """Write (nested) ``metrics`` as pretty JSON, atomically (a reader never sees half a file)."""
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics: expected a mapping, got {type(metrics).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(to_jsonable(metrics), indent=2, ensure_ascii=False, allow_nan=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def format_value(value: Any) -> str:
    """A table cell: floats with 4 decimals (or 4 significant digits when very large/small)."""
    value = to_jsonable(value)
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, float):
        return f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) < 1e6 else f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(format_value(v) for v in value)
    return str(value)


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "", max_list: int = 8) -> dict[str, Any]:
    """``{"val": {"bleu_4": 0.3}}`` -> ``{"val/bleu_4": 0.3}``; long lists and arrays are summarised by shape."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, f"{name}/", max_list))
            continue
        if isinstance(value, (list, tuple, np.ndarray)) or hasattr(value, "detach"):
            array = np.asarray(to_jsonable(value), dtype=object)
            if array.ndim > 1 or array.size > max_list:
                flat[name] = f"array of shape {tuple(array.shape)}"
                continue
        flat[name] = value
    return flat


@dataclasses.dataclass
class _Heading:
    text: str
    level: int


@dataclasses.dataclass
class _Paragraph:
    text: str


@dataclasses.dataclass
class _Table:
    columns: list[str]
    rows: list[list[str]]


@dataclasses.dataclass
class _Image:
    path: Path  # relative to the report folder
    caption: str


def table_rows(data: Any, columns: Sequence[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """Columns and formatted rows for a table from one of:

    - a mapping of scalars -> two columns (key, value);
    - a mapping of mappings (e.g. a per-class table) -> one row per key, one column per inner key;
    - a list of mappings -> one row each, columns = the union of their keys (in first-seen order);
    - a list of lists/tuples, with ``columns`` given.
    """
    if isinstance(data, Mapping):
        if data and all(isinstance(v, Mapping) for v in data.values()):
            inner = list(dict.fromkeys(k for v in data.values() for k in v))
            cols = list(columns) if columns else ["", *inner]
            rows = [[str(name), *(format_value(row.get(k)) for k in cols[1:])] for name, row in data.items()]
            return cols, rows
        cols = list(columns) if columns else ["metric", "value"]
        return cols, [[str(k), format_value(v)] for k, v in data.items()]
    if isinstance(data, Sequence) and not isinstance(data, str):
        if all(isinstance(row, Mapping) for row in data):
            cols = list(columns) if columns else list(dict.fromkeys(k for row in data for k in row))
            return cols, [[format_value(row.get(k)) for k in cols] for row in data]
        if columns is None:
            raise ValueError("table: a list of rows needs `columns`")
        rows = [[format_value(v) for v in row] for row in data]
        for i, row in enumerate(rows):
            if len(row) != len(columns):
                raise ValueError(f"table row {i}: {len(row)} cells but {len(columns)} columns")
        return list(columns), rows
    raise TypeError(f"table: expected a mapping or a list of rows, got {type(data).__name__}")


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:.5rem 0 1rem}th,td{border:1px solid #ccc;padding:.25rem .6rem;text-align:left}
th{background:#f3f3f3}td{font-variant-numeric:tabular-nums}figure{margin:1rem 0}img{max-width:100%}
figcaption{color:#555;font-size:.9rem}
"""


class ReportWriter:
    """Builds ``report.md`` and ``report.html`` in ``out_dir``; images go to ``out_dir/images/``.

    >>> report = ReportWriter("runs/x", "Shapes captioner")          # doctest: +SKIP
    >>> report.section("Metrics").table({"bleu_4": 0.41, "cider": 1.9})  # doctest: +SKIP
    >>> report.write()                                                  # doctest: +SKIP
    """

    def __init__(self, out_dir: str | Path, title: str):
        self.out_dir = Path(out_dir)
        self.title = title
        self.blocks: list[Any] = []
        self._image_names: set[str] = set()

    # ---- content ----

    def section(self, title: str, level: int = 2) -> "ReportWriter":
        if not 1 <= level <= 6:
            raise ValueError(f"section level: expected 1..6, got {level}")
        self.blocks.append(_Heading(title, level))
        return self

    def text(self, text: str) -> "ReportWriter":
        """A paragraph of plain text (shown verbatim, escaped in HTML)."""
        self.blocks.append(_Paragraph(str(text)))
        return self

    def table(self, data: Any, columns: Sequence[str] | None = None) -> "ReportWriter":
        """A table from a dict, a dict of dicts or a list of rows (see ``table_rows``)."""
        self.blocks.append(_Table(*table_rows(data, columns)))
        return self

    def metrics(self, metrics: Mapping[str, Any]) -> "ReportWriter":
        """Nested metrics as one flat key/value table (``val/bleu_4``); arrays summarised by shape."""
        return self.table(flatten_metrics(metrics))

    def image(self, image: Any, caption: str = "", name: str | None = None) -> Path:
        """Add an image (a PNG path, or anything ``plots.to_pil`` takes), saved as ``images/<name>.png``."""
        path = self._new_image_path(name or (Path(image).stem if isinstance(image, (str, Path)) else "image"))
        if isinstance(image, (str, Path)):
            from PIL import Image

            with Image.open(image) as opened:
                opened.save(path, format="PNG")
        else:
            plots.to_pil(image).save(path, format="PNG")
        return self._add_image(path, caption)

    def image_grid(
        self, images: Sequence[Any], captions: Sequence[str] | None = None, name: str = "samples",
        caption: str = "", ncols: int | None = None, full_captions: bool = False, cell_size: int = 128,
    ) -> Path:
        """A grid of images with their captions (e.g. generated captions or prompts) underneath.

        ``full_captions``: every caption wrapped in full under its image (the cells grow to the longest
        one) instead of cut after four lines."""
        path = self._new_image_path(name)
        lines = caption_lines(captions, cell_size) if full_captions and captions is not None else 4
        plots.image_grid(images, captions, ncols=ncols, path=path, cell_size=cell_size,
                         max_caption_lines=max(lines, 1))
        return self._add_image(path, caption)

    def results(self, metrics: Mapping[str, Any], bars: Sequence[Any] = ()) -> "ReportWriter":
        """Metrics as people read them (rates in %, counts as integers); a figure with a bar (an
        :class:`mmlm.eval.bars.Bar` on its key) shows the bar and whether it is met beside it."""
        from mmlm.eval.bars import format_metric, percent

        by_key = {bar.key: bar for bar in bars}
        rows = []
        for key, value in flatten_metrics(metrics).items():
            bar = by_key.get(key)
            target = "" if bar is None else (f"bar {percent(bar.threshold, digits=0)}: "
                                             + ("met" if bar.met(value) else "NOT met"))
            rows.append([key, format_metric(key, value), target])
        return self.table(rows, columns=["metric", "value", "bar"])

    def confusion_matrix(self, matrix: Any, labels: Sequence[str], name: str = "confusion_matrix",
                         caption: str = "Confusion matrix (rows: true class, columns: predicted)") -> Path:
        path = self._new_image_path(name)
        plots.save_confusion_matrix_png(matrix, labels, path)
        return self._add_image(path, caption)

    def loss_curve(self, metrics_jsonl_path: str | Path, name: str = "loss_curve", caption: str = "Loss") -> Path:
        path = self._new_image_path(name)
        plots.plot_loss_curve(metrics_jsonl_path, path)
        return self._add_image(path, caption)

    def _new_image_path(self, name: str) -> Path:
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name).stem).strip("._") or "image"
        candidate, n = stem, 2
        while candidate in self._image_names:
            candidate, n = f"{stem}_{n}", n + 1
        self._image_names.add(candidate)
        folder = self.out_dir / "images"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{candidate}.png"

    def _add_image(self, path: Path, caption: str) -> Path:
        self.blocks.append(_Image(path.relative_to(self.out_dir), caption))
        return path

    # ---- rendering ----

    def to_markdown(self) -> str:
        def cell(text: str) -> str:
            return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>")

        out = [f"# {self.title}", ""]
        for block in self.blocks:
            if isinstance(block, _Heading):
                out += [f"{'#' * block.level} {block.text}", ""]
            elif isinstance(block, _Paragraph):
                out += [block.text, ""]
            elif isinstance(block, _Table):
                out.append("| " + " | ".join(cell(c) for c in block.columns) + " |")
                out.append("|" + "|".join("---" for _ in block.columns) + "|")
                out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in block.rows]
                out.append("")
            elif isinstance(block, _Image):
                alt = block.caption.replace("]", ")").replace("[", "(") or block.path.stem
                out.append(f"![{alt}]({block.path.as_posix()})")
                out += ([f"*{block.caption}*"] if block.caption else []) + [""]
        return "\n".join(out)

    def to_html(self) -> str:
        esc = html.escape
        out = [
            "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{esc(self.title)}</title><style>{_CSS}</style></head><body>", f"<h1>{esc(self.title)}</h1>",
        ]
        for block in self.blocks:
            if isinstance(block, _Heading):
                out.append(f"<h{block.level}>{esc(block.text)}</h{block.level}>")
            elif isinstance(block, _Paragraph):
                out.append("<p>" + esc(block.text).replace("\n", "<br>") + "</p>")
            elif isinstance(block, _Table):
                head = "".join(f"<th>{esc(c)}</th>" for c in block.columns)
                body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in block.rows)
                out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif isinstance(block, _Image):
                data = base64.b64encode((self.out_dir / block.path).read_bytes()).decode("ascii")
                out.append(
                    f'<figure><img src="data:image/png;base64,{data}" alt="{esc(block.caption or block.path.stem)}">'
                    + (f"<figcaption>{esc(block.caption)}</figcaption>" if block.caption else "") + "</figure>"
                )
        out.append("</body></html>")
        return "\n".join(out)

    def write(self) -> dict[str, Path]:
        """Write report.md and report.html; returns their paths."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        paths = {"markdown": self.out_dir / "report.md", "html": self.out_dir / "report.html"}
        paths["markdown"].write_text(self.to_markdown() + "\n", encoding="utf-8")
        paths["html"].write_text(self.to_html() + "\n", encoding="utf-8")
        return paths


def caption_lines(captions: Sequence[str], cell_size: int = 128, font_size: int = 12) -> int:
    """How many lines the longest of ``captions`` needs when wrapped to ``cell_size`` pixels (as
    :func:`mmlm.eval.plots.image_grid` wraps them)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=font_size)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    return max((len(plots._wrap(str(c), font, cell_size, draw)) for c in captions), default=0)


def write_run_report(out_dir: str | Path, title: str, metrics: Mapping[str, Any],
                     pictures: Sequence[str | Path] = (), metrics_jsonl: str | Path | None = None) -> dict[str, Path]:
    """``metrics.json`` and ``report.md`` / ``report.html`` for a run or an evaluation: the metrics table,
    the loss curve (when a metrics.jsonl is given) and the evaluation's pictures (sample grids, confusion
    matrices), each under its file name."""
    out_dir = Path(out_dir)
    write_metrics(metrics, out_dir / "metrics.json")
    report = ReportWriter(out_dir, title)
    report.section("Metrics").metrics(metrics)
    if metrics_jsonl is not None and Path(metrics_jsonl).is_file():
        report.section("Training")
        try:
            report.loss_curve(metrics_jsonl, caption="Loss against optimiser step")
        except ValueError:  # no loss rows yet (e.g. zero steps)
            report.text("No training loss was logged.")
    if pictures:
        report.section("Samples")
        for picture in pictures:
            report.image(picture, caption=Path(picture).stem.replace("_", " "), name=Path(picture).stem)
    return report.write()
