"""The end of a run: the skipped-images list, the summary, the final model, the loss curve and the report."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from accelerate.utils import gather_object
from tqdm.auto import tqdm

from mmlm.eval.plots import plot_loss_curve
from mmlm.eval.report import write_run_report
from mmlm.training import checkpoint as ckpt
from mmlm.training.distributed import run_on_main

if TYPE_CHECKING:
    from mmlm.training.trainer import Trainer


def report_skipped(trainer: Trainer) -> list[dict[str, str]]:
    """Images the splits skipped (``data.on_bad_image: skip``): written to ``skipped.jsonl`` and counted.

    Each process sees the images its own data loading skipped: the lists are gathered, and an image
    more than one process skipped is reported once.
    """
    skipped = [{"split": split, "source": source, "reason": reason}
               for split, dataset in trainer.datasets.items() for source, reason in getattr(dataset, "skipped", [])]
    if trainer.accelerator.num_processes > 1:
        gathered = gather_object(skipped)
        skipped = [dict(t) for t in dict.fromkeys(tuple(r.items()) for r in gathered)]
    if trainer.is_main:
        path = trainer.output_dir / "skipped.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in skipped), encoding="utf-8")
        if skipped:
            tqdm.write(f"mmlm: skipped {len(skipped)} bad images (data.on_bad_image=skip); which and why: {path}")
    return skipped


def finish(trainer: Trainer, metrics: dict[str, float], last_loss: float) -> dict[str, Any]:
    """Save the final model, the loss curve and the run report; return the summary, metrics and paths."""
    out = trainer.output_dir
    paths = {
        "output_dir": str(out),
        "model_dir": str(out / "model"),
        "checkpoint": str(trainer.last_checkpoint),
        "metrics_file": str(out / "metrics.jsonl"),
        "loss_curve": str(out / "loss_curve.png"),
    }
    best_metric = trainer.config.train.best_metric
    if best_metric is not None:
        paths["best_dir"] = str(out / "best")

    skipped = report_skipped(trainer)
    paths["skipped_file"] = str(out / "skipped.jsonl")
    summary: dict[str, Any] = {"step": trainer.step, "epoch": trainer.epoch_progress, "train/loss": last_loss,
                               "elapsed_s": trainer.elapsed_s, "samples_seen": trainer.samples_seen,
                               "skipped_images": len(skipped)}
    if trainer.best_value is not None:
        summary["best/" + best_metric] = trainer.best_value
        summary["best/step"] = trainer.best_step

    with trainer.evaluation_model() as model:  # EMA weights applied; a full copy under FSDP (a collective)
        def save_final() -> None:
            ckpt.save_model(trainer.task, model, None, out / "model")
            plot_loss_curve(out / "metrics.jsonl", out / "loss_curve.png")
            pictures = sorted(out.glob(f"eval/*_step_{trainer.step:06d}/*.png"))
            if (out / "model" / "config.json").is_file():  # the model card, now with the run
                from mmlm.model_card import write_model_card

                write_model_card(out / "model", recipe=out / "config.yaml", data=trainer.config.data.source,
                                 steps=trainer.step, metrics={**summary, **metrics},
                                 image=pictures[0] if pictures else None)
            write_run_report(out, f"{type(trainer.task).__name__}: {out.name}", {**summary, **metrics}, pictures,
                             out / "metrics.jsonl")

        run_on_main(trainer.accelerator, "saving the final model and the report", save_final, trainer.step)
    return {**summary, **metrics, **paths}
