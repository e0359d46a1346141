"""torch Datasets over Records, and ``build_datasets``: the splits a run reads.

Bad images (``on_bad_image="skip"``) are found lazily: when record ``i`` fails to decode it is
logged and the next good record (``i+1``, ``i+2``, ...) is returned in its place, so the length and
the sampler stay valid. The log is an append-only file shared by the main process and every
worker, so ``dataset.skipped`` lists every skipped image, whichever process met it. Under
``on_bad_image="error"`` the first bad image raises ``BadImageError`` naming the file.
Streamed tar shards live in :mod:`mmlm.data.streaming`, the worker bookkeeping in :mod:`mmlm.data.workers`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

from mmlm.config import DataConfig

from .digits import digits_records
from .images import DEFAULT_MAX_PIXELS, BadImageError, load_image
from .records import Record
from .samples import (  # noqa: F401 - BAD_IMAGE_POLICIES and bad_image_source are imported from here elsewhere
    BAD_IMAGE_POLICIES,
    _check_policy,
    _hash_fraction,
    _label,
    _pick_caption,
    _Retransformable,
    _sample,
    _split_key,
    bad_image_source,
)
from .shapes import ShapesRecords
from .sources import DataError, detect_format, read_records
from .streaming import StreamingImageTextDataset
from .summary import summarize  # noqa: F401 - re-exported
from .workers import DataWorkerError, SkipLog, WorkerProgress, explain_worker_failure, guard_workers  # noqa: F401


class ImageTextDataset(_Retransformable, Dataset):
    """Map-style dataset over a sequence of Records.

    Items: ``{"pixel_values", "caption", "captions", "prompt", "label", "attributes", "index"}``; ``prompt`` is
    the row's own ``prompt`` column (None without one); ``index`` is the
    record actually returned (a substitute's, when a bad image was skipped). ``caption`` is the first
    caption until ``set_epoch`` is called, then a choice fixed by (seed, epoch, index). Call ``set_epoch``
    before creating each epoch's DataLoader iterator (persistent workers keep their own copy).
    """

    def __init__(self, records: Sequence[Record], transform: Callable | None = None, on_bad_image: str = "error",
                 max_pixels: int = DEFAULT_MAX_PIXELS, *, label_field: str = "label", seed: int = 0):
        _check_policy(on_bad_image)
        self.records = records
        self.transform = transform
        self.on_bad_image = on_bad_image
        self.max_pixels = max_pixels
        self.label_field = label_field
        self.seed = seed
        self.epoch: int | None = None
        self._bad: set[int] = set()  # per process: known-bad indices are not decoded again
        self._log = SkipLog()
        self.worker_progress = WorkerProgress()

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int | None) -> None:
        self.epoch = epoch

    def label_of(self, index: int) -> str | None:
        """The label of record ``index`` without decoding its image."""
        return _label(self.records[index], self.label_field)

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """Every skipped image as (source, reason), from all worker processes."""
        return self._log.entries()

    def _load(self, index: int) -> tuple[int, Record, Any]:
        n = len(self.records)
        for step in range(n):
            i = (index + step) % n
            if i in self._bad:
                continue
            record = self.records[i]
            self.worker_progress.start(f"{record.image} (record {record.source})" if record.source
                                       else str(record.image))
            try:
                return i, record, load_image(record.image, max_pixels=self.max_pixels)
            except BadImageError as err:
                where = f" (record {record.source})" if record.source and record.source != err.path else ""
                if self.on_bad_image == "error":
                    raise BadImageError(err.path, err.reason + where) from None
                self._bad.add(i)
                self._log.add(bad_image_source(record, err), err.reason)
        raise DataError(f"every one of the {n} images is bad; first skipped: {self.skipped[:3]}")

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.records):
            raise IndexError(f"index {index} out of range for {len(self.records)} records")
        i, record, image = self._load(index)
        caption = _pick_caption(record.captions, self.epoch, self.seed, i)
        sample = _sample(record, image, self.transform, caption, self.label_field, i)
        self.worker_progress.done()
        return sample


def collate_image_text(batch: list[dict]) -> dict:
    """Stack ``pixel_values`` when they are tensors; every other key becomes a list."""
    out = {key: [item[key] for item in batch] for key in batch[0]}
    if isinstance(out["pixel_values"][0], torch.Tensor):
        out["pixel_values"] = torch.stack(out["pixel_values"])
    return out


def split_records(records: Sequence[Record], val_fraction: float) -> tuple[list[Record], list[Record]]:
    """Deterministic, order-independent train/val split by a hash of each image path (or source)."""
    if not 0 < val_fraction < 1:
        raise DataError(f"data.val_fraction: expected a value in (0, 1) when no val_source is given, "
                        f"got {val_fraction}")
    if len(records) < 2:
        raise DataError(f"cannot split {len(records)} record(s) into train and val; add data or set data.val_source")
    n_val = max(1, round(val_fraction * len(records)))
    ranked = sorted(range(len(records)), key=lambda i: (_hash_fraction(_split_key(records[i])), i))
    val_ids = set(ranked[:n_val])
    return ([r for i, r in enumerate(records) if i not in val_ids], [r for i, r in enumerate(records) if i in val_ids])


def build_datasets(data: DataConfig, transform_train: Callable | None, transform_eval: Callable | None,
                   seed: int = 0) -> dict:
    """The splits a run needs: train, val, and test when available (shapes: + compositional).

    ``data.source``: "shapes" (lazily generated from ``data.shapes``), "digits" (scikit-learn), or a path
    read with ``read_records`` (val split off train by ``val_fraction`` unless ``val_source`` is given;
    "test" only from ``test_source``). Tar shards give StreamingImageTextDatasets (the train one shuffled).
    With ``data.format: auto`` every source is detected on its own (a JSONL val_source beside tar shards).
    ``seed`` (the run's ``train.seed``) drives the caption choice per epoch and the shard / sample shuffle.
    """
    common = dict(on_bad_image=data.on_bad_image, max_pixels=data.max_image_pixels, seed=seed)

    def transform_of(split):
        return transform_train if split == "train" else transform_eval

    def wrap(records, split, label_field="label"):
        return ImageTextDataset(records, transform_of(split), label_field=label_field, **common)

    if data.source == "shapes":
        cfg = data.shapes
        sizes = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test, "compositional": cfg.n_compositional}
        return {split: wrap(ShapesRecords(n, split=split, config=cfg), split, data.label_field)
                for split, n in sizes.items()}
    if data.source == "digits":
        return {split: wrap(digits_records(split, data.split_seed), split, data.label_field)
                for split in ("train", "val", "test")}

    # Below, read_records applies data.label_field itself (a manifest column, or a key of its "attributes").
    def split_from(source, split, holdout=None):
        fmt = detect_format(source) if data.format == "auto" else data.format
        if fmt == "webdataset":
            return StreamingImageTextDataset(source, transform_of(split), label_field=data.label_field,
                                             holdout=holdout, shuffle=split == "train",
                                             shuffle_buffer=data.shuffle_buffer, **common)
        records = read_records(source, format=fmt, allow_absolute_paths=data.allow_absolute_paths,
                               label_field=data.label_field, check_files=data.on_bad_image == "error")
        return records if holdout is not None else wrap(records, split)

    if data.val_source:
        out = {"train": split_from(data.source, "train"), "val": split_from(data.val_source, "val")}
    else:
        train = split_from(data.source, "train", (data.val_fraction, "train"))
        if isinstance(train, StreamingImageTextDataset):
            out = {"train": train, "val": split_from(data.source, "val", (data.val_fraction, "val"))}
        else:
            train_records, val_records = split_records(train, data.val_fraction)
            out = {"train": wrap(train_records, "train"), "val": wrap(val_records, "val")}
    if data.test_source:
        out["test"] = split_from(data.test_source, "test")
    return out
