"""Streamed webdataset shards as an IterableDataset: split by process and by DataLoader worker, shuffled, resumable.

The stream of one epoch is the same on every process and worker: the shards in an order drawn from
(seed, epoch), their samples through a shuffle buffer drawn from the same seed. Process ``r`` of ``W``
keeps the samples ``g`` with ``g % W == r``; worker ``w`` of ``n`` keeps every ``n``-th of those. So every
process reads the tars (cheap: bytes) but decodes only its own images, the split does not depend on how
many shards there are, and ``W`` processes x batch ``B`` see the same samples per step as 1 process x ``W*B``.
Processes may end an epoch one batch apart (the trainer stops all of them at the first that runs out).

Resume: ``skip(batches, batch_size)`` drops the first ``batches`` batches of this process's stream before
decoding them (each worker its share; the DataLoader takes batches from its workers in turn).

Why not ``webdataset.WebDataset`` (in the dev extra) with ``split_by_node`` / ``split_by_worker`` /
``shuffle``: it splits by shard (ranks get unequal sample counts and a job with fewer shards than processes
gets nothing), it has no position to resume from, and its errors do not name the shard and key.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from .images import DEFAULT_MAX_PIXELS, BadImageError, load_image
from .records import Record
from .samples import _check_policy, _hash_fraction, _pick_caption, _Retransformable, _sample
from .shards import iter_shard, shard_paths
from .sources import DataError
from .workers import SkipLog, WorkerProgress


def shuffled(items: Iterator, buffer_size: int, rng: np.random.Generator) -> Iterator:
    """Items through a shuffle buffer of ``buffer_size`` (0 or 1: unchanged), drawing from ``rng``."""
    if buffer_size <= 1:
        yield from items
        return
    buffer: list = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        j = int(rng.integers(buffer_size))
        yield buffer[j]
        buffer[j] = item
    for j in rng.permutation(len(buffer)):
        yield buffer[j]


class StreamingImageTextDataset(_Retransformable, IterableDataset):
    """Iterable dataset over webdataset tar shards (see the module docstring for the split and the order).

    ``shuffle=True`` draws the shard order and a ``shuffle_buffer``-sample buffer from (seed, epoch); bad
    samples and unreadable shards follow ``on_bad_image``. ``holdout=(fraction, "val")`` keeps only the
    samples whose key hashes below ``fraction`` (``"train"``: the rest), for a validation split without a
    second source.
    """

    def __init__(self, source: str | Path, transform: Callable | None = None, on_bad_image: str = "error",
                 max_pixels: int = DEFAULT_MAX_PIXELS, *, label_field: str = "label", seed: int = 0,
                 rank: int = 0, world_size: int = 1, holdout: tuple[float, str] | None = None,
                 shuffle: bool = False, shuffle_buffer: int = 1000):
        _check_policy(on_bad_image)
        if holdout is not None and (holdout[1] not in ("train", "val") or not 0 < holdout[0] < 1):
            raise ValueError(f"holdout: expected (fraction in (0, 1), 'train' or 'val'), got {holdout!r}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer: expected >= 0, got {shuffle_buffer}")
        self.shards = shard_paths(source)
        self.transform, self.on_bad_image, self.max_pixels = transform, on_bad_image, max_pixels
        self.label_field, self.seed, self.holdout = label_field, seed, holdout
        self.shuffle, self.shuffle_buffer = shuffle, shuffle_buffer
        self.epoch: int | None = None
        self._skip = (0, 0)
        self.set_distributed(rank, world_size)
        self._log = SkipLog()
        self.worker_progress = WorkerProgress()

    def set_epoch(self, epoch: int | None) -> None:
        self.epoch = epoch

    def set_distributed(self, rank: int, world_size: int) -> None:
        """This process's place among ``world_size`` (the trainer sets it; evaluation reads everything)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.rank, self.world_size = rank, world_size

    def skip(self, batches: int, batch_size: int) -> None:
        """Start iterations ``batches`` batches of ``batch_size`` into this process's stream (the trainer sets
        it before every epoch: 0 unless it resumes inside that epoch)."""
        self._skip = (batches, batch_size)

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return self._log.entries()

    def _keep(self, record: Record) -> bool:
        if self.holdout is None:
            return True
        fraction, part = self.holdout
        return (_hash_fraction(record.source) < fraction) == (part == "val")

    def _rng(self, stream: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, self.epoch or 0, stream))

    def _records(self) -> Iterator[Record]:
        """The epoch's whole stream (every process and worker sees the same), bad shards per policy."""
        order = self._rng(0).permutation(len(self.shards)) if self.shuffle else range(len(self.shards))

        def read() -> Iterator[Record]:
            for k in order:
                shard = self.shards[k]
                for item in iter_shard(shard, "label"):
                    if isinstance(item, DataError):
                        if self.on_bad_image == "error":
                            raise item
                        self._log.add(str(shard), str(item))
                    elif self._keep(item):
                        yield item

        return shuffled(read(), self.shuffle_buffer if self.shuffle else 0, self._rng(1))

    def _worker_skip(self, worker: int, workers: int) -> int:
        """Samples this worker drops for ``skip``: its share of the first skipped batches of the process."""
        batches, batch_size = self._skip
        mine = (batches - worker + workers - 1) // workers if batches > worker else 0
        return mine * batch_size

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        to_skip = self._worker_skip(worker, workers)
        mine = 0
        for g, item in enumerate(self._records()):
            if g % self.world_size != self.rank:
                continue
            local = g // self.world_size
            if local % workers != worker:
                continue
            mine += 1
            if mine <= to_skip:
                continue
            sample = self._decode(item)
            if sample is not None:
                yield sample

    def _decode(self, item: Record) -> dict | None:
        where = item.source
        self.worker_progress.start(where)
        try:
            image = load_image(item.image, max_pixels=self.max_pixels)
        except BadImageError as err:
            if self.on_bad_image == "error":
                raise BadImageError(where, err.reason) from None
            self._log.add(where, err.reason)
            return None
        key = zlib.crc32(item.source.encode("utf-8"))
        caption = _pick_caption(item.captions, self.epoch, self.seed, key)
        sample = _sample(item, image, self.transform, caption, self.label_field, key)
        self.worker_progress.done()
        return sample
