"""Classification metrics: accuracy, macro precision/recall/F1, a per-class table and the confusion matrix.

Conventions follow ``sklearn.metrics`` with ``labels=labels, average="macro", zero_division=0``: a class that
is never predicted has precision 0, one that never occurs has recall 0, and a class with precision and recall
both 0 has F1 0. Macro averages run over every label in ``labels``, present or not. A prediction outside
``labels`` (e.g. free-form generated text) counts as wrong; it is counted in ``unknown_predictions`` and has no
column in the confusion matrix.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import numpy as np

from mmlm.eval.plots import save_confusion_matrix_png

__all__ = ["classification_report", "save_confusion_matrix_png"]


def _safe_divide(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def classification_report(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Metrics of predicted labels against true labels.

    Returns ``{"accuracy", "macro_precision", "macro_recall", "macro_f1", "num_samples",
    "unknown_predictions", "per_class": {label: {"precision", "recall", "f1", "support"}},
    "labels": [...], "confusion_matrix": int array [len(labels), len(labels)]}`` where
    ``confusion_matrix[i, j]`` counts samples of true class ``labels[i]`` predicted as ``labels[j]``.
    Macro averages cover the labels that occur in ``y_true`` or ``y_pred``.
    """
    labels = list(labels)
    if not labels:
        raise ValueError("labels: expected at least one class label, got an empty list")
    duplicates = [label for label, count in Counter(labels).items() if count > 1]
    if duplicates:
        raise ValueError(f"labels: each label must appear once, repeated: {duplicates}")
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true and y_pred differ in length: {len(y_true)} vs {len(y_pred)}")
    if not y_true:
        raise ValueError("y_true: expected at least one sample, got an empty list")
    index = {label: i for i, label in enumerate(labels)}
    for i, label in enumerate(y_true):
        if label not in index:
            raise ValueError(f"y_true[{i}]: {label!r} is not one of labels {labels}")

    matrix = np.zeros((len(labels), len(labels)), dtype=np.int64)
    unknown = 0
    for true, pred in zip(y_true, y_pred):
        if pred in index:
            matrix[index[true], index[pred]] += 1
        else:
            unknown += 1
    support = Counter(y_true)
    per_class = {}
    for i, label in enumerate(labels):
        tp = int(matrix[i, i])
        precision = _safe_divide(tp, int(matrix[:, i].sum()))
        recall = _safe_divide(tp, support[label])
        f1 = _safe_divide(2 * precision * recall, precision + recall)
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support[label]}

    # Macro averages run over the classes that occur (true or predicted), as sklearn's do by default: a label
    # space may hold classes a split never contains (shapes' held-out colour-kind pairs), whose 0/0 is no score.
    occurring = [label for i, label in enumerate(labels) if support[label] or matrix[:, i].any()]

    def macro(key: str) -> float:
        return float(np.mean([per_class[label][key] for label in occurring]))

    return {
        "accuracy": int(np.trace(matrix)) / len(y_true),
        "macro_precision": macro("precision"),
        "macro_recall": macro("recall"),
        "macro_f1": macro("f1"),
        "num_samples": len(y_true),
        "unknown_predictions": unknown,
        "per_class": per_class,
        "labels": labels,
        "confusion_matrix": matrix,
    }
