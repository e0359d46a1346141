"""torch Datasets over Records, with a bad-image policy that works with DataLoader workers.

Bad images (``on_bad_image="skip"``) are found lazily: when record ``i`` fails to decode it is
logged and the next good record (``i+1``, ``i+2``, ...) is returned in its place, so the length and
the sampler stay valid. The log is an append-only file shared by the main process and every
worker, so ``dataset.skipped`` lists every skipped image, whichever process met it. Under
``on_bad_image="error"`` the first bad image raises ``BadImageError`` naming the file.
"""

from __future__ import annotations

import collections
import copy
import os
import re
import shutil
import statistics
import tempfile
import weakref
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from mmlm.config import DataConfig

from .digits import digits_records
from .images import DEFAULT_MAX_PIXELS, BadImageError, image_info, load_image
from .shapes import ShapesRecords
from .sources import DataError, Record, detect_format, iter_shard, read_records, shard_paths

BAD_IMAGE_POLICIES = ("error", "skip")


def _remove_if_owner(path: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:
        try:
            os.remove(path)
        except OSError:
            pass


class SkipLog:
    """(source, reason) pairs appended to a temp file that every DataLoader worker shares."""

    def __init__(self):
        fd, self.path = tempfile.mkstemp(prefix="mmlm-skipped-", suffix=".tsv")
        os.close(fd)
        self._finalizer = weakref.finalize(self, _remove_if_owner, self.path, os.getpid())

    def __getstate__(self):
        return {"path": self.path}  # workers append to the same file; only the creator deletes it

    def __setstate__(self, state):
        self.path = state["path"]

    def add(self, source: str, reason: str) -> None:
        line = f"{source}\t{reason}".replace("\n", " ") + "\n"
        with open(self.path, "a", encoding="utf-8") as f:  # one small O_APPEND write: atomic across processes
            f.write(line)

    def entries(self) -> list[tuple[str, str]]:
        """Unique (source, reason) pairs, first occurrence first."""
        try:
            lines = Path(self.path).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        seen: dict[str, str] = {}
        for line in lines:
            source, _, reason = line.partition("\t")
            seen.setdefault(source, reason)
        return list(seen.items())


class DataWorkerError(DataError):
    """A DataLoader worker died or hung; the message names the item(s) it was reading."""


class WorkerProgress:
    """What each DataLoader worker process is reading right now: one small file per worker pid.

    A worker that crashes (a decoder segfault, the OOM killer) or hangs takes its Python state with
    it; this record survives it, so the error can name the file instead of a bare "worker exited
    unexpectedly" or "DataLoader timed out". In the main process nothing is written.
    """

    def __init__(self):
        self.folder = tempfile.mkdtemp(prefix="mmlm-workers-")
        self._finalizer = weakref.finalize(self, _remove_tree_if_owner, self.folder, os.getpid())

    def __getstate__(self):
        return {"folder": self.folder}  # workers write into the same folder; only the creator deletes it

    def __setstate__(self, state):
        self.folder = state["folder"]

    def start(self, source: str) -> None:
        if get_worker_info() is not None:
            Path(self.folder, str(os.getpid())).write_text(source, encoding="utf-8", errors="replace")

    def done(self) -> None:
        if get_worker_info() is not None:
            Path(self.folder, str(os.getpid())).write_text("", encoding="utf-8")

    def in_flight(self, alive_only: bool = False) -> dict[int, str]:
        """{worker pid: the item it started and has not finished}; ``alive_only`` drops exited workers."""
        found = {}
        for path in Path(self.folder).glob("[0-9]*"):
            try:
                source = path.read_text(encoding="utf-8")
            except OSError:
                continue
            if source and (not alive_only or _is_running(int(path.name))):
                found[int(path.name)] = source
        return found

    def forget(self, pid: int) -> None:
        Path(self.folder, str(pid)).unlink(missing_ok=True)


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) still answers kill(0)
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return True


def _remove_tree_if_owner(path: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:
        shutil.rmtree(path, ignore_errors=True)


_WORKER_DIED = re.compile(r"DataLoader worker \(pids?\(?s?\)? ([\d, ]+)\)")


def explain_worker_failure(error: BaseException, dataset: Any) -> DataWorkerError | None:
    """A DataWorkerError naming what the dead or stuck worker(s) were reading, or None if ``error`` is not
    a worker death / timeout (or ``dataset`` does not track its workers)."""
    progress = getattr(dataset, "worker_progress", None)
    text = str(error)
    if progress is None or not isinstance(error, RuntimeError):
        return None
    in_flight = progress.in_flight()
    died = _WORKER_DIED.search(text)
    if died:
        pids = [int(p) for p in re.findall(r"\d+", died.group(1))]
        items = [f"pid {pid} was reading {in_flight[pid]}" for pid in pids if pid in in_flight]
        for pid in pids:
            progress.forget(pid)
        what = "; ".join(items) or f"it had finished its last item (pids {', '.join(map(str, pids))})"
        return DataWorkerError(f"a DataLoader worker died: {what}. Check that file (a decoder crash) or the "
                               f"memory limit; data.num_workers=0 reproduces it in the main process [{text.strip()}]")
    if "timed out" in text:
        in_flight = progress.in_flight(alive_only=True)
        items = "; ".join(f"pid {pid} is reading {source}" for pid, source in sorted(in_flight.items()))
        return DataWorkerError(f"{text.strip()}: {items or 'no worker was inside an item (a stalled collate?)'}")
    return None


def guard_workers(batches: Iterable, dataset: Any) -> Iterator:
    """Iterate ``batches`` (a DataLoader over ``dataset``); a dead or stuck worker raises a DataWorkerError
    naming the item it was reading, instead of torch's bare RuntimeError."""
    iterator = iter(batches)  # held here, so its workers are still alive while the failure is explained
    try:
        yield from iterator
    except RuntimeError as err:
        explained = explain_worker_failure(err, dataset)
        if explained is None:
            raise
        # The traceback's frames hold the loader iterator; dropping them lets it shut its workers down now,
        # instead of in a garbage-collection pass where its queues may already be torn down (a 5 s join each).
        err.__traceback__ = None
        del iterator
        raise explained from err


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


def _hash_fraction(key: str) -> float:
    """A stable value in [0, 1) per key, for order-independent train/val splits."""
    return zlib.crc32(key.encode("utf-8")) / 2**32


def _split_key(record: Record) -> str:
    return str(record.image) if isinstance(record.image, (str, Path)) else record.source


class StreamingImageTextDataset(_Retransformable, IterableDataset):
    """Iterable dataset over webdataset tar shards, sharded across DataLoader workers (and ranks).

    Shard ``k`` goes to worker ``k % (world_size * num_workers)``; bad samples and unreadable shards follow
    ``on_bad_image`` like ImageTextDataset. ``holdout=(fraction, "val")`` keeps only the samples whose key
    hashes below ``fraction`` (``"train"``: the rest), for a validation split without a second source.
    """

    def __init__(self, source: str | Path, transform: Callable | None = None, on_bad_image: str = "error",
                 max_pixels: int = DEFAULT_MAX_PIXELS, *, label_field: str = "label", seed: int = 0,
                 rank: int = 0, world_size: int = 1, holdout: tuple[float, str] | None = None):
        _check_policy(on_bad_image)
        if holdout is not None and (holdout[1] not in ("train", "val") or not 0 < holdout[0] < 1):
            raise ValueError(f"holdout: expected (fraction in (0, 1), 'train' or 'val'), got {holdout!r}")
        self.shards = shard_paths(source)
        self.transform, self.on_bad_image, self.max_pixels = transform, on_bad_image, max_pixels
        self.label_field, self.seed, self.rank, self.world_size = label_field, seed, rank, world_size
        self.holdout = holdout
        self.epoch: int | None = None
        self._log = SkipLog()
        self.worker_progress = WorkerProgress()

    def set_epoch(self, epoch: int | None) -> None:
        self.epoch = epoch

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return self._log.entries()

    def _my_shards(self) -> list[Path]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        total = self.world_size * workers
        return self.shards[self.rank * workers + worker:: total]

    def _keep(self, record: Record) -> bool:
        if self.holdout is None:
            return True
        fraction, part = self.holdout
        return (_hash_fraction(record.source) < fraction) == (part == "val")

    def __iter__(self) -> Iterator[dict]:
        for shard in self._my_shards():
            for item in iter_shard(shard, "label"):
                if isinstance(item, DataError):
                    if self.on_bad_image == "error":
                        raise item
                    self._log.add(str(shard), str(item))
                    continue
                if not self._keep(item):
                    continue
                self.worker_progress.start(f"{shard}:{item.source.split(':', 1)[-1]}")
                try:
                    image = load_image(item.image, max_pixels=self.max_pixels)
                except BadImageError as err:
                    if self.on_bad_image == "error":
                        raise BadImageError(f"{shard}:{item.source.split(':', 1)[-1]}", err.reason) from None
                    self._log.add(item.source, err.reason)
                    continue
                key = zlib.crc32(item.source.encode("utf-8"))
                caption = _pick_caption(item.captions, self.epoch, self.seed, key)
                sample = _sample(item, image, self.transform, caption, self.label_field, key)
                self.worker_progress.done()
                yield sample


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


def build_datasets(data: DataConfig, transform_train: Callable | None, transform_eval: Callable | None) -> dict:
    """The splits a run needs: train, val, and test when available (shapes: + compositional).

    ``data.source``: "shapes" (lazily generated from ``data.shapes``), "digits" (scikit-learn), or a path
    read with ``read_records`` (val split off train by ``val_fraction`` unless ``val_source`` is given;
    "test" only from ``test_source``). Tar shards give StreamingImageTextDatasets.
    """
    common = dict(on_bad_image=data.on_bad_image, max_pixels=data.max_image_pixels)

    def wrap(records, split, label_field="label"):
        transform = transform_train if split == "train" else transform_eval
        return ImageTextDataset(records, transform, label_field=label_field, **common)

    if data.source == "shapes":
        cfg = data.shapes
        sizes = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test, "compositional": cfg.n_compositional}
        return {split: wrap(ShapesRecords(n, split=split, config=cfg), split, data.label_field)
                for split, n in sizes.items()}
    if data.source == "digits":
        return {split: wrap(digits_records(split, data.split_seed), split, data.label_field)
                for split in ("train", "val", "test")}

    # Below, read_records applies data.label_field itself (a manifest column, or a key of its "attributes").
    read = dict(format=data.format, allow_absolute_paths=data.allow_absolute_paths, label_field=data.label_field,
                check_files=data.on_bad_image == "error")
    fmt = detect_format(data.source) if data.format == "auto" else data.format
    if fmt == "webdataset":
        def stream(source, split, holdout=None):
            transform = transform_train if split == "train" else transform_eval
            return StreamingImageTextDataset(source, transform, label_field=data.label_field, holdout=holdout,
                                             **common)

        out = {"train": stream(data.source, "train", None if data.val_source else (data.val_fraction, "train")),
               "val": stream(data.val_source or data.source, "val",
                             None if data.val_source else (data.val_fraction, "val"))}
        if data.test_source:
            out["test"] = stream(data.test_source, "test")
        return out
    train = read_records(data.source, **read)
    if data.val_source:
        val = read_records(data.val_source, **read)
    else:
        train, val = split_records(train, data.val_fraction)
    out = {"train": wrap(train, "train"), "val": wrap(val, "val")}
    if data.test_source:
        out["test"] = wrap(read_records(data.test_source, **read), "test")
    return out


def summarize(records: Sequence[Record], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Counts, caption lengths (words; characters for CJK), image size / mode histograms, labels, bad images."""
    sizes, modes, labels = collections.Counter(), collections.Counter(), collections.Counter()
    lengths, per_record, bad = [], [], []
    for record in records:
        per_record.append(len(record.captions))
        lengths.extend(len(c.split()) if c.isascii() else len(c) for c in record.captions)
        if record.label is not None:
            labels[record.label] += 1
        try:
            info = image_info(record.image, max_pixels=max_pixels)
        except BadImageError as err:
            bad.append((bad_image_source(record, err), err.reason))
            continue
        sizes[f"{info.width}x{info.height}"] += 1
        modes[info.mode] += 1

    def stats(values):
        if not values:
            return {"min": 0, "max": 0, "mean": 0.0, "median": 0.0}
        return {"min": min(values), "max": max(values), "mean": round(statistics.fmean(values), 2),
                "median": statistics.median(values)}

    return {"records": len(per_record), "captions": sum(per_record), "captions_per_record": stats(per_record),
            "caption_length": stats(lengths), "labels": dict(labels.most_common()),
            "image_sizes": dict(sizes.most_common()), "image_modes": dict(modes.most_common()), "bad_images": bad}
