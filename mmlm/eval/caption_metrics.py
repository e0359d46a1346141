"""Caption metrics without Java: BLEU-1..4, ROUGE-L and CIDEr-D as the COCO caption toolkit computes them.

The scorers below reproduce pycocoevalcap's ``Bleu``, ``Rouge`` and ``Cider`` (the same formulas, smoothing
constants and quirks, see the comments) on pre-tokenized text. pycocoevalcap tokenizes with Stanford's Java
PTBTokenizer; ``tokenize_caption`` is a pure-Python stand-in that mirrors it only approximately (lowercase,
punctuation removed, English clitics split like PTB) and also handles Chinese/Japanese by making every CJK
character a token. Scores on the same tokens match pycocoevalcap to floating-point precision.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from typing import Any, Callable, Sequence

Tokens = list[str]
NGrams = Counter  # Counter[tuple[str, ...]]

# Characters written without spaces between words: each one becomes a token.
_CJK = (
    "\u3040-\u30ff"  # hiragana, katakana
    "\u3400-\u4dbf"  # CJK extension A
    "\u4e00-\u9fff"  # CJK unified ideographs
    "\uf900-\ufaff"  # CJK compatibility ideographs
    "\U00020000-\U0002ebef"  # CJK extensions B-F
)
_CJK_CHAR = re.compile(f"([{_CJK}])")
# A word: letters/digits, optionally joined by inner hyphens or apostrophes ("black-and-white", "don't"),
# or a number with inner separators ("3.5", "1,000"). Everything else is punctuation and dropped.
_TOKEN = re.compile(r"\d+(?:[.,]\d+)+|[^\W_]+(?:[-'][^\W_]+)*'?")
_CLITIC = re.compile(r"^(.+?)('s|'re|'ve|'ll|'d|'m|n't)$")


def tokenize_caption(text: str) -> Tokens:
    """Lowercased word tokens without punctuation, PTB-like; CJK characters are one token each.

    >>> tokenize_caption("A man's red-and-white hat, isn't it?")
    ['a', 'man', "'s", 'red-and-white', 'hat', 'is', "n't", 'it']
    >>> tokenize_caption("左边一个红色的小圆形。")
    ['左', '边', '一', '个', '红', '色', '的', '小', '圆', '形']
    """
    if not isinstance(text, str):
        raise TypeError(f"tokenize_caption: expected a str, got {type(text).__name__}")
    text = unicodedata.normalize("NFKC", text).lower().replace("\u2019", "'").replace("\u2018", "'")
    text = _CJK_CHAR.sub(r" \1 ", text)
    tokens: Tokens = []
    for word in _TOKEN.findall(text):
        word = word.rstrip("'")
        if not word:
            continue
        match = _CLITIC.match(word)
        if match:
            tokens.extend(match.groups())
        else:
            tokens.append(word)
    return tokens


def _ngrams(tokens: Tokens, n: int) -> NGrams:
    """Counts of all 1..n-grams of ``tokens``."""
    counts: NGrams = Counter()
    for k in range(1, n + 1):
        for i in range(len(tokens) - k + 1):
            counts[tuple(tokens[i : i + k])] += 1
    return counts


# ----------------------------------------------------------------------------------------------- BLEU


def bleu_scores(hyps: Sequence[Tokens], refs: Sequence[Sequence[Tokens]], n: int = 4) -> list[float]:
    """Corpus-level BLEU-1..n as pycocoevalcap's BleuScorer with ``option="closest"``.

    N-gram matches are clipped by the maximum count in any one reference; the effective reference length of a
    caption is the reference length closest to its length (ties: the shorter); the brevity penalty and the
    1e-9 / 1e-15 smoothing constants are applied to corpus totals exactly as there.
    """
    small, tiny = 1e-9, 1e-15
    guess, correct = [0] * n, [0] * n
    test_len = ref_len = 0
    for hyp, hyp_refs in zip(hyps, refs):
        max_ref_counts: dict[tuple[str, ...], int] = {}
        for ref in hyp_refs:
            for gram, count in _ngrams(ref, n).items():
                max_ref_counts[gram] = max(max_ref_counts.get(gram, 0), count)
        test_len += len(hyp)
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in hyp_refs)[1]
        for k in range(n):
            guess[k] += max(0, len(hyp) - k)
        for gram, count in _ngrams(hyp, n).items():
            correct[len(gram) - 1] += min(max_ref_counts.get(gram, 0), count)
    scores, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_len + tiny) / (ref_len + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


# -------------------------------------------------------------------------------------------- ROUGE-L


def _lcs_length(a: Tokens, b: Tokens) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_score(hyp: Tokens, refs: Sequence[Tokens], beta: float = 1.2) -> float:
    """ROUGE-L of one caption as pycocoevalcap's Rouge: F-measure of the best LCS precision and recall."""
    if not hyp:
        return 0.0
    lcs = [_lcs_length(ref, hyp) for ref in refs]
    precision = max(l / len(hyp) for l in lcs)
    recall = max(l / len(ref) if ref else 0.0 for l, ref in zip(lcs, refs))
    if precision == 0 or recall == 0:
        return 0.0
    return (1 + beta**2) * precision * recall / (recall + beta**2 * precision)


# ---------------------------------------------------------------------------------------------- CIDEr


def cider_d_scores(
    hyps: Sequence[Tokens], refs: Sequence[Sequence[Tokens]], n: int = 4, sigma: float = 6.0
) -> list[float]:
    """Per-caption CIDEr-D as pycocoevalcap's CiderScorer (x10, clipped tf-idf, Gaussian length penalty).

    Document frequencies come from the references of the evaluated set itself, so the score of one caption
    depends on the whole set (as in pycocoevalcap); a set of one image scores 0 (log(1) idf).
    """
    ref_counts = [[_ngrams(r, n) for r in image_refs] for image_refs in refs]
    doc_freq: Counter = Counter()
    for image_refs in ref_counts:
        doc_freq.update({gram for counts in image_refs for gram in counts})
    log_num_images = math.log(float(len(refs)))

    def to_vector(counts: NGrams) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            vec[k][gram] = float(tf) * (log_num_images - math.log(max(1.0, doc_freq[gram])))
            norm[k] += vec[k][gram] ** 2
            if k == 1:  # pycocoevalcap counts *bigrams* as the length; kept for identical scores
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def similarity(hyp_vec, ref_vec) -> list[float]:
        (vec_h, norm_h, len_h), (vec_r, norm_r, len_r) = hyp_vec, ref_vec
        penalty = math.exp(-(float(len_h - len_r) ** 2) / (2 * sigma**2))
        values = []
        for k in range(n):
            value = sum(min(w, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, w in vec_h[k].items())
            if norm_h[k] != 0 and norm_r[k] != 0:
                value /= norm_h[k] * norm_r[k]
            values.append(value * penalty)
        return values

    scores = []
    for hyp, image_refs in zip(hyps, ref_counts):
        hyp_vec = to_vector(_ngrams(hyp, n))
        per_n = [0.0] * n
        for ref in image_refs:
            per_n = [a + b for a, b in zip(per_n, similarity(hyp_vec, to_vector(ref)))]
        scores.append(sum(per_n) / n / len(image_refs) * 10.0)
    return scores


# ---------------------------------------------------------------------------------------------- API


def _check_inputs(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if isinstance(predictions, str) or not isinstance(predictions, Sequence):
        raise TypeError(f"predictions: expected a list of str, got {type(predictions).__name__}")
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references differ in length: {len(predictions)} vs {len(references)}"
        )
    if not predictions:
        raise ValueError("predictions: expected at least one caption, got an empty list")
    for i, (pred, refs) in enumerate(zip(predictions, references)):
        if not isinstance(pred, str):
            raise TypeError(f"predictions[{i}]: expected str, got {type(pred).__name__}")
        if isinstance(refs, str) or not isinstance(refs, Sequence) or not refs:
            raise ValueError(f"references[{i}]: expected a non-empty list of str, got {refs!r}")
        for j, ref in enumerate(refs):
            if not isinstance(ref, str):
                raise TypeError(f"references[{i}][{j}]: expected str, got {type(ref).__name__}")


def caption_scores(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    tokenizer: Callable[[str], Tokens] = tokenize_caption,
) -> dict[str, float]:
    """COCO-style caption metrics of ``predictions[i]`` against the reference captions ``references[i]``.

    Returns ``{"bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider"}`` (CIDEr-D, x10 scale as COCO
    reports it; BLEU and ROUGE-L in [0, 1]). ``tokenizer`` maps a caption to tokens (default
    ``tokenize_caption``, an approximate Python PTB tokenizer that splits CJK text into characters).
    """
    _check_inputs(predictions, references)
    hyps = [tokenizer(p) for p in predictions]
    refs = [[tokenizer(r) for r in image_refs] for image_refs in references]
    bleu = bleu_scores(hyps, refs, n=4)
    rouge = [rouge_l_score(h, r) for h, r in zip(hyps, refs)]
    cider = cider_d_scores(hyps, refs)
    scores = {f"bleu_{k + 1}": float(b) for k, b in enumerate(bleu)}
    scores["rouge_l"] = float(sum(rouge) / len(rouge))
    scores["cider"] = float(sum(cider) / len(cider))
    return scores


def exact_match_rate(
    predictions: Sequence[str], attributes_list: Sequence[Any], matcher: Callable[[str, Any], bool]
) -> float:
    """Fraction of predictions for which ``matcher(prediction, attributes)`` is true.

    ``matcher`` decides what "exact" means, e.g. ``mmlm.data.shapes.captions_match`` (every shape's size,
    colour, kind and position right, whatever the paraphrase).
    """
    if not callable(matcher):
        raise TypeError(f"matcher: expected a callable (prediction, attributes) -> bool, got {matcher!r}")
    if len(predictions) != len(attributes_list):
        raise ValueError(
            f"predictions and attributes_list differ in length: {len(predictions)} vs {len(attributes_list)}"
        )
    if not predictions:
        raise ValueError("predictions: expected at least one caption, got an empty list")
    hits = sum(bool(matcher(pred, attrs)) for pred, attrs in zip(predictions, attributes_list))
    return hits / len(predictions)
