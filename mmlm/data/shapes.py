"""The embedded procedural dataset: coloured shapes on tinted backgrounds, with captions.

Every image holds 1-5 shapes (default 1-3), each in its own cell of a 3x3 grid (left, right,
top, bottom, center), so a caption that names each shape's size, colour, kind and position
describes the image exactly. ``parse_caption`` inverts every caption paraphrase back to those
attributes; ``captions_match`` is the "exact attribute match" that evaluation uses.

Sample ``i`` of a split is drawn from a numpy Generator seeded by ``(seed, split, i)``: it does
not depend on ``n``, on the process, or on the other samples. The ``compositional`` split holds
the colour-kind pairs in ``HELD_OUT_PAIRS``, which the other splits never contain.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mmlm.config import ConfigError, ShapesConfig

from .shapes_captions import (
    COLOURS, HELD_OUT_PAIRS, POSITIONS, SHAPE_KINDS, SIZES, WORD_ORDERS, _ZH, canonical_caption, caption_paraphrases,
    captions_match, make_captions, parse_caption,
)
from .sources import Record

# The vocabulary and the caption grammar live in shapes_captions; they are part of this module's API too.
__all__ = [
    "CELLS", "COLOURS", "HELD_OUT_PAIRS", "POSITIONS", "SHAPE_KINDS", "SIZES", "SPLITS", "ZH_WORDS", "ShapesRecords",
    "canonical_caption", "caption_paraphrases", "captions_match", "generate_shapes", "make_captions",
    "make_shapes_record", "parse_caption", "render_shapes", "scene_shapes", "write_dataset",
]

SPLITS = ("train", "val", "test", "compositional")
_SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}
_CELL = {"left": (0, 1), "right": (2, 1), "top": (1, 0), "bottom": (1, 2), "center": (1, 1)}  # (col, row)
_RADIUS = {"small": 0.22, "large": 0.38}  # half-extent as a fraction of the cell side
# Public views for the question generator (mmlm.data.vqa): grid cells and the Chinese attribute words.
CELLS = _CELL
ZH_WORDS = _ZH


# ----------------------------------------------------------------------------- generation


def _check_config(cfg: ShapesConfig) -> None:
    if cfg.image_size < 16:
        raise ConfigError(f"shapes.image_size: expected >= 16, got {cfg.image_size}")
    if not 1 <= cfg.min_shapes <= cfg.max_shapes <= len(POSITIONS):
        raise ConfigError(
            f"shapes.min_shapes/max_shapes: expected 1 <= min_shapes <= max_shapes <= {len(POSITIONS)}, "
            f"got {cfg.min_shapes}, {cfg.max_shapes}"
        )
    if cfg.language not in ("en", "zh"):
        raise ConfigError(f"shapes.language: expected 'en' or 'zh', got {cfg.language!r}")
    if cfg.word_order not in WORD_ORDERS:
        raise ConfigError(f"shapes.word_order: expected one of {WORD_ORDERS}, got {cfg.word_order!r}")
    if cfg.word_order == "position_kind_colour" and cfg.language != "en":
        raise ConfigError(f"shapes.word_order: {cfg.word_order!r} is English only (language is {cfg.language!r}: "
                          "its captions name the position first in every word order)")


def _pick_pair(rng: np.random.Generator, held_out: bool) -> tuple[str, str]:
    """A (colour, kind) pair: from HELD_OUT_PAIRS if ``held_out``, else from all the others."""
    if held_out:
        return HELD_OUT_PAIRS[rng.integers(len(HELD_OUT_PAIRS))]
    while True:
        pair = (list(COLOURS)[rng.integers(len(COLOURS))], SHAPE_KINDS[rng.integers(len(SHAPE_KINDS))])
        if pair not in HELD_OUT_PAIRS:
            return pair


def _sample_shapes(rng: np.random.Generator, cfg: ShapesConfig, split: str) -> list[dict]:
    count = int(rng.integers(cfg.min_shapes, cfg.max_shapes + 1))
    positions = [POSITIONS[i] for i in rng.permutation(len(POSITIONS))[:count]]
    shapes = []
    for i, position in enumerate(positions):
        # The compositional split guarantees a held-out pair in its first shape; later shapes may hold one too.
        if split == "compositional":
            held_out = i == 0 or rng.random() < 0.25
        else:
            held_out = False
        colour, kind = _pick_pair(rng, held_out)
        shapes.append({"kind": kind, "colour": colour, "size": SIZES[rng.integers(len(SIZES))], "position": position})
    # Canonical order: the main (largest) shape first, then by position order.
    shapes.sort(key=lambda s: (SIZES.index(s["size"]) * -1, POSITIONS.index(s["position"])))
    return shapes


def _star_points(cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        radius = r if i % 2 == 0 else r * 0.45
        a = angle - math.pi / 2 + i * math.pi / 5
        points.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
    return points


def _polygon(cx: float, cy: float, r: float, sides: int, angle: float) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(angle + 2 * math.pi * i / sides), cy + r * math.sin(angle + 2 * math.pi * i / sides))
            for i in range(sides)]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: dict, centre: tuple[float, float], r: float,
                angle: float, rgb: tuple[int, int, int]) -> None:
    cx, cy = centre
    kind = shape["kind"]
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=rgb)
    elif kind == "square":
        draw.polygon(_polygon(cx, cy, r * 1.2, 4, math.pi / 4 + angle), fill=rgb)  # r*1.2: similar area to the circle
    elif kind == "triangle":
        draw.polygon(_polygon(cx, cy + r * 0.15, r * 1.15, 3, -math.pi / 2 + angle), fill=rgb)
    elif kind == "star":
        draw.polygon(_star_points(cx, cy, r * 1.2, angle), fill=rgb)
    else:
        raise ValueError(f"unknown shape kind {kind!r}; expected one of {SHAPE_KINDS}")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A light tint with a linear gradient in a random direction, (size, size, 3) float."""
    base = rng.uniform(215, 250, size=3)
    amplitude = rng.uniform(0, 22, size=3)
    theta = rng.uniform(0, 2 * math.pi)
    ramp = np.linspace(-0.5, 0.5, size)
    t = math.cos(theta) * ramp[None, :] + math.sin(theta) * ramp[:, None]
    return base + t[..., None] * amplitude


def render_shapes(shapes: list[dict], rng: np.random.Generator, image_size: int = 64) -> Image.Image:
    """Draw ``shapes`` (attribute dicts) on a tinted background with mild noise; anti-aliased by supersampling."""
    factor = 4 if image_size <= 128 else 2 if image_size <= 256 else 1
    big = image_size * factor
    background = np.clip(_background(rng, image_size), 0, 255).astype(np.uint8)
    canvas = Image.fromarray(background).resize((big, big), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    cell = big / 3
    for shape in shapes:
        r = _RADIUS[shape["size"]] * cell * rng.uniform(0.92, 1.08)
        slack = max(cell / 2 - r * 1.2 - factor, 0.0)  # keeps the shape inside its cell
        col, row = _CELL[shape["position"]]
        centre = ((col + 0.5) * cell + rng.uniform(-slack, slack), (row + 0.5) * cell + rng.uniform(-slack, slack))
        jitter = rng.integers(-12, 13, size=3)
        rgb = tuple(int(v) for v in np.clip(np.array(COLOURS[shape["colour"]]) + jitter, 0, 255))
        _draw_shape(draw, shape, centre, r, rng.uniform(-0.2, 0.2), rgb)
    small = canvas.reduce(factor) if factor > 1 else canvas
    noise = rng.integers(-6, 7, size=(image_size, image_size, 3), dtype=np.int16)
    return Image.fromarray(np.clip(np.asarray(small, dtype=np.int16) + noise, 0, 255).astype(np.uint8))


def scene_shapes(index: int, *, split: str = "train", config: ShapesConfig | None = None,
                 seed: int | None = None) -> list[dict]:
    """The shapes of sample ``index`` (as in ``make_shapes_record(...).attributes["shapes"]``), without drawing it."""
    cfg = config or ShapesConfig()
    if split not in _SPLIT_IDS:
        raise ValueError(f"shapes split: expected one of {SPLITS}, got {split!r}")
    return _sample_shapes(np.random.default_rng([cfg.seed if seed is None else seed, _SPLIT_IDS[split], index]),
                          cfg, split)


def make_shapes_record(index: int, *, split: str = "train", config: ShapesConfig | None = None,
                       seed: int | None = None) -> Record:
    """Sample ``index`` of ``split``: the same bytes for the same (seed, split, index), whatever else is drawn."""
    cfg = config or ShapesConfig()
    if split not in _SPLIT_IDS:
        raise ValueError(f"shapes split: expected one of {SPLITS}, got {split!r}")
    seed = cfg.seed if seed is None else seed
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
    shapes = _sample_shapes(rng, cfg, split)
    image = render_shapes(shapes, rng, cfg.image_size)
    captions = make_captions(shapes, rng, cfg.language, word_order=cfg.word_order)
    main = shapes[0]
    attributes = {"shapes": shapes, "count": len(shapes), "kind": main["kind"], "colour": main["colour"],
                  "size": main["size"], "position": main["position"]}
    return Record(image=image, captions=captions, label=main["kind"], attributes=attributes,
                  source=f"shapes[{split},seed={seed}]:{index}")


def generate_shapes(n: int, *, split: str = "train", config: ShapesConfig | None = None,
                    seed: int | None = None) -> list[Record]:
    """``n`` shapes records of ``split`` (train | val | test | compositional) with in-memory PIL images."""
    cfg = config or ShapesConfig()
    _check_config(cfg)
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"generate_shapes: n must be a non-negative int, got {n!r}")
    return [make_shapes_record(i, split=split, config=cfg, seed=seed) for i in range(n)]


def write_dataset(records: list[Record], out_dir: str | Path) -> Path:
    """Write records as ``images/NNNNNN.png`` + ``manifest.jsonl`` (the format users bring); returns the manifest."""
    import json

    from .images import load_image

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.jsonl"
    with manifest.open("w", encoding="utf-8") as f:
        for i, record in enumerate(records):
            rel = f"images/{i:06d}.png"
            load_image(record.image).save(out / rel, format="PNG")
            row = {"image": rel, "captions": list(record.captions), "label": record.label,
                   "attributes": record.attributes}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return manifest


class ShapesRecords:
    """A lazy, indexable sequence of shapes records: record ``i`` is drawn when asked for (cheap, deterministic).

    DataLoader workers then generate in parallel, and a 20,000-image train split costs no memory up front.
    """

    def __init__(self, n: int, *, split: str = "train", config: ShapesConfig | None = None, seed: int | None = None):
        self.config = config or ShapesConfig()
        _check_config(self.config)
        if split not in _SPLIT_IDS:
            raise ValueError(f"shapes split: expected one of {SPLITS}, got {split!r}")
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"ShapesRecords: n must be a non-negative int, got {n!r}")
        self.n, self.split, self.seed = n, split, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Record:
        if not -self.n <= index < self.n:
            raise IndexError(f"shapes record {index} out of range for {self.n} records")
        return make_shapes_record(index % self.n, split=self.split, config=self.config, seed=self.seed)

    def __iter__(self):
        return (self[i] for i in range(self.n))
