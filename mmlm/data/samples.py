"""What the map-style and the streamed datasets share: the item layout, the caption choice per epoch, labels,
the bad-image policy and ``with_transform``."""

from __future__ import annotations

import copy
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .images import BadImageError
from .records import Record
from .sources import DataError
from .workers import SkipLog, WorkerProgress

BAD_IMAGE_POLICIES = ("error", "skip")


def _check_policy(on_bad_image: str) -> None:
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"on_bad_image: expected 'error' or 'skip', got {on_bad_image!r}")


def bad_image_source(record: Record, err: BadImageError) -> str:
    """Where a bad image came from: its row and, when the image is a file, that file ("m.jsonl:15 (img/x.png)")."""
    if not record.source:
        return err.path
    if isinstance(record.image, (str, Path)) and Path(err.path).name not in record.source:
        return f"{record.source} ({err.path})"
    return record.source


def _pick_caption(captions: list[str], epoch: int | None, seed: int, key: int) -> str:
    if not captions:
        return ""
    if epoch is None or len(captions) == 1:
        return captions[0]
    return captions[int(np.random.default_rng((seed, epoch, key)).integers(len(captions)))]


def _label(record: Record, label_field: str) -> str | None:
    """The record's class label; ``"colour+kind"`` joins several attributes into one label ("red circle")."""
    if label_field == "label":
        return record.label
    if "+" in label_field:
        return " ".join(_label(record, part) or "" for part in label_field.split("+")).strip() or None
    if label_field not in record.attributes:
        raise DataError(f"{record.source}: label_field '{label_field}' is not an attribute "
                        f"(attributes: {', '.join(record.attributes) or 'none'})")
    return str(record.attributes[label_field])


def _sample(record: Record, image: Any, transform: Callable | None, caption: str, label_field: str,
            index: int) -> dict:
    return {"pixel_values": transform(image) if transform else image, "caption": caption,
            "captions": list(record.captions), "prompt": record.attributes.get("prompt"),
            "label": _label(record, label_field),
            "attributes": record.attributes, "index": index}


class _Retransformable:
    """``with_transform``: the same split with another image transform, without reading its source again."""

    def with_transform(self, transform: Callable | None):
        """A copy sharing the records (or shards) with ``transform`` applied, and its own skip log."""
        clone = copy.copy(self)
        clone.transform = transform
        clone._log = SkipLog()
        clone.worker_progress = WorkerProgress()
        if hasattr(clone, "_bad"):
            clone._bad = set()
        return clone


def _hash_fraction(key: str) -> float:
    """A stable value in [0, 1) per key, for order-independent train/val splits."""
    return zlib.crc32(key.encode("utf-8")) / 2**32


def _split_key(record: Record) -> str:
    return str(record.image) if isinstance(record.image, (str, Path)) else record.source
