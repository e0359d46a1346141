"""Readers for the image-text formats users bring, all turned into ``Record``s.

Formats: JSONL and CSV manifests, COCO captions JSON, ImageFolder (class_name/xxx.jpg), webdataset
tar shards (streamed; a glob or brace pattern) and Hugging Face ``datasets`` (a save_to_disk folder or
an in-memory ``Dataset``). Images stay lazy (a path, or bytes for shards) until a dataset decodes them.

Every problem raises ``DataError`` naming the file, the line/row/key and what was expected.
Image paths are relative to the manifest; absolute paths and paths that escape the manifest's
folder are refused unless ``allow_absolute_paths=True``.
"""

from __future__ import annotations

import csv
import glob
import io
import json
from pathlib import Path
from typing import Any, Iterator

from mmlm.errors import DataError  # shared with mmlm.images; still importable from here

from .hf_source import _hf_records
from .records import (  # noqa: F401 - re-exported: readers elsewhere import them from here
    FORMATS,
    IMAGE_EXTENSIONS,
    Record,
    _captions_from,
    _check_unicode,
    _decode_utf8,
    _label_from,
    _record_from_row,
    _resolve_image,
)
from .shards import expand_braces, iter_shard, shard_paths  # noqa: F401


# ----------------------------------------------------------------------------- file formats
# Each reader yields a Record or a DataError per row, so that ``scan_records`` can report every bad
# row (``mmlm data inspect``) while ``read_records`` stops at the first.


def _scan_jsonl(path: Path, label_field: str, allow_absolute_paths: bool, check_files: bool):
    text = _decode_utf8(path.read_bytes(), path)
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path.name}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            yield DataError(f"{path}:{lineno}: invalid JSON ({err.msg} at column {err.colno})")
            continue
        try:
            yield _record_from_row(row, path.parent, where, label_field, allow_absolute_paths, check_files)
        except DataError as err:
            yield DataError(f"{path.parent}/{err}")


def _scan_csv(path: Path, label_field: str, allow_absolute_paths: bool, check_files: bool):
    text = _decode_utf8(path.read_bytes(), path)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    if not reader.fieldnames or "image" not in reader.fieldnames:
        raise DataError(f"{path}:1: CSV header must have an 'image' column and 'caption' or 'captions', "
                        f"got {reader.fieldnames}")
    try:
        for row in reader:
            where = f"{path.name}:{reader.line_num}"
            if None in row:
                yield DataError(f"{path}:{reader.line_num}: more cells than header columns")
                continue
            row = {k: v for k, v in row.items() if v not in (None, "")}
            if "captions" in row:
                try:
                    row["captions"] = json.loads(row["captions"])
                except json.JSONDecodeError:
                    yield DataError(f"{path}:{reader.line_num}: 'captions' cell must be a JSON list of strings")
                    continue
            try:
                yield _record_from_row(row, path.parent, where, label_field, allow_absolute_paths, check_files)
            except DataError as err:
                yield DataError(f"{path.parent}/{err}")
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({err})") from err


def _load_json(path: Path) -> Any:
    try:
        return json.loads(_decode_utf8(path.read_bytes(), path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from err


def _coco_id(value: Any) -> bool:
    """COCO ids are integers (some exporters write strings); anything else cannot be matched."""
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _scan_coco(path: Path, label_field: str, allow_absolute_paths: bool, check_files: bool):
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise DataError(f"{path}: COCO captions JSON needs lists 'images' and 'annotations'")
    captions: dict[Any, list[str]] = {}
    ids = {img["id"] for img in data["images"] if isinstance(img, dict) and _coco_id(img.get("id"))}
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}:annotations[{i}]"
        if not isinstance(ann, dict) or not _coco_id(ann.get("image_id")) or not isinstance(ann.get("caption"), str):
            yield DataError(f"{where}: expected an object with an integer 'image_id' and a string 'caption'")
            continue
        try:
            _check_unicode(ann["caption"], where, "caption")
        except DataError as err:
            yield err
            continue
        if ann["image_id"] not in ids:
            yield DataError(f"{where}: image_id {ann['image_id']!r} is not in 'images'")
            continue
        captions.setdefault(ann["image_id"], []).append(ann["caption"])
    for i, img in enumerate(data["images"]):
        where = f"{path.name}:images[{i}]"
        if not isinstance(img, dict) or not _coco_id(img.get("id")) or "file_name" not in img:
            yield DataError(f"{path}:images[{i}]: expected an object with an integer 'id' and 'file_name'")
            continue
        try:
            _check_unicode(img, where, "image")
            image = _resolve_image(img["file_name"], path.parent, where, allow_absolute_paths, check_files)
            label = _label_from(img, label_field, where)
        except DataError as err:
            yield DataError(f"{path.parent}/{err}")
            continue
        extra = {k: v for k, v in img.items() if k not in ("file_name", label_field)}
        yield Record(image=image, captions=captions.get(img["id"], []), label=label, attributes=extra, source=where)


def _scan_imagefolder(root: Path):
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    found = False
    for class_dir in classes:
        for path in sorted(class_dir.rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
                found = True
                yield Record(image=path, captions=[], label=class_dir.name,
                             attributes={}, source=str(path.relative_to(root.parent)))
    if not found:
        raise DataError(f"{root}: no images found; an ImageFolder needs class_name/xxx.jpg subfolders "
                        f"(extensions {', '.join(IMAGE_EXTENSIONS)})")


# ----------------------------------------------------------------------------- entry points


def detect_format(source: str | Path) -> str:
    """Guess the format from the extension or folder layout."""
    text = str(source)
    if text.endswith(".tar") or "{" in text or glob.has_magic(text):
        return "webdataset"
    path = Path(text)
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file() \
                or (path / "dataset_dict.json").is_file():
            return "hf"
        for name in ("manifest.jsonl", "metadata.jsonl"):
            if (path / name).is_file():
                return "jsonl"
        if any(path.glob("*.tar")) and not any(p.is_dir() for p in path.iterdir()):
            return "webdataset"
        return "imagefolder"
    if not path.exists():
        raise DataError(f"{path}: data source not found")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix == ".json":
        return "coco"
    raise DataError(f"{path}: cannot tell the format from the extension '{suffix}'; "
                    f"expected .jsonl, .csv, .json (COCO), .tar shards, an ImageFolder or a saved HF dataset, "
                    f"or set data.format to one of {', '.join(FORMATS[1:])}")


def scan_records(source: Any, format: str = "auto", *, allow_absolute_paths: bool = False,
                 label_field: str = "label", check_files: bool = True) -> Iterator[Record | DataError]:
    """Every row of ``source`` as a Record, or as the DataError that row raised (lenient; for inspection)."""
    if format not in FORMATS:
        raise DataError(f"data format: expected one of {', '.join(FORMATS)}, got {format!r}")
    if not isinstance(source, (str, Path)):
        import datasets as hf

        if isinstance(source, (hf.Dataset, hf.DatasetDict)):
            yield from _hf_records(source, "dataset", label_field)
            return
        raise TypeError(f"data source: expected a path or a datasets.Dataset, got {type(source).__name__}")
    fmt = detect_format(source) if format == "auto" else format
    path = Path(source)
    if fmt == "jsonl" and path.is_dir():
        path = next(path / n for n in ("manifest.jsonl", "metadata.jsonl") if (path / n).is_file())
    if fmt == "webdataset":
        for shard in shard_paths(source):
            yield from iter_shard(shard, label_field)
        return
    if fmt == "hf":
        import datasets as hf

        try:
            dataset = hf.load_from_disk(str(path))
        except FileNotFoundError as err:
            raise DataError(f"{path}: not a dataset saved with save_to_disk ({err})") from err
        yield from _hf_records(dataset, path.name, label_field)
        return
    if not path.exists():
        raise DataError(f"{path}: data source not found")
    if fmt == "imagefolder":
        if not path.is_dir():
            raise DataError(f"{path}: format 'imagefolder' needs a folder of class_name/ subfolders")
        yield from _scan_imagefolder(path)
        return
    scanners = {"jsonl": _scan_jsonl, "csv": _scan_csv, "coco": _scan_coco}
    yield from scanners[fmt](path, label_field, allow_absolute_paths, check_files)


def iter_records(source: Any, format: str = "auto", *, allow_absolute_paths: bool = False,
                 label_field: str = "label", check_files: bool = True) -> Iterator[Record]:
    """Stream Records (shards are read one member at a time); raises on the first bad row."""
    for item in scan_records(source, format, allow_absolute_paths=allow_absolute_paths,
                             label_field=label_field, check_files=check_files):
        if isinstance(item, DataError):
            raise item
        yield item


def read_records(source: Any, format: str = "auto", *, allow_absolute_paths: bool = False,
                 label_field: str = "label", check_files: bool = True) -> list[Record]:
    """All Records of a JSONL/CSV/COCO/ImageFolder/webdataset/HF source; raises DataError on the first bad row.

    ``check_files=False`` defers missing-file errors to decoding time (where ``on_bad_image="skip"`` applies).
    """
    return list(iter_records(source, format, allow_absolute_paths=allow_absolute_paths,
                             label_field=label_field, check_files=check_files))
