"""Pieces every image-text task shares: the data splits, the caption corpus, batching."""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from mmlm.config import RunConfig
from mmlm.data.datasets import build_datasets

CORPUS_RECORDS = 5000  # records read to train a tokenizer from scratch (the vocabulary saturates far earlier)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / FSDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def image_text_splits(config: RunConfig, model: nn.Module) -> dict[str, Dataset]:
    """The run's data splits, preprocessed the way ``model`` wants its images."""
    return build_datasets(config.data, model.image_transform(train=True), model.image_transform(train=False))


def caption_corpus(config: RunConfig, texts_of=lambda record: record.captions) -> list[str]:
    """Texts from the training split, for a tokenizer trained from scratch."""
    splits = build_datasets(config.data, None, None)
    records = getattr(splits["train"], "records", None)
    if records is None:  # a streamed dataset: read its first items
        items = itertools.islice(iter(splits["train"]), CORPUS_RECORDS)
        return [text for item in items for text in item["captions"]]
    n = min(len(records), CORPUS_RECORDS)
    return [text for i in range(n) for text in texts_of(records[i])]


def collate_images_and_texts(samples: list[dict]) -> dict[str, Any]:
    """Stack pixel values; keep captions, labels and attributes as lists."""
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "captions": [s["captions"] for s in samples],
        "label": [s["label"] for s in samples],
        "attributes": [s["attributes"] for s in samples],
    }


def iterate_dataset(dataset: Dataset, batch_size: int, limit: int | None = None):
    """Batches of raw items for evaluation (main process, in order, no workers)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         collate_fn=collate_images_and_texts)
    seen = 0
    for batch in loader:
        if limit is not None and seen >= limit:
            return
        if limit is not None and seen + len(batch["caption"]) > limit:
            keep = limit - seen
            batch = {k: v[:keep] for k, v in batch.items()}
        seen += len(batch["caption"])
        yield batch
