"""Inference plumbing shared by captioning and classification: image lists, batch offsets, eval mode."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn


class eval_mode:
    """Context manager: module in eval mode, previous mode restored afterwards."""

    def __init__(self, module: nn.Module):
        self.module, self.was_training = module, module.training

    def __enter__(self):
        self.module.eval()

    def __exit__(self, *exc):
        self.module.train(self.was_training)


def batch_starts(n: int, batch_size: int, progress: bool, what: str):
    """Batch offsets, with a progress bar over the images when asked."""
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    starts = range(0, n, batch_size)
    if not progress:
        return starts
    from tqdm.auto import tqdm

    return tqdm(starts, desc=what, unit="batch", total=len(starts))


def as_image_list(images: Any) -> list:
    """One image, a list of images, or a 4D array / tensor (a batch) -> a non-empty list."""
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        images = list(images)
    elif isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    elif not isinstance(images, (list, tuple)):
        images = [images]
    if len(images) == 0:
        raise ValueError("images: expected at least one image, got an empty list")
    return list(images)
