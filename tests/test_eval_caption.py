"""Caption metrics: hand-checked values, agreement with pycocoevalcap, tokenization, input errors."""

import json
import math
from pathlib import Path

import pytest

from mmlm.eval.caption_metrics import (
    bleu_scores,
    caption_scores,
    cider_d_scores,
    exact_match_rate,
    rouge_l_score,
    tokenize_caption,
)

FIXTURE = Path(__file__).parent / "fixtures" / "captions.json"


def load_fixture():
    data = json.loads(FIXTURE.read_text(encoding="utf-8"))
    return data["predictions"], data["references"]


# ------------------------------------------------------------------------------------ tokenization


def test_tokenize_lowercases_strips_punctuation_and_splits_clitics():
    assert tokenize_caption("A man's red-and-white hat, isn't it?!") == [
        "a", "man", "'s", "red-and-white", "hat", "is", "n't", "it",
    ]
    assert tokenize_caption("  Two ... cats -- on 3.5 mats; (really)  ") == [
        "two", "cats", "on", "3.5", "mats", "really",
    ]
    assert tokenize_caption("") == []


def test_tokenize_splits_cjk_characters_and_fullwidth_punctuation():
    assert tokenize_caption("左边一个红色的小圆形。") == list("左边一个红色的小圆形")
    assert tokenize_caption("一只 猫，坐在 mat 上") == ["一", "只", "猫", "坐", "在", "mat", "上"]


def test_tokenize_rejects_non_string():
    with pytest.raises(TypeError, match="expected a str"):
        tokenize_caption(None)


# ------------------------------------------------------------------------------- hand-checked values


def test_identical_prediction_scores_perfect():
    scores = caption_scores(["a small red circle"], [["a small red circle"]])
    for k in range(1, 5):
        assert scores[f"bleu_{k}"] == pytest.approx(1.0, abs=1e-6)
    assert scores["rouge_l"] == pytest.approx(1.0)


def test_cider_of_exact_predictions_with_disjoint_vocabularies_is_ten():
    # Every n-gram occurs in one of the two images: idf = log 2 for all, cosine 1, no length penalty -> 10.
    preds = ["a red circle left", "one blue square top"]
    scores = caption_scores(preds, [[p] for p in preds])
    assert scores["cider"] == pytest.approx(10.0)
    # three-word captions have no 4-grams: that n-gram order contributes 0 -> 10 * 3/4
    preds = ["red circle left", "blue square top"]
    assert caption_scores(preds, [[p] for p in preds])["cider"] == pytest.approx(7.5)


def test_bleu_hand_computed():
    # unigrams: 2 of 3 match; no bigram matches -> BLEU-2 ~ 0; equal lengths -> no brevity penalty.
    b = bleu_scores([["a", "red", "circle"]], [[["a", "blue", "circle"]]])
    assert b[0] == pytest.approx(2 / 3)
    assert b[1] < 1e-6
    # all unigrams match but the prediction is short: BP = exp(1 - 3/2).
    b = bleu_scores([["a", "circle"]], [[["a", "red", "circle"]]])
    assert b[0] == pytest.approx(math.exp(-0.5))
    # closest reference length (2, not 5) -> no brevity penalty
    b = bleu_scores([["a", "circle"]], [[["a", "circle"], ["a", "big", "red", "round", "circle"]]])
    assert b[0] == pytest.approx(1.0)


def test_rouge_l_hand_computed():
    # LCS("a red circle", "a big red circle") = 3: precision 3/3, recall 3/4, beta 1.2.
    p, r, beta = 1.0, 0.75, 1.2
    expected = (1 + beta**2) * p * r / (r + beta**2 * p)
    assert rouge_l_score(["a", "red", "circle"], [["a", "big", "red", "circle"]]) == pytest.approx(expected)
    assert rouge_l_score([], [["a"]]) == 0.0
    assert rouge_l_score(["x"], [["a"]]) == 0.0


def test_cider_length_penalty_and_clipping():
    refs = [[["a", "b", "c", "d"]], [["e", "f", "g", "h"]]]
    exact = cider_d_scores([["a", "b", "c", "d"], ["e", "f", "g", "h"]], refs)
    repeated = cider_d_scores([["a", "b", "c", "d", "a", "b", "c", "d"], ["e", "f", "g", "h"]], refs)
    assert exact[0] == pytest.approx(10.0)
    assert repeated[0] < exact[0]  # repeating words does not game CIDEr-D


def test_chinese_captions_score():
    scores = caption_scores(["左边一个红色的小圆形"], [["左边一个红色的小圆形"]])
    assert scores["bleu_4"] == pytest.approx(1.0, abs=1e-6)
    worse = caption_scores(["右边一个蓝色的大方形"], [["左边一个红色的小圆形"]])
    assert 0 < worse["bleu_1"] < 1


# ------------------------------------------------------------------------------- pycocoevalcap parity


def test_matches_pycocoevalcap_on_fixture():
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    predictions, references = load_fixture()
    res = {i: [" ".join(tokenize_caption(p))] for i, p in enumerate(predictions)}
    gts = {i: [" ".join(tokenize_caption(r)) for r in refs] for i, refs in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, rouge_each = Rouge().compute_score(gts, res)
    cider, cider_each = Cider().compute_score(gts, res)

    ours = caption_scores(predictions, references)
    for k in range(4):
        assert ours[f"bleu_{k + 1}"] == pytest.approx(bleu[k], abs=1e-6)
    assert ours["rouge_l"] == pytest.approx(rouge, abs=1e-6)
    assert ours["cider"] == pytest.approx(cider, abs=1e-6)
    hyps = [tokenize_caption(p) for p in predictions]
    refs = [[tokenize_caption(r) for r in rs] for rs in references]
    assert cider_d_scores(hyps, refs) == pytest.approx(list(cider_each), abs=1e-6)
    assert [rouge_l_score(h, r) for h, r in zip(hyps, refs)] == pytest.approx(list(rouge_each), abs=1e-6)
    # the fixture is not degenerate
    assert 0.1 < ours["bleu_4"] < 0.95 and 0.5 < ours["cider"] < 10


# --------------------------------------------------------------------------------------- errors, EM


def test_caption_scores_input_errors():
    with pytest.raises(ValueError, match="differ in length"):
        caption_scores(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="empty list"):
        caption_scores([], [])
    with pytest.raises(ValueError, match=r"references\[0\]"):
        caption_scores(["a"], [[]])
    with pytest.raises(ValueError, match=r"references\[0\]"):
        caption_scores(["a"], ["a plain string, not a list"])
    with pytest.raises(TypeError, match=r"predictions\[0\]"):
        caption_scores([None], [["a"]])


def test_exact_match_rate_uses_matcher():
    def matcher(prediction, attributes):
        return prediction.split() == [attributes["colour"], attributes["kind"]]

    predictions = ["red circle", "blue square", "red square", "green star"]
    attributes = [
        {"colour": "red", "kind": "circle"},
        {"colour": "blue", "kind": "square"},
        {"colour": "red", "kind": "circle"},
        {"colour": "green", "kind": "circle"},
    ]
    assert exact_match_rate(predictions, attributes, matcher) == 0.5
    with pytest.raises(ValueError, match="differ in length"):
        exact_match_rate(predictions, attributes[:2], matcher)
    with pytest.raises(TypeError, match="callable"):
        exact_match_rate(predictions, attributes, "not callable")


def test_exact_match_rate_with_shapes_grammar():
    shapes = pytest.importorskip("mmlm.data.shapes")
    records = shapes.generate_shapes(4, split="test", seed=0)
    captions = [r.captions[0] for r in records]
    attributes = [r.attributes for r in records]
    assert exact_match_rate(captions, attributes, shapes.captions_match) == 1.0
    assert exact_match_rate(captions[1:] + captions[:1], attributes, shapes.captions_match) < 1.0


def test_matches_pycocoevalcap_on_random_token_sequences():
    pytest.importorskip("pycocoevalcap")
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    sentence = st.lists(st.sampled_from("a b c d e f".split()), min_size=1, max_size=7)
    image = st.tuples(sentence, st.lists(sentence, min_size=1, max_size=3))

    @settings(max_examples=40, deadline=None, derandomize=True)
    @given(st.lists(image, min_size=1, max_size=5))
    def check(images):
        preds = [" ".join(h) for h, _ in images]
        refs = [[" ".join(r) for r in rs] for _, rs in images]
        res = {i: [p] for i, p in enumerate(preds)}
        gts = {i: rs for i, rs in enumerate(refs)}
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        ours = caption_scores(preds, refs)
        assert [ours[f"bleu_{k}"] for k in range(1, 5)] == pytest.approx(bleu, abs=1e-9)
        assert ours["rouge_l"] == pytest.approx(Rouge().compute_score(gts, res)[0], abs=1e-9)
        assert ours["cider"] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-9)

    check()
