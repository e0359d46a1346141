"""webdataset tar shards: brace/glob patterns and a streaming reader (members sharing a key form one sample).

Hand-written (no ``webdataset`` import) because it yields one ``Record`` or a named ``DataError`` per sample,
so a truncated shard or a bad member is reported with its file and key, and because the streaming dataset
(:mod:`mmlm.data.streaming`) needs to count samples before decoding them to resume exactly.
"""

from __future__ import annotations

import glob
import json
import re
import tarfile
from pathlib import Path
from typing import Iterator

from mmlm.errors import DataError

from .records import IMAGE_EXTENSIONS, Record, _captions_from, _label_from


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
