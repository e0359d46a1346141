"""Models: the vision-language model, the text-to-image model, and their parts.

Names load lazily, so ``from mmlm.models import VisionLanguageModel`` imports neither diffusers
nor the text-to-image modules.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_LAZY = {
    # the text-to-image names come from the diffusion package, wherever its parts live inside it
    "AutoencoderConfig": "mmlm.models.diffusion",
    "DenoiserConfig": "mmlm.models.diffusion",
    "TextToImage": "mmlm.models.diffusion",
    "TextToImageConfig": "mmlm.models.diffusion",
    "LanguageConfig": "mmlm.models.language",
    "train_tokenizer": "mmlm.models.language",
    "ProjectorConfig": "mmlm.models.projector",
    "build_projector": "mmlm.models.projector",
    "TextEncoder": "mmlm.models.diffusion",
    "TextEncoderConfig": "mmlm.models.diffusion",
    "VisionConfig": "mmlm.models.vision",
    "VisionEncoder": "mmlm.models.vision",
    "VisionLanguageModel": "mmlm.models.vlm",
    "VLMConfig": "mmlm.models.vlm",
    "VLMOutput": "mmlm.models.vlm",
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from mmlm.models.diffusion import (
        AutoencoderConfig, DenoiserConfig, TextEncoder, TextEncoderConfig, TextToImage, TextToImageConfig,
    )
    from mmlm.models.language import LanguageConfig, train_tokenizer
    from mmlm.models.projector import ProjectorConfig, build_projector
    from mmlm.models.vision import VisionConfig, VisionEncoder
    from mmlm.models.vlm import VisionLanguageModel, VLMConfig, VLMOutput


def __getattr__(name: str):
    """Import a model's module only when its name is first used."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mmlm.models' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
