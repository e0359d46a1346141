"""The VLM's token-sequence conventions, shared by the model, generation and label scoring."""

from __future__ import annotations

import torch

from mmlm.models.language import IMAGE_TOKEN

IGNORE_INDEX = -100  # label of every position that is not part of the answer


def check_prompt(prompt: str, where: str) -> None:
    """A prompt is a string with at most one ``<image>`` marker (one image per sample)."""
    if not isinstance(prompt, str):
        raise TypeError(f"{where}: expected str, got {type(prompt).__name__}")
    if prompt.count(IMAGE_TOKEN) > 1:
        raise ValueError(f"{where}: at most one '{IMAGE_TOKEN}' per prompt (one image per sample), got {prompt!r}")


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding (left or right): 0 at each sample's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
