"""The shapes data's words: attribute vocabulary (English and Chinese) and the caption grammar.

``caption_paraphrases`` / ``make_captions`` say a scene in several word orders; ``parse_caption`` inverts
every one of them back to the attributes, so ``captions_match`` ("exact attribute match") needs no model.
"""

from __future__ import annotations

import re

import numpy as np

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
HELD_OUT_PAIRS = (("red", "triangle"), ("green", "circle"), ("blue", "star"), ("yellow", "square"))

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



def _join_en(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def colour_kind_words(colour: str, kind: str, word_order: str = "colour_kind") -> str:
    """How an English caption names a shape after its size: "green circle", or "circle in green" (kind first)."""
    return f"{colour} {kind}" if word_order == "colour_kind" else f"{kind} in {colour}"


def _phrase(shape: dict, language: str, word_order: str = "colour_kind") -> str:
    if language == "zh":
        colour, size, kind = (_ZH[field][shape[field]] for field in ("colour", "size", "kind"))
        # kind_colour: "一个大圆形是绿色的" (a large circle that is green), the kind before the colour
        return f"一个{size}{kind}是{colour}的" if word_order == "kind_colour" else f"一个{colour}的{size}{kind}"
    return f"a {shape['size']} {colour_kind_words(shape['colour'], shape['kind'], word_order)}"


def _position(shape: dict, language: str) -> str:
    return (_ZH if language == "zh" else _EN)["position"][shape["position"]]


WORD_ORDERS = ("colour_kind", "kind_colour", "position_kind_colour")


def canonical_caption(shapes: list[dict], language: str = "en", word_order: str = "colour_kind") -> str:
    """The one canonical caption: shapes in the given order, each with its position. English ``word_order``:
    ``colour_kind`` "a large green circle on the left", ``kind_colour`` "a large circle in green on the left",
    ``position_kind_colour`` "on the left a large circle in green". Chinese names the position first and
    says ``colour_kind`` "左边一个绿色的大圆形" or ``kind_colour`` "左边一个大圆形是绿色的"."""
    if word_order not in WORD_ORDERS:
        raise ValueError(f"word_order: expected one of {WORD_ORDERS}, got {word_order!r}")
    if language == "zh":
        return "，".join(_position(s, "zh") + _phrase(s, "zh", word_order) for s in shapes)
    if word_order == "position_kind_colour":
        return _join_en([f"{_position(s, 'en')} {_phrase(s, 'en', word_order)}" for s in shapes])
    return _join_en([f"{_phrase(s, 'en', word_order)} {_position(s, 'en')}" for s in shapes])


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


def make_captions(shapes: list[dict], rng: np.random.Generator, language: str = "en", k: int = 4,
                  word_order: str = "colour_kind") -> list[str]:
    """The canonical caption first, then ``k - 1`` distinct paraphrases (random listing order)."""
    order = [int(i) for i in rng.permutation(len(shapes))]
    options = caption_paraphrases(shapes, language, order)
    picks = rng.choice(len(options), size=min(k - 1, len(options)), replace=False)
    return [canonical_caption(shapes, language, word_order)] + [options[int(i)] for i in picks]


# ----------------------------------------------------------------------------- parsing

_EN_SHAPE = re.compile(
    r"(?:a|an|one)\s+(?P<size>{})\s+(?P<colour>{})\s+(?P<kind>{})\b".format(
        "|".join(SIZES), "|".join(COLOURS), "|".join(SHAPE_KINDS)))
_EN_SHAPE_KIND_FIRST = re.compile(
    r"(?:a|an|one)\s+(?P<size>{})\s+(?P<kind>{})\s+in\s+(?P<colour>{})\b".format(
        "|".join(SIZES), "|".join(SHAPE_KINDS), "|".join(COLOURS)))
_EN_POSITION = re.compile(r"(?P<pos>on the left|on the right|at the top|at the bottom|in the center|in the middle)\b")
_EN_RELATION = re.compile(r"(?P<rel>to the left of|to the right of|above|below)\b")
_EN_FILLER = re.compile(
    r"(?:there is|there are|an image of|an image with|a picture of|a picture with|and|with|"
    r"(?P<count>one|two|three|four|five) shapes?\s*:?)\b|[,;:.]")
_ZH_SHAPE = re.compile(r"(?:一个)?(?P<colour>{})的(?P<size>{})(?P<kind>{})".format(
    "|".join(_ZH["colour"].values()), "|".join(_ZH["size"].values()), "|".join(_ZH["kind"].values())))
_ZH_SHAPE_KIND_FIRST = re.compile(r"(?:一个)?(?P<size>{})(?P<kind>{})是(?P<colour>{})的".format(
    "|".join(_ZH["size"].values()), "|".join(_ZH["kind"].values()), "|".join(_ZH["colour"].values())))
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
        patterns = (("S", _ZH_SHAPE), ("S", _ZH_SHAPE_KIND_FIRST), ("R", _ZH_RELATION), ("P", _ZH_POSITION),
                    ("F", _ZH_FILLER))
    else:
        text = re.sub(r"\s+", " ", text.lower().replace("centre", "center")).strip()
        patterns = (("S", _EN_SHAPE), ("S", _EN_SHAPE_KIND_FIRST), ("P", _EN_POSITION), ("R", _EN_RELATION),
                    ("F", _EN_FILLER))
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
