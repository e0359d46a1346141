"""The ``Record`` every reader produces, and the row checks the manifest readers share (paths, captions, labels,
Unicode), with errors that name the file, the row and what was expected."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from mmlm.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FORMATS = ("auto", "jsonl", "csv", "coco", "imagefolder", "webdataset", "hf")


@dataclass
class Record:
    """One image with its captions, an optional label and free-form attributes."""

    image: str | Path | bytes | Image.Image  # a path (decoded lazily), encoded bytes (shards) or an image
    captions: list[str]
    label: str | None = None
    attributes: dict = field(default_factory=dict)
    source: str = ""  # where it came from: "manifest.jsonl:12", "coco.json:images[3]", "shard-0001.tar:key"


# ----------------------------------------------------------------------------- helpers


def _decode_utf8(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {data[err.start]:#04x} at offset {err.start})") from err


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _lone_surrogate_at(value: Any, key: str) -> str | None:
    """The key path of the first string holding a lone surrogate (a JSON "\\ud800" escape decodes to one)."""
    if isinstance(value, str):
        return None if _is_utf8(value) else key
    if isinstance(value, dict):
        for name, item in value.items():
            if isinstance(name, str) and not _is_utf8(name):
                return f"a key of {key}"
            found = _lone_surrogate_at(item, f"{key}.{name}")
            if found:
                return found
    if isinstance(value, list):
        for i, item in enumerate(value):
            found = _lone_surrogate_at(item, f"{key}[{i}]")
            if found:
                return found
    return None


def _check_unicode(value: Any, where: str, key: str = "row") -> None:
    """Refuse text that cannot be encoded as UTF-8: it would break tokenizers and every file written later."""
    found = _lone_surrogate_at(value, key)
    if found:
        raise DataError(f"{where}: {found} holds invalid Unicode (a lone surrogate, e.g. the JSON escape "
                        "\\ud800 on its own); write the text as valid UTF-8")


def _resolve_image(value: Any, root: Path, where: str, allow_absolute_paths: bool, check_files: bool) -> Path:
    """An image path from a manifest, relative to ``root``; refuses escapes and (optionally) missing files."""
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: 'image' must be a non-empty string path, got {value!r}")
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+://", value):
        raise DataError(f"{where}: image '{value}' is a URL; only local files are supported (download them first)")
    rel = Path(value)
    if rel.is_absolute():
        if not allow_absolute_paths:
            raise DataError(f"{where}: absolute image path '{value}' refused; "
                            "use a path relative to the manifest or set allow_absolute_paths=True")
        path = rel
    else:
        path = (root / rel).resolve()
        if not allow_absolute_paths and not path.is_relative_to(root.resolve()):
            raise DataError(f"{where}: image path '{value}' escapes the manifest folder {root}; "
                            "refused (set allow_absolute_paths=True to allow it)")
    if check_files and not path.is_file():
        raise DataError(f"{where}: image file not found: {path}")
    return path


def _captions_from(row: dict, where: str) -> list[str]:
    captions: list[str] = []
    if "caption" in row and row["caption"] is not None:
        if not isinstance(row["caption"], str):
            raise DataError(f"{where}: 'caption' must be a string, got {type(row['caption']).__name__}")
        captions.append(row["caption"])
    if "captions" in row and row["captions"] is not None:
        value = row["captions"]
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise DataError(f"{where}: 'captions' must be a list of strings, got {value!r:.80}")
        captions.extend(value)
    return captions


def _label_from(row: dict, label_field: str, where: str) -> str | None:
    value = row.get(label_field)
    if value is None:
        return None
    if isinstance(value, (dict, list)):
        raise DataError(f"{where}: label '{label_field}' must be a string or number, got {type(value).__name__}")
    return str(value)


def _record_from_row(row: Any, root: Path, where: str, label_field: str, allow_absolute_paths: bool,
                     check_files: bool) -> Record:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with keys image, caption/captions, got {type(row).__name__}")
    _check_unicode(row, where)
    if "image" not in row:
        raise DataError(f"{where}: missing key 'image' (found keys: {', '.join(map(str, row)) or 'none'})")
    captions = _captions_from(row, where)
    prompt = row.get("prompt")
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):  # kept in attributes["prompt"]
        raise DataError(f"{where}: 'prompt' must be a non-empty string (the row's own question), got {prompt!r:.80}")
    label = _label_from(row, label_field, where)
    if label is None and isinstance(row.get("attributes"), dict):  # e.g. label_field="colour" in a shapes manifest
        label = _label_from(row["attributes"], label_field, where)
    if not captions and label is None:
        raise DataError(f"{where}: missing key 'caption' or 'captions' (or a '{label_field}' label)")
    attributes = dict(row.get("attributes") or {}) if isinstance(row.get("attributes"), dict) else {}
    for key, value in row.items():
        if key not in ("image", "caption", "captions", "attributes", label_field):
            attributes[key] = value
    path = _resolve_image(row["image"], root, where, allow_absolute_paths, check_files)
    return Record(image=path, captions=captions, label=label, attributes=attributes, source=where)
