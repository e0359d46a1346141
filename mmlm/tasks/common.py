"""What every image-text task shares: the run's splits (built once), the caption corpus, batching, saved folders."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from mmlm.config import RunConfig
from mmlm.data.datasets import build_datasets, collate_image_text
from mmlm.data.sources import Record
from mmlm.training.task import Task

CORPUS_RECORDS = 5000  # records read to train a tokenizer from scratch (the vocabulary saturates far earlier)
MODEL_KINDS = {"VisionLanguageModel": "vision_language", "TextToImage": "text_to_image"}


class ImageTextTask(Task):
    """A task on image-text splits. The splits are read once per run (per process) and reused for the
    tokenizer corpus, the label space, training and every evaluation; the model's image transforms are
    attached to copies that share the records."""

    def __init__(self, config: RunConfig):
        super().__init__(config)
        self._splits: dict[str, Dataset] | None = None

    def splits(self) -> dict[str, Dataset]:
        """The run's splits as the data source gives them (no image transform), built on first use."""
        if self._splits is None:
            self._splits = build_datasets(self.config.data, None, None, seed=self.config.train.seed)
        return self._splits

    def freeze_part(self, model: nn.Module, name: str, part: nn.Module) -> None:
        """A part with ``train.module_lr`` 0: no gradients and eval mode for good (``models.freezing.freeze``)."""
        from mmlm.models.freezing import freeze

        freeze(part)

    def build_datasets(self, model: nn.Module) -> dict[str, Dataset]:
        """The splits, preprocessed the way ``model`` wants its images (train: its training transform)."""
        return {split: dataset.with_transform(model.image_transform(train=split == "train"))
                for split, dataset in self.splits().items()}

    def collate(self, samples: list) -> dict[str, Any]:
        return collate_image_text(samples)

    def training_captions(self, batch: dict) -> list[str]:
        """The caption each sample trains on: its first (``data.caption_choice: first``) or the epoch's pick."""
        if self.config.data.caption_choice == "first":
            return [captions[0] for captions in batch["captions"]]
        return batch["caption"]


def caption_corpus(train: Dataset, texts_of: Callable[[Record], list[str]] = lambda record: record.captions
                   ) -> list[str]:
    """Texts from the training split, for a tokenizer trained from scratch (streamed data: its first items)."""
    records = getattr(train, "records", None)
    if records is None:
        items = itertools.islice(iter(train), CORPUS_RECORDS)
        return [text for item in items for text in item["captions"]]
    n = min(len(records), CORPUS_RECORDS)
    return [text for i in range(n) for text in texts_of(records[i])]


def iterate_dataset(dataset: Dataset, batch_size: int, limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Batches of raw items for evaluation (main process, in order, no workers), at most ``limit`` items."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         collate_fn=collate_image_text)
    seen = 0
    for batch in loader:
        if limit is not None and seen >= limit:
            return
        if limit is not None and seen + len(batch["caption"]) > limit:
            keep = limit - seen
            batch = {k: v[:keep] for k, v in batch.items()}
        seen += len(batch["caption"])
        yield batch


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / FSDP / torch.compile wrappers (what ``accelerator.unwrap_model`` does)."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_torch_compile=False)


# ------------------------------------------------------------------------------------------
# Saved model folders
# ------------------------------------------------------------------------------------------


def model_folder(path: str | Path) -> Path:
    """Accept a run folder (uses its ``model/``) as well as a saved model folder."""
    path = Path(path)
    if not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
        return path / "model"
    return path


def model_kind(path: str | Path) -> str:
    """'vision_language' or 'text_to_image', read from a saved folder's config.json.

    The class is under ``model_class``; folders saved before the key was unified have ``_class_name``.
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a saved mmlm model (no config.json)")
    try:
        meta = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_file}: invalid JSON ({err})") from err
    class_name = meta.get("model_class") or meta.get("_class_name") if isinstance(meta, dict) else None
    if class_name not in MODEL_KINDS:
        raise ValueError(f"{config_file}: model class is {class_name!r}; expected one of {', '.join(MODEL_KINDS)} "
                         "(was this folder saved by mmlm?)")
    return MODEL_KINDS[class_name]


def load_vision_language_model(path: str | Path) -> nn.Module:
    """The VisionLanguageModel saved in ``path`` (a model folder or a run folder)."""
    from mmlm.models import VisionLanguageModel

    path = model_folder(path)
    if model_kind(path) != "vision_language":
        raise ValueError(f"{path} holds a text-to-image model; captioning and classification need a "
                         "vision-language model")
    from mmlm.models.compress import is_compressed, load_compressed  # `mmlm compress` folders (int8)

    return load_compressed(path) if is_compressed(path) else VisionLanguageModel.from_pretrained(path)


def load_text_to_image_model(path: str | Path) -> nn.Module:
    """The TextToImage model saved in ``path`` (a model folder or a run folder)."""
    from mmlm.models.compress import is_compressed, load_compressed  # `mmlm compress` folders (int8 denoiser)
    from mmlm.models.diffusion import TextToImage

    path = model_folder(path)
    if model_kind(path) != "text_to_image":
        raise ValueError(f"{path} holds a vision-language model; generation needs a text-to-image model")
    return load_compressed(path) if is_compressed(path) else TextToImage.from_pretrained(path)
