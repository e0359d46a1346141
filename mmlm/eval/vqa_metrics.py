"""VQAv2-style accuracy: answers normalised as the official VQA evaluation does, then matched exactly.

English (the VQA eval script's steps): lowercase; punctuation removed (dropped when next to a space or when
the text has a comma between digits, else it splits words; a period is kept before a digit); number words to
digits ("two" -> "2", "none" -> "0"); the articles a / an / the removed; common contractions restored
("dont" -> "don't"); whitespace collapsed.
Chinese (any answer holding a CJK character): spaces and punctuation (CJK and ASCII) removed, a lone numeral
with an optional measure word to digits ("两个" -> "2", "三" -> "3").

With one reference answer the score is exact match after normalisation. With several (VQAv2 has 10), a
prediction scores ``min(1, matches / 3)`` averaged over the leave-one-out subsets of the references, as VQAv2.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Sequence

__all__ = ["normalize_answer", "vqa_accuracy", "vqa_scores"]

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {"arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't", "doesnt": "doesn't",
                 "dont": "don't", "hasnt": "hasn't", "havent": "haven't", "isnt": "isn't", "shouldnt": "shouldn't",
                 "wasnt": "wasn't", "werent": "weren't", "wont": "won't", "wouldnt": "wouldn't", "youre": "you're",
                 "theyre": "they're", "whats": "what's", "thats": "that's", "its": "it's", "im": "i'm"}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!", "*", "#", "%", "^", "&", "$", ":", "~", "'"]
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the VQA script's pattern: a period not before a digit
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_ZH_PUNCT = re.compile(r"[\s\u3000-\u303f\uff00-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65"
                       r"!-/:-@\[-`{-~·—…‘’“”]")
_ZH_NUMBERS = {"零": "0", "一": "1", "二": "2", "两": "2", "三": "3", "四": "4", "五": "5", "六": "6", "七": "7",
               "八": "8", "九": "9", "十": "10"}
_ZH_COUNT = re.compile(r"([零一二两三四五六七八九十]|\d+)[个只]?")


def _normalize_en(text: str) -> str:
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    original, number_comma = text, _COMMA_IN_NUMBER.search(text) is not None
    for p in _PUNCTUATION:
        # As the VQA script: a mark next to a space (or any mark in a text with a digit comma) goes; else it splits.
        gone = p + " " in original or " " + p in original or number_comma
        text = text.replace(p, "" if gone else " ")
    text = _PERIOD_STRIP.sub("", text)
    words = []
    for word in text.split():
        word = _NUMBERS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def _normalize_zh(text: str) -> str:
    text = _ZH_PUNCT.sub("", text).lower()
    m = _ZH_COUNT.fullmatch(text)
    if m:
        return _ZH_NUMBERS.get(m.group(1), m.group(1))
    return text


def normalize_answer(text: str) -> str:
    """The VQA-normalised form of an answer (Chinese rules when it holds a CJK character)."""
    if not isinstance(text, str):
        raise TypeError(f"normalize_answer: expected a string, got {type(text).__name__}")
    return _normalize_zh(text) if _CJK.search(text) else _normalize_en(text)


def vqa_accuracy(prediction: str, answers: str | Sequence[str]) -> float:
    """Score of one prediction against its reference answer(s), in [0, 1]."""
    refs = [answers] if isinstance(answers, str) else list(answers)
    if not refs:
        raise ValueError("vqa_accuracy: expected at least one reference answer, got none")
    pred = normalize_answer(prediction)
    norm = [normalize_answer(a) for a in refs]
    if len(norm) == 1:
        return float(pred == norm[0])
    scores = [min(1.0, sum(pred == other for j, other in enumerate(norm) if j != i) / 3) for i in range(len(norm))]
    return sum(scores) / len(scores)


def vqa_scores(predictions: Sequence[str], answers: Sequence[str | Sequence[str]],
               families: Sequence[str] | None = None, languages: Sequence[str] | None = None) -> dict:
    """Overall and per-group accuracy.

    Returns ``{"accuracy", "num_samples", "per_family": {family: {"accuracy", "num_samples"}},
    "per_language": {...}}`` (``per_family`` / ``per_language`` only when ``families`` / ``languages`` are given).
    """
    if len(predictions) != len(answers):
        raise ValueError(f"predictions and answers differ in length: {len(predictions)} vs {len(answers)}")
    if not predictions:
        raise ValueError("predictions: expected at least one sample, got an empty list")
    scores = [vqa_accuracy(p, a) for p, a in zip(predictions, answers)]
    out: dict = {"accuracy": sum(scores) / len(scores), "num_samples": len(scores)}
    for key, groups in (("per_family", families), ("per_language", languages)):
        if groups is None:
            continue
        if len(groups) != len(scores):
            raise ValueError(f"{key[4:]} labels and predictions differ in length: {len(groups)} vs {len(scores)}")
        buckets: dict[str, list[float]] = defaultdict(list)
        for group, score in zip(groups, scores):
            buckets[group].append(score)
        out[key] = {g: {"accuracy": sum(v) / len(v), "num_samples": len(v)} for g, v in sorted(buckets.items())}
    return out
