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
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mmlm.config import ConfigError, ShapesConfig

from .sources import Record

SHAPE_KINDS = ("circle", "square", "triangle", "star")
COLOURS = {  # pairwise RGB distance >= 80, all far from the light backgrounds
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 80, 220),
    "yellow": (245, 215, 30),
    "purple": (140, 50, 200),
    "orange": (250, 135, 0),
}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
SPLITS = ("train", "val", "test", "compositional")
HELD_OUT_PAIRS = (("red", "triangle"), ("green", "circle"), ("blue", "star"), ("yellow", "square"))

_SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}
_CELL = {"left": (0, 1), "right": (2, 1), "top": (1, 0), "bottom": (1, 2), "center": (1, 1)}  # (col, row)
_RADIUS = {"small": 0.22, "large": 0.38}  # half-extent as a fraction of the cell side
_COUNT_EN = ("zero", "one", "two", "three", "four", "five")
_COUNT_ZH = ("零", "一", "两", "三", "四", "五")

_EN = {
    "position": {"left": "on the left", "right": "on the right", "top": "at the top",
                 "bottom": "at the bottom", "center": "in the center"},
    "relation": {"left": "to the left of", "right": "to the right of", "top": "above", "bottom": "below"},
}
_ZH = {
    "colour": {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色", "orange": "橙色"},
    "size": {"small": "小", "large": "大"},
    "kind": {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "星形"},
    "position": {"left": "左边", "right": "右边", "top": "上面", "bottom": "下面", "center": "中间"},
}
_OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
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
    captions = make_captions(shapes, rng, cfg.language)
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


# ----------------------------------------------------------------------------- captions


def _join_en(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _phrase(shape: dict, language: str) -> str:
    if language == "zh":
        return f"一个{_ZH['colour'][shape['colour']]}的{_ZH['size'][shape['size']]}{_ZH['kind'][shape['kind']]}"
    return f"a {shape['size']} {shape['colour']} {shape['kind']}"


def _position(shape: dict, language: str) -> str:
    return (_ZH if language == "zh" else _EN)["position"][shape["position"]]


def canonical_caption(shapes: list[dict], language: str = "en") -> str:
    """The one canonical caption: shapes in the given order, each with its position."""
    if language == "zh":
        return "，".join(_position(s, "zh") + _phrase(s, "zh") for s in shapes)
    return _join_en([f"{_phrase(s, 'en')} {_position(s, 'en')}" for s in shapes])


def caption_paraphrases(shapes: list[dict], language: str = "en", order: list[int] | None = None) -> list[str]:
    """Every non-canonical paraphrase of ``shapes``; ``order`` permutes the listing order."""
    listed = [shapes[i] for i in order] if order else list(shapes)
    n = len(shapes)
    relational = n == 2 and _OPPOSITE.get(shapes[0]["position"]) == shapes[1]["position"]
    if language == "zh":
        pos_first = "，".join(_position(s, "zh") + _phrase(s, "zh") for s in listed)
        shape_first = "，".join(f"{_phrase(s, 'zh')}在{_position(s, 'zh')}" for s in listed)
        out = [shape_first, "图中" + pos_first, "画面里，" + shape_first]
        if n >= 2:
            out.append(f"{_COUNT_ZH[n]}个图形：" + pos_first)
        if relational:
            a, b = shapes
            out.append(f"{_phrase(a, 'zh')}在{_phrase(b, 'zh')}的{_ZH['position'][a['position']]}")
            out.append(f"{_phrase(b, 'zh')}在{_phrase(a, 'zh')}的{_ZH['position'][b['position']]}")
        return out
    shape_first = _join_en([f"{_phrase(s, 'en')} {_position(s, 'en')}" for s in listed])
    pos_first = _join_en([f"{_position(s, 'en')} {_phrase(s, 'en')}" for s in listed])
    out = [pos_first, "there is " + shape_first, "an image of " + shape_first, "a picture with " + shape_first]
    if n >= 2:
        out.append(f"{_COUNT_EN[n]} shapes: " + shape_first)
    if relational:
        a, b = shapes
        out.append(f"{_phrase(a, 'en')} {_EN['relation'][a['position']]} {_phrase(b, 'en')}")
        out.append(f"{_phrase(b, 'en')} {_EN['relation'][b['position']]} {_phrase(a, 'en')}")
    return out


def make_captions(shapes: list[dict], rng: np.random.Generator, language: str = "en", k: int = 4) -> list[str]:
    """The canonical caption first, then ``k - 1`` distinct paraphrases (random listing order)."""
    order = [int(i) for i in rng.permutation(len(shapes))]
    options = caption_paraphrases(shapes, language, order)
    picks = rng.choice(len(options), size=min(k - 1, len(options)), replace=False)
    return [canonical_caption(shapes, language)] + [options[int(i)] for i in picks]


# ----------------------------------------------------------------------------- parsing

_EN_SHAPE = re.compile(
    r"(?:a|an|one)\s+(?P<size>{})\s+(?P<colour>{})\s+(?P<kind>{})\b".format(
        "|".join(SIZES), "|".join(COLOURS), "|".join(SHAPE_KINDS)))
_EN_POSITION = re.compile(r"(?P<pos>on the left|on the right|at the top|at the bottom|in the center|in the middle)\b")
_EN_RELATION = re.compile(r"(?P<rel>to the left of|to the right of|above|below)\b")
_EN_FILLER = re.compile(
    r"(?:there is|there are|an image of|an image with|a picture of|a picture with|and|with|"
    r"(?P<count>one|two|three|four|five) shapes?\s*:?)\b|[,;:.]")
_ZH_SHAPE = re.compile(r"(?:一个)?(?P<colour>{})的(?P<size>{})(?P<kind>{})".format(
    "|".join(_ZH["colour"].values()), "|".join(_ZH["size"].values()), "|".join(_ZH["kind"].values())))
_ZH_RELATION = re.compile(r"的(?P<rel>左边|右边|上面|下面)")
_ZH_POSITION = re.compile(r"(?P<pos>左边|右边|上面|下面|中间)")
_ZH_FILLER = re.compile(r"(?P<count>[一两二三四五])个图形[：:]?|图中|画面里|在|和|[，,、。；;：:]")

_EN_POS_WORDS = {v: k for k, v in _EN["position"].items()} | {"in the middle": "center"}
_EN_REL_WORDS = {v: k for k, v in _EN["relation"].items()}
_ZH_REVERSE = {field: {v: k for k, v in table.items()} for field, table in _ZH.items()}
_COUNT_WORDS = {w: i for i, w in enumerate(_COUNT_EN)} | {w: i for i, w in enumerate(_COUNT_ZH)} | {"二": 2}


def _tokens(text: str, language: str) -> list[tuple[str, dict]] | None:
    """Split a caption into shape / position / relation / count tokens; None if anything is left over."""
    if language == "zh":
        text = re.sub(r"\s+", "", text)
        patterns = (("S", _ZH_SHAPE), ("R", _ZH_RELATION), ("P", _ZH_POSITION), ("F", _ZH_FILLER))
    else:
        text = re.sub(r"\s+", " ", text.lower().replace("centre", "center")).strip()
        patterns = (("S", _EN_SHAPE), ("P", _EN_POSITION), ("R", _EN_RELATION), ("F", _EN_FILLER))
    tokens, pos = [], 0
    while pos < len(text):
        if text[pos] == " ":
            pos += 1
            continue
        for kind, pattern in patterns:
            m = pattern.match(text, pos)
            if m and m.end() > pos:
                tokens.append((kind, {k: v for k, v in m.groupdict().items() if v is not None}))
                pos = m.end()
                break
        else:
            return None
    return tokens


def parse_caption(text: str, language: str = "en") -> list[dict] | None:
    """Turn a caption (any paraphrase) back into shape attribute dicts; None if it does not parse."""
    if language not in ("en", "zh"):
        raise ValueError(f"parse_caption: language must be 'en' or 'zh', got {language!r}")
    if not isinstance(text, str):
        return None
    tokens = _tokens(text, language)
    if not tokens:
        return None
    counts = [_COUNT_WORDS[t["count"]] for kind, t in tokens if kind == "F" and "count" in t]
    core = [(kind, t) for kind, t in tokens if kind != "F"]
    pattern = "".join(kind for kind, _ in core)

    def shape(t: dict, position: str) -> dict:
        if language == "zh":
            return {"kind": _ZH_REVERSE["kind"][t["kind"]], "colour": _ZH_REVERSE["colour"][t["colour"]],
                    "size": _ZH_REVERSE["size"][t["size"]], "position": position}
        return {"kind": t["kind"], "colour": t["colour"], "size": t["size"], "position": position}

    shapes: list[dict]
    relation_patterns = {"en": "SRS", "zh": "SSR"}
    if pattern == relation_patterns[language]:
        if language == "zh":
            (_, a), (_, b), (_, r) = core
            rel = _ZH_REVERSE["position"][r["rel"]]
        else:
            (_, a), (_, r), (_, b) = core
            rel = _EN_REL_WORDS[r["rel"]]
        shapes = [shape(a, rel), shape(b, _OPPOSITE[rel])]
    elif pattern and re.fullmatch(r"(SP)+|(PS)+", pattern):
        step = [core[i:i + 2] for i in range(0, len(core), 2)]
        shapes = []
        for pair in step:
            (s,) = [t for kind, t in pair if kind == "S"]
            (p,) = [t for kind, t in pair if kind == "P"]
            position = _ZH_REVERSE["position"][p["pos"]] if language == "zh" else _EN_POS_WORDS[p["pos"]]
            shapes.append(shape(s, position))
    else:
        return None
    if counts and any(c != len(shapes) for c in counts):
        return None
    return shapes


def _key(shape: dict) -> tuple:
    return (shape.get("kind"), shape.get("colour"), shape.get("size"), shape.get("position"))


def captions_match(predicted: str, attributes: dict, language: str = "en") -> bool:
    """Exact attribute match: the caption names every shape with the right size, colour, kind and position."""
    if not isinstance(attributes, dict) or not isinstance(attributes.get("shapes"), list):
        raise TypeError(f"captions_match: attributes must be a shapes record's attributes (a dict with a 'shapes' "
                        f"list), got {attributes!r:.80}")
    parsed = parse_caption(predicted, language)
    if parsed is None:
        return False
    return sorted(map(_key, parsed)) == sorted(map(_key, attributes["shapes"]))


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
