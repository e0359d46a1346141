"""Classification metrics against sklearn.metrics and hand-checked values; the confusion matrix PNG."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmlm.eval.classification_metrics import classification_report, save_confusion_matrix_png

FIXTURE = Path(__file__).parent / "fixtures" / "classification.json"


def test_hand_checked_values():
    report = classification_report(
        ["cat", "cat", "dog", "dog", "bird"], ["cat", "dog", "dog", "dog", "cat"], ["cat", "dog", "bird"]
    )
    assert report["accuracy"] == pytest.approx(3 / 5)
    assert report["per_class"]["cat"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert report["per_class"]["dog"]["precision"] == pytest.approx(2 / 3)
    assert report["per_class"]["dog"]["f1"] == pytest.approx(0.8)
    # "bird" is never predicted: precision 0 by the zero-division convention, recall 0, F1 0
    assert report["per_class"]["bird"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert report["macro_recall"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    np.testing.assert_array_equal(report["confusion_matrix"], [[1, 1, 0], [0, 2, 0], [1, 0, 0]])


@pytest.mark.parametrize("case", ["balanced", "with_unknown_and_absent_labels"])
def test_matches_sklearn_on_fixture(case):
    from sklearn import metrics

    data = json.loads(FIXTURE.read_text(encoding="utf-8"))[case]
    y_true, y_pred, labels = data["y_true"], data["y_pred"], data["labels"]
    report = classification_report(y_true, y_pred, labels)
    p, r, f, s = metrics.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    assert report["accuracy"] == pytest.approx(metrics.accuracy_score(y_true, y_pred))
    for name, expected in [("precision", p), ("recall", r), ("f1", f), ("support", s)]:
        got = [report["per_class"][label][name] for label in labels]
        np.testing.assert_allclose(got, expected, atol=1e-12, err_msg=name)
    occurring = [label for label in labels if label in y_true or label in y_pred]
    macro = metrics.precision_recall_fscore_support(y_true, y_pred, labels=occurring, average="macro", zero_division=0)
    assert [report[f"macro_{name}"] for name in ("precision", "recall", "f1")] == pytest.approx(macro[:3])
    if case == "with_unknown_and_absent_labels":
        assert len(occurring) < len(labels)  # the fixture really has labels that never occur
    np.testing.assert_array_equal(report["confusion_matrix"], metrics.confusion_matrix(y_true, y_pred, labels=labels))
    assert report["unknown_predictions"] == sum(p not in labels for p in y_pred)


def test_input_errors():
    with pytest.raises(ValueError, match="differ in length"):
        classification_report(["a"], ["a", "b"], ["a", "b"])
    with pytest.raises(ValueError, match=r"y_true\[1\]: 'c' is not one of labels"):
        classification_report(["a", "c"], ["a", "a"], ["a", "b"])
    with pytest.raises(ValueError, match="repeated"):
        classification_report(["a"], ["a"], ["a", "a"])
    with pytest.raises(ValueError, match="empty"):
        classification_report([], [], ["a"])


def test_confusion_matrix_png(tmp_path):
    labels = ["circle", "square", "triangle", "星形"]  # a label the default font may lack glyphs for
    matrix = np.array([[5, 1, 0, 0], [0, 6, 0, 0], [2, 0, 3, 1], [0, 0, 0, 4]])
    path = save_confusion_matrix_png(matrix, labels, tmp_path / "sub" / "confusion.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 100
    save_confusion_matrix_png(matrix, labels, tmp_path / "normalized.png", normalize=True)
    with pytest.raises(ValueError, match="square with 4 rows"):
        save_confusion_matrix_png(matrix[:3], labels, tmp_path / "bad.png")
