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
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from mmlm.errors import DataError  # shared with mmlm.images; still importable from here

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


# ----------------------------------------------------------------------------- webdataset shards


def expand_braces(pattern: str) -> list[str]:
    """``shard-{000..002}.tar`` -> three names; ``{a,b}`` lists too (the webdataset/braceexpand syntax)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        width = len(lo) if lo.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [name for option in options for name in expand_braces(head + option + tail)]


def shard_paths(pattern: str | Path) -> list[Path]:
    """The tar shards a brace/glob pattern (or one file or folder of .tar files) names, sorted."""
    text = str(pattern)
    if Path(text).is_dir():
        paths = sorted(Path(text).glob("*.tar"))
    else:
        paths = []
        for name in expand_braces(text):
            matches = sorted(glob.glob(name)) if glob.has_magic(name) else [name]
            paths.extend(Path(p) for p in matches)
    if not paths:
        raise DataError(f"{text}: no webdataset shards match this pattern")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{text}: shard file(s) not found: {', '.join(missing[:5])}")
    return paths


def _sample_to_record(shard: Path, key: str, files: dict[str, bytes], label_field: str) -> Record:
    where = f"{shard.name}:{key}"
    images = [ext for ext in files if "." + ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS]
    if not images:
        raise DataError(f"{shard}:{key}: sample has no image member (found {', '.join(sorted(files))})")
    captions, label, attributes = [], None, {}
    if "json" in files:
        try:
            meta = json.loads(files["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(f"{shard}:{key}.json: invalid UTF-8 JSON ({err})") from err
        if not isinstance(meta, dict):
            raise DataError(f"{shard}:{key}.json: expected a JSON object, got {type(meta).__name__}")
        captions = _captions_from(meta, f"{shard}:{key}.json")
        label = _label_from(meta, label_field, f"{shard}:{key}.json")
        attributes = {k: v for k, v in meta.items() if k not in ("caption", "captions", label_field)}
    for ext in ("txt", "caption"):
        if ext in files:
            try:
                captions.insert(0, files[ext].decode("utf-8").strip())
            except UnicodeDecodeError as err:
                raise DataError(f"{shard}:{key}.{ext}: not UTF-8 text") from err
    for ext in ("cls", "label"):
        if ext in files and label is None:
            label = files[ext].decode("utf-8", errors="replace").strip()
    return Record(image=files[images[0]], captions=captions, label=label, attributes=attributes, source=where)


def iter_shard(shard: Path, label_field: str = "label") -> Iterator[Record | DataError]:
    """Stream one tar shard; members sharing a key (``dir/key.ext``) form one sample."""
    key, files = None, {}
    try:
        with tarfile.open(shard, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name
                base = name.rsplit("/", 1)[-1]
                if base.startswith(".") or "." not in base:
                    continue
                prefix = name[: len(name) - len(base)]
                sample_key, ext = prefix + base.split(".", 1)[0], base.split(".", 1)[1].lower()
                data = tar.extractfile(member).read()
                if sample_key != key and files:
                    yield _safe_record(shard, key, files, label_field)
                    files = {}
                key = sample_key
                files[ext] = data
    except (tarfile.TarError, OSError, EOFError) as err:
        if files:
            yield _safe_record(shard, key, files, label_field)
        yield DataError(f"{shard}: unreadable or truncated tar shard after key {key!r} ({err})")
        return
    if files:
        yield _safe_record(shard, key, files, label_field)


def _safe_record(shard: Path, key: str, files: dict[str, bytes], label_field: str) -> Record | DataError:
    try:
        return _sample_to_record(shard, key, files, label_field)
    except DataError as err:
        return err


# ----------------------------------------------------------------------------- Hugging Face datasets


def _hf_records(dataset: Any, name: str, label_field: str) -> Iterator[Record | DataError]:
    import datasets as hf

    if isinstance(dataset, hf.DatasetDict):
        raise DataError(f"{name}: a DatasetDict with splits {list(dataset)}; point the source at one split "
                        f"(e.g. {name}/{next(iter(dataset), 'train')})")
    features = dataset.features
    image_cols = [c for c, f in features.items() if isinstance(f, hf.Image)] or \
        [c for c in ("image", "img", "image_path", "file_name") if c in features]
    if not image_cols:
        raise DataError(f"{name}: no image column (an Image feature or a column named image/img); "
                        f"columns are {list(features)}")
    text_cols = [c for c in ("caption", "captions", "text", "sentences") if c in features]
    image_col = image_cols[0]
    if isinstance(features[image_col], hf.Image) and features[image_col].decode:
        # Keep the encoded bytes: lighter than decoded images, and decoded later by our safe decoder.
        dataset = dataset.cast_column(image_col, hf.Image(decode=False))
    label_feature = features.get(label_field)
    for i, row in enumerate(dataset):
        where = f"{name}[{i}]"
        value = row[image_col]
        if isinstance(value, dict):  # Image(decode=False): {"bytes": ..., "path": ...}
            value = value.get("bytes") or value.get("path")
        if value is None:
            yield DataError(f"{where}: column '{image_col}' is empty")
            continue
        captions = []
        for col in text_cols:
            cell = row[col]
            if isinstance(cell, str):
                captions.append(cell)
            elif isinstance(cell, list) and all(isinstance(c, str) for c in cell):
                captions.extend(cell)
            elif cell is not None:
                yield DataError(f"{where}: column '{col}' must be a string or list of strings, got {cell!r:.60}")
                break
        else:
            label = row.get(label_field)
            if isinstance(label_feature, hf.ClassLabel) and label is not None:
                label = label_feature.int2str(label)
            attributes = {k: v for k, v in row.items() if k not in (image_col, label_field, *text_cols)}
            yield Record(image=value, captions=captions, label=None if label is None else str(label),
                         attributes=attributes, source=where)


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
