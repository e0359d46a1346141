"""scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download) as RGB image-label records."""

from __future__ import annotations

import numpy as np
from PIL import Image

from .sources import Record

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLIT_FRACTIONS = {"train": (0.0, 0.8), "val": (0.8, 0.9), "test": (0.9, 1.0)}


def digits_records(split: str, seed: int = 0, *, image_size: int = 32, resample: str = "bilinear") -> list[Record]:
    """One split (train 80% / val 10% / test 10%, a seeded permutation) as dark ink on white, upsampled RGB.

    Labels are the digit words ("zero".."nine"); captions are "a handwritten {word}" and "the digit {word}".
    """
    if split not in SPLIT_FRACTIONS:
        raise ValueError(f"digits split: expected one of {', '.join(SPLIT_FRACTIONS)}, got {split!r}")
    if resample not in ("nearest", "bilinear"):
        raise ValueError(f"digits resample: expected 'nearest' or 'bilinear', got {resample!r}")
    if image_size < 8:
        raise ValueError(f"digits image_size: expected >= 8, got {image_size}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    chosen = digits_split_indices(split, seed, len(digits.target))
    method = Image.NEAREST if resample == "nearest" else Image.BILINEAR
    records = []
    for i in chosen:
        ink = np.clip(255 - digits.images[i] * (255 / 16), 0, 255).astype(np.uint8)
        image = Image.fromarray(ink).resize((image_size, image_size), method).convert("RGB")
        word = DIGIT_WORDS[int(digits.target[i])]
        records.append(Record(image=image, captions=[f"a handwritten {word}", f"the digit {word}"], label=word,
                              attributes={"digit": int(digits.target[i])}, source=f"sklearn-digits:{int(i)}"))
    return records


def digits_split_indices(split: str, seed: int = 0, n: int = 1797) -> np.ndarray:
    """Indices into ``sklearn.datasets.load_digits()`` of one split: a seeded permutation cut 80/10/10."""
    if split not in SPLIT_FRACTIONS:
        raise ValueError(f"digits split: expected one of {', '.join(SPLIT_FRACTIONS)}, got {split!r}")
    order = np.random.default_rng(seed).permutation(n)
    lo, hi = SPLIT_FRACTIONS[split]
    return order[int(lo * n): int(hi * n)]
