"""VQAv2-style accuracy: normalisation and scores against hand-computed examples."""

import pytest

from mmlm.eval.vqa_metrics import normalize_answer, vqa_accuracy, vqa_scores


@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"),
    ("None", "0"),
    ("A red circle.", "red circle"),
    ("the  Blue   Square!", "blue square"),
    ("2.5", "2.5"),  # a period before a digit stays
    ("1,000 dogs", "1000 dogs"),  # a comma between digits goes
    ("red-circle", "red circle"),  # a mark not next to a space splits words
    ("yes, it is", "yes it is"),  # a mark next to a space goes
    ("dont", "don't"),
    ("two", normalize_answer("2")),
    (" 两个 ", "2"),
    ("三只", "3"),
    ("红色的 圆形。", "红色的圆形"),
    ("有！", "有"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_exact_match_after_normalisation():
    assert vqa_accuracy("Red.", "red") == 1.0
    assert vqa_accuracy("two", "2") == 1.0
    assert vqa_accuracy("a red circle", "red circle") == 1.0
    assert vqa_accuracy("red square", "red circle") == 0.0
    assert vqa_accuracy("红色", "红 色。") == 1.0
    assert vqa_accuracy("两个", "2") == 1.0
    with pytest.raises(ValueError, match="reference"):
        vqa_accuracy("x", [])
    with pytest.raises(TypeError, match="string"):
        normalize_answer(None)


def test_vqav2_soft_score_with_ten_references():
    refs = ["red"] * 2 + ["blue"] * 8
    # Leave-one-out: dropping one of the 2 "red" leaves 1 match -> 1/3; dropping a "blue" leaves 2 -> 2/3.
    assert vqa_accuracy("red", refs) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    assert vqa_accuracy("blue", refs) == 1.0  # 7 or 8 matches of 9, capped at 1
    assert vqa_accuracy("green", refs) == 0.0


def test_scores_per_family_and_language():
    predictions = ["red", "2", "no", "circle", "yes", "红色"]
    answers = ["red", "3", "no", "square", "yes", ["红色"]]
    families = ["colour", "count", "exists", "kind_at", "exists", "colour"]
    languages = ["en", "en", "en", "en", "en", "zh"]
    scores = vqa_scores(predictions, answers, families, languages)
    assert scores["accuracy"] == pytest.approx(4 / 6)
    assert scores["num_samples"] == 6
    assert scores["per_family"] == {"colour": {"accuracy": 1.0, "num_samples": 2},
                                    "count": {"accuracy": 0.0, "num_samples": 1},
                                    "exists": {"accuracy": 1.0, "num_samples": 2},
                                    "kind_at": {"accuracy": 0.0, "num_samples": 1}}
    assert scores["per_language"]["en"] == {"accuracy": pytest.approx(3 / 5), "num_samples": 5}
    assert "per_family" not in vqa_scores(predictions, answers)
    with pytest.raises(ValueError, match="differ in length"):
        vqa_scores(predictions, answers[:2])
    with pytest.raises(ValueError, match="family labels"):
        vqa_scores(predictions, answers, families[:2])
