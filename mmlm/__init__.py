"""mmlm: captioning, classification by prompt and text-to-image generation on one training harness.

>>> import mmlm
>>> captioner = mmlm.load("runs/demo/captioner")          # any folder mmlm saved
>>> captioner.caption(["photo.png"])
>>> captioner.classify(["photo.png"], ["circle", "square"])
>>> mmlm.train("configs/shapes_captioner.yaml", ["train.max_minutes=5"])
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {
    "VisionLanguageModel": "mmlm.models.vlm",
    "VLMConfig": "mmlm.models.vlm",
    "TextToImage": "mmlm.models.diffusion",
    "TextToImageConfig": "mmlm.models.diffusion",
    "Trainer": "mmlm.training",
    "Task": "mmlm.training",
    "RunConfig": "mmlm.config",
    "load_config": "mmlm.config",
    "train": "mmlm.api",
    "evaluate": "mmlm.api",
    "load": "mmlm.api",
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from mmlm.api import evaluate, load, train
    from mmlm.config import RunConfig, load_config
    from mmlm.models.diffusion import TextToImage, TextToImageConfig
    from mmlm.models.vlm import VisionLanguageModel, VLMConfig
    from mmlm.training import Task, Trainer


def __getattr__(name: str):
    """Import heavy modules (torch, transformers, diffusers) only when first used."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mmlm' has no attribute {name!r}")
