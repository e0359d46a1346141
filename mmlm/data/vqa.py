"""Embedded VQA: questions about the shapes scenes, with answers computed from the scene.

Families (``FAMILIES``), each asked only where its answer is unique for the scene:

- ``colour``: "what colour is the circle?" (only kinds that occur exactly once)
- ``kind_at``: "what shape is at the top?" (every occupied cell)
- ``count``: "how many circles are there?" / "how many shapes are there?" (answers are digits, 0 included)
- ``exists``: "is there a red star?" (yes / no)
- ``relation``: "what is to the left of the blue square?" (the reference named by a colour-kind pair that occurs
  once; exactly one shape on that side of it along its row (left / right) or column (above / below))

Questions come in English or Chinese. For each (family, question) the generator draws a family uniformly among
those the scene can answer, then an answer uniformly among that family's possible answers, then a question with
that answer: yes and no are equally likely for ``exists``, and counts are not biased towards 1.

The questions of image ``i`` are drawn together (distinct) from a Generator seeded by ``(seed, split, i)``, over
the shapes record ``i`` of the same split (the same image the captioning data shows). Outside the
``compositional`` split no question or answer names a pair of ``HELD_OUT_PAIRS``; in it, every question is about
a held-out pair (its subject, its answer, or a shape it counts).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from torch.utils.data import Dataset

from mmlm.config import ShapesConfig

from .shapes import (CELLS, COLOURS, HELD_OUT_PAIRS, SHAPE_KINDS, SPLITS, ZH_WORDS, ShapesRecords,
                     scene_shapes)

FAMILIES = ("colour", "kind_at", "count", "exists", "relation")
LANGUAGES = ("en", "zh", "mixed")
DIRECTIONS = ("left", "right", "above", "below")
_STEP = {"left": (-1, 0), "right": (1, 0), "above": (0, -1), "below": (0, 1)}  # (d col, d row) on the grid
_STREAM = 0x5141  # keeps the question draws apart from the image draws of the same (seed, split, index)

_EN_POSITION = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                "center": "in the center"}
_EN_RELATION = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
_ZH_RELATION = {"left": "左边", "right": "右边", "above": "上面", "below": "下面"}
_EN_YES_NO = {True: "yes", False: "no"}
_ZH_YES_NO = {True: "有", False: "没有"}


@dataclass(frozen=True)
class Question:
    """One question about a scene: the family, its language-neutral parameters and the answer's meaning."""

    family: str
    params: tuple  # colour: (kind,); kind_at: (position,); count: (kind or None,); exists: (colour, kind);
    #                relation: (colour, kind, direction)
    answer: Any  # colour name | kind | int | bool | (colour, kind)
    pairs: frozenset  # the (colour, kind) pairs the question or its answer is about


def _plural(kind: str) -> str:
    return kind + "s"


def render_question(q: Question, language: str) -> str:
    """The question text in ``language`` ("en" or "zh")."""
    zh = ZH_WORDS
    if language == "zh":
        if q.family == "colour":
            return f"{zh['kind'][q.params[0]]}是什么颜色？"
        if q.family == "kind_at":
            return f"{zh['position'][q.params[0]]}是什么形状？"
        if q.family == "count":
            return "一共有几个图形？" if q.params[0] is None else f"有几个{zh['kind'][q.params[0]]}？"
        if q.family == "exists":
            return f"有{zh['colour'][q.params[0]]}的{zh['kind'][q.params[1]]}吗？"
        colour, kind, direction = q.params
        return f"{zh['colour'][colour]}的{zh['kind'][kind]}{_ZH_RELATION[direction]}是什么？"
    if q.family == "colour":
        return f"what colour is the {q.params[0]}?"
    if q.family == "kind_at":
        return f"what shape is {_EN_POSITION[q.params[0]]}?"
    if q.family == "count":
        return f"how many {'shapes' if q.params[0] is None else _plural(q.params[0])} are there?"
    if q.family == "exists":
        article = "an" if q.params[0][0] in "aeiou" else "a"
        return f"is there {article} {q.params[0]} {q.params[1]}?"
    colour, kind, direction = q.params
    return f"what is {_EN_RELATION[direction]} the {colour} {kind}?"


def render_answer(q: Question, language: str) -> str:
    """The answer text in ``language``: a word or two; counts as digits in both languages."""
    zh = ZH_WORDS
    if q.family in ("colour",):
        return zh["colour"][q.answer] if language == "zh" else q.answer
    if q.family == "kind_at":
        return zh["kind"][q.answer] if language == "zh" else q.answer
    if q.family == "count":
        return str(q.answer)
    if q.family == "exists":
        return (_ZH_YES_NO if language == "zh" else _EN_YES_NO)[q.answer]
    colour, kind = q.answer
    return f"{zh['colour'][colour]}的{zh['kind'][kind]}" if language == "zh" else f"{colour} {kind}"


# ----------------------------------------------------------------------------- candidates per family


def _pair(shape: dict) -> tuple[str, str]:
    return shape["colour"], shape["kind"]


def _colour_questions(shapes: list[dict]) -> list[Question]:
    out = []
    for kind in SHAPE_KINDS:
        matching = [s for s in shapes if s["kind"] == kind]
        if len(matching) == 1:
            out.append(Question("colour", (kind,), matching[0]["colour"], frozenset([_pair(matching[0])])))
    return out


def _kind_at_questions(shapes: list[dict]) -> list[Question]:
    return [Question("kind_at", (s["position"],), s["kind"], frozenset([_pair(s)])) for s in shapes]


def _count_questions(shapes: list[dict]) -> list[Question]:
    out = [Question("count", (None,), len(shapes), frozenset())]
    for kind in SHAPE_KINDS:
        matching = [s for s in shapes if s["kind"] == kind]
        out.append(Question("count", (kind,), len(matching), frozenset(map(_pair, matching))))
    return out


def _exists_questions(shapes: list[dict], allow_held_out: bool) -> list[Question]:
    present = {_pair(s) for s in shapes}
    out = []
    for colour in COLOURS:
        for kind in SHAPE_KINDS:
            pair = (colour, kind)
            if pair in HELD_OUT_PAIRS and not allow_held_out:
                continue
            out.append(Question("exists", pair, pair in present, frozenset([pair])))
    return out


def _relation_questions(shapes: list[dict]) -> list[Question]:
    """References named by a colour-kind pair that occurs once; exactly one shape on the asked side of it."""
    pairs = [_pair(s) for s in shapes]
    out = []
    for ref in shapes:
        if pairs.count(_pair(ref)) != 1:
            continue
        col, row = CELLS[ref["position"]]
        for direction in DIRECTIONS:
            dc, dr = _STEP[direction]
            side = [s for s in shapes if s is not ref and _on_side(CELLS[s["position"]], (col, row), (dc, dr))]
            if len(side) == 1:
                out.append(Question("relation", (*_pair(ref), direction), _pair(side[0]),
                                    frozenset([_pair(ref), _pair(side[0])])))
    return out


def _on_side(cell: tuple[int, int], ref: tuple[int, int], step: tuple[int, int]) -> bool:
    """``cell`` lies strictly on the ``step`` side of ``ref`` in the same row (left/right) or column (above/below)."""
    (c, r), (rc, rr), (dc, dr) = cell, ref, step
    if dc:
        return r == rr and (c - rc) * dc > 0
    return c == rc and (r - rr) * dr > 0


def scene_questions(shapes: list[dict], family: str, *, compositional: bool = False) -> list[Question]:
    """Every unambiguous question of ``family`` about ``shapes``.

    Outside the compositional split nothing names a held-out pair (scenes there hold none, and ``exists`` skips
    them); in it, only questions about a held-out pair are asked (every scene there holds one, so ``kind_at``
    always can be).
    """
    if family not in FAMILIES:
        raise ValueError(f"VQA family: expected one of {', '.join(FAMILIES)}, got {family!r}")
    if family == "colour":
        out = _colour_questions(shapes)
    elif family == "kind_at":
        out = _kind_at_questions(shapes)
    elif family == "count":
        out = _count_questions(shapes)
    elif family == "exists":
        out = _exists_questions(shapes, allow_held_out=compositional)
    else:
        out = _relation_questions(shapes)
    involves_held_out = [bool(q.pairs & set(HELD_OUT_PAIRS)) for q in out]
    return [q for q, held in zip(out, involves_held_out) if held == compositional]


def draw_questions(shapes: list[dict], rng: np.random.Generator, k: int = 1, *,
                   families: Sequence[str] = FAMILIES, compositional: bool = False) -> list[Question]:
    """Up to ``k`` distinct questions: a family uniformly among the answerable ones, then an answer uniformly among
    that family's answers, then a question with that answer. Fewer than ``k`` only if the scene has fewer."""
    pools = {f: scene_questions(shapes, f, compositional=compositional) for f in families}
    chosen: list[Question] = []
    for _ in range(k):
        open_families = [f for f in families if pools[f]]
        if not open_families:
            break
        family = open_families[int(rng.integers(len(open_families)))]
        answers = sorted({q.answer for q in pools[family]}, key=repr)
        answer = answers[int(rng.integers(len(answers)))]
        options = [q for q in pools[family] if q.answer == answer]
        question = options[int(rng.integers(len(options)))]
        pools[family].remove(question)
        chosen.append(question)
    return chosen


# ----------------------------------------------------------------------------- dataset


def _check_families(families: Sequence[str]) -> tuple[str, ...]:
    families = tuple(families)
    unknown = [f for f in families if f not in FAMILIES]
    if not families or unknown:
        raise ValueError(f"VQA families: expected a non-empty subset of {', '.join(FAMILIES)}, got {list(families)}")
    return families


class ShapesVQADataset(Dataset):
    """Questions and answers over the shapes images: ``questions_per_image`` items per image.

    Item ``i`` is question ``i % questions_per_image`` of image ``i // questions_per_image``; a scene that has
    fewer distinct questions than that repeats its last one (with every family: only beyond 26 per image).
    Items (the keys of ``ImageTextDataset`` plus the question's): ``{"pixel_values", "prompt", "question",
    "answer", "answers", "caption", "captions", "family", "language", "label", "attributes", "messages",
    "index", "image_index"}``; ``caption``/``captions`` hold the answer (the target text), ``prompt`` and
    ``question`` the question, ``label`` the family, ``messages`` the normalised conversation (user:
    ``"<image>\\n" + question``, assistant: answer; see ``mmlm.data.conversations``).
    """

    def __init__(self, n_images: int, *, split: str = "train", config: ShapesConfig | None = None,
                 transform: Callable | None = None, questions_per_image: int = 1,
                 families: Sequence[str] = FAMILIES, language: str | None = None, seed: int | None = None):
        self.config = config or ShapesConfig()
        self.records = ShapesRecords(n_images, split=split, config=self.config, seed=seed)
        if not isinstance(questions_per_image, int) or questions_per_image < 1:
            raise ValueError(f"questions_per_image: expected an int >= 1, got {questions_per_image!r}")
        language = self.config.language if language is None else language
        if language not in LANGUAGES:
            raise ValueError(f"VQA language: expected one of {', '.join(LANGUAGES)}, got {language!r}")
        self.split, self.transform, self.language = split, transform, language
        self.questions_per_image, self.families = questions_per_image, _check_families(families)
        self.seed = self.config.seed if seed is None else seed

    def __len__(self) -> int:
        return len(self.records) * self.questions_per_image

    def with_transform(self, transform: Callable | None) -> "ShapesVQADataset":
        """The same questions with another image transform (as ``ImageTextDataset.with_transform``)."""
        clone = copy.copy(self)
        clone.transform = transform
        return clone

    def question(self, index: int) -> tuple[Question, str, list[dict]]:
        """(question, language, the scene's shapes) of item ``index``, without drawing its image (cheap)."""
        if not 0 <= index < len(self):
            raise IndexError(f"VQA item {index} out of range for {len(self)} items")
        image_index, slot = divmod(index, self.questions_per_image)
        shapes = scene_shapes(image_index, split=self.split, config=self.config, seed=self.records.seed)
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), image_index, _STREAM])
        questions = draw_questions(shapes, rng, self.questions_per_image,
                                   families=self.families, compositional=self.split == "compositional")
        if not questions:
            raise ValueError(f"shapes[{self.split}]:{image_index}: no question of families {self.families} "
                             "is answerable for this scene")
        language = self.language
        if language == "mixed":
            language = ("en", "zh")[int(np.random.default_rng([self.seed, SPLITS.index(self.split), index,
                                                                 _STREAM, 1]).integers(2))]
        return questions[min(slot, len(questions) - 1)], language, shapes

    def __getitem__(self, index: int) -> dict:
        question, language, _ = self.question(index)
        record = self.records[index // self.questions_per_image]
        text, answer = render_question(question, language), render_answer(question, language)
        return {"pixel_values": self.transform(record.image) if self.transform else record.image,
                "prompt": text, "question": text, "answer": answer, "answers": [answer],
                "caption": answer, "captions": [answer], "family": question.family, "language": language,
                "label": question.family, "attributes": record.attributes,
                "messages": [{"role": "user", "content": "<image>\n" + text},
                             {"role": "assistant", "content": answer}],
                "index": index, "image_index": index // self.questions_per_image}


def build_vqa_datasets(config: ShapesConfig | None = None, transform_train: Callable | None = None,
                       transform_eval: Callable | None = None, *, questions_per_image: int = 1,
                       families: Sequence[str] = FAMILIES, language: str | None = None) -> dict:
    """train / val / test / compositional ShapesVQADatasets sized by ``config`` (images; x questions_per_image)."""
    cfg = config or ShapesConfig()
    sizes = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test, "compositional": cfg.n_compositional}
    return {split: ShapesVQADataset(n, split=split, config=cfg,
                                    transform=transform_train if split == "train" else transform_eval,
                                    questions_per_image=questions_per_image, families=families, language=language)
            for split, n in sizes.items()}


__all__ = ["DIRECTIONS", "FAMILIES", "LANGUAGES", "Question", "ShapesVQADataset",
           "build_vqa_datasets", "draw_questions", "render_answer", "render_question", "scene_questions"]
