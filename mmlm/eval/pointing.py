"""The pointing game on the shapes data: does a word's relevance map peak inside the shape it names?

For each shape a caption names, the maps of its colour word and kind word are added; a hit is
a peak inside the shape's box. The chance rate is the mean box area fraction (where a peak drawn
uniformly at random would land). Boxes are read from the rendered image: the pixels of the
shape's colour inside its grid cell (each shape lies inside its own cell).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np
import torch

from mmlm.data.shapes import CELLS, COLOURS, canonical_caption

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, end-exclusive
COLOUR_TOLERANCE = 90.0  # RGB distance: the render jitters colours by +-12 per channel and anti-aliases edges


@dataclasses.dataclass
class PointingResult:
    hits: int
    total: int  # shapes named by the caption and scored
    unnamed: int  # shapes the caption does not name (colour + kind), or names ambiguously
    chance_rate: float

    @property
    def hit_rate(self) -> float:
        return self.hits / self.total if self.total else float("nan")

    def as_dict(self, prefix: str = "pointing") -> dict[str, float]:
        return {f"{prefix}/hit_rate": self.hit_rate, f"{prefix}/chance_rate": self.chance_rate,
                f"{prefix}/shapes": float(self.total), f"{prefix}/unnamed": float(self.unnamed)}


def shape_box(image, shape: dict) -> Box:
    """The tight box of ``shape`` in a shapes image (its colour's pixels inside its cell); the cell if none."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    height, width = pixels.shape[:2]
    col, row = CELLS[shape["position"]]
    x0, x1 = round(col * width / 3), round((col + 1) * width / 3)
    y0, y1 = round(row * height / 3), round((row + 1) * height / 3)
    cell = pixels[y0:y1, x0:x1]
    close = np.linalg.norm(cell - np.asarray(COLOURS[shape["colour"]], dtype=np.float32), axis=-1) < COLOUR_TOLERANCE
    ys, xs = np.nonzero(close)
    if len(xs) == 0:
        return x0, y0, x1, y1
    return x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1


def peak_in_box(relevance: torch.Tensor, box: Box) -> bool:
    """True when the maximum of an (H, W) map lies inside ``box``."""
    if relevance.ndim != 2:
        raise ValueError(f"peak_in_box: expected an (H, W) map, got shape {tuple(relevance.shape)}")
    y, x = divmod(int(torch.argmax(relevance)), relevance.shape[1])
    x0, y0, x1, y1 = box
    return x0 <= x < x1 and y0 <= y < y1


def box_fraction(box: Box, size: tuple[int, int]) -> float:
    """The box's area as a fraction of an (H, W) image."""
    x0, y0, x1, y1 = box
    return (x1 - x0) * (y1 - y0) / (size[0] * size[1])


def named_words(words: Sequence[str], shape: dict, window: int = 2) -> list[int] | None:
    """Indices of the colour and kind words naming ``shape`` ("red" then "circle" within ``window`` words);
    None when the caption names it not once or more than once."""
    clean = [w.lower().strip(".,;:!?") for w in words]
    found = [[i, j] for i, w in enumerate(clean) if w == shape["colour"]
             for j in range(i + 1, min(i + 1 + window, len(clean))) if clean[j] == shape["kind"]]
    return found[0] if len(found) == 1 else None


def score_maps(word_maps: Callable[[int], torch.Tensor], words: Sequence[str], shapes: Sequence[dict],
               boxes: Sequence[Box], size: tuple[int, int]) -> tuple[int, int, int, float]:
    """(hits, scored, unnamed, summed chance) for one image; ``word_maps(i)`` is word i's (H, W) map."""
    hits = scored = unnamed = 0
    chance = 0.0
    for shape, box in zip(shapes, boxes):
        indices = named_words(words, shape)
        if indices is None:
            unnamed += 1
            continue
        combined = sum(word_maps(i) for i in indices)
        hits += peak_in_box(combined, box)
        scored += 1
        chance += box_fraction(box, size)
    return hits, scored, unnamed, chance


def pointing_game(model, records: Sequence, method: str = "rollout", caption: str = "given") -> PointingResult:
    """Play the game on shapes ``records`` (English captions).

    ``caption="given"`` explains each scene's canonical caption (every shape is named);
    ``"generated"`` explains the model's own greedy caption (shapes it does not name count as unnamed).
    """
    from mmlm.models.explain import explain

    if caption not in ("given", "generated"):
        raise ValueError(f"caption: expected 'given' or 'generated', got {caption!r}")
    hits = total = unnamed = 0
    chance = 0.0
    for record in records:
        shapes = record.attributes["shapes"]
        text = canonical_caption(shapes) if caption == "given" else None
        explanation = explain(model, [record.image], text=text)[0]
        size = record.image.size[::-1]
        boxes = [shape_box(record.image, s) for s in shapes]
        h, n, u, c = score_maps(lambda i: explanation.word_map(i, method), [w for w, _ in explanation.words],
                                shapes, boxes, size)
        hits, total, unnamed, chance = hits + h, total + n, unnamed + u, chance + c
    return PointingResult(hits=hits, total=total, unnamed=unnamed, chance_rate=chance / total if total else 0.0)
