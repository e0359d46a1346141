"""Evaluation: caption, classification and generation metrics, and run reports."""

from mmlm.eval.caption_metrics import caption_scores, exact_match_rate, tokenize_caption
from mmlm.eval.classification_metrics import classification_report, save_confusion_matrix_png
from mmlm.eval.generation_metrics import (
    extract_features,
    feature_statistics,
    frechet_distance,
    kernel_inception_distance,
)
from mmlm.eval.shapes_judge import ShapesJudge, prompt_fidelity, train_shapes_judge
from mmlm.eval.plots import image_grid, plot_loss_curve
from mmlm.eval.report import ReportWriter, write_metrics

__all__ = [
    "ReportWriter",
    "ShapesJudge",
    "caption_scores",
    "classification_report",
    "exact_match_rate",
    "extract_features",
    "feature_statistics",
    "frechet_distance",
    "image_grid",
    "kernel_inception_distance",
    "plot_loss_curve",
    "prompt_fidelity",
    "save_confusion_matrix_png",
    "tokenize_caption",
    "train_shapes_judge",
    "write_metrics",
]
