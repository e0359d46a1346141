"""train.report_to: loss, learning rate, evaluation metrics and evaluation pictures reach TensorBoard, W&B (offline)
and MLflow (a local SQLite store), through accelerate's trackers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from torch import nn

from mmlm.config import ConfigError
from mmlm.training import Trainer
from mmlm.training.trackers import check_report_to
from test_trainer import ToyTask, make_config

pytest.importorskip("wandb", reason="wandb is not installed (pip install wandb)")
pytest.importorskip("mlflow", reason="mlflow is not installed (pip install mlflow)")


class PictureTask(ToyTask):
    """The toy task, with an evaluation picture as the captioning / diffusion tasks write them."""

    def evaluate(self, model, dataset, out_dir, split):
        Image.new("RGB", (16, 8), (200, 30, 30)).save(Path(out_dir) / "samples.png")
        return super().evaluate(model, dataset, out_dir, split)


def test_records_and_pictures_reach_every_tracker(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = make_config(tmp_path, max_steps=4, eval_every=2, report_to=["tensorboard", "wandb", "mlflow"])
    Trainer(config, PictureTask(config)).fit()
    run = Path(config.output_dir)

    # TensorBoard: scalars and the picture, read back with tensorboard's own reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events_dir,) = (run / "trackers" / "tensorboard").iterdir()
    events = EventAccumulator(str(events_dir), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert {"loss", "lr", "val/loss", "val/score"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("val/loss")] == [2, 4]
    assert "val/samples" in events.Tags()["images"]

    # W&B offline: the run's history file holds the metrics and the logged image
    (wandb_run,) = (run / "wandb").glob("offline-run-*")
    assert list(wandb_run.glob("*.wandb"))
    media = list((wandb_run / "files" / "media" / "images").rglob("*.png"))
    assert media, "no image in the offline W&B run"

    # MLflow local store: metric histories and the picture as an artifact
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{(run / 'mlflow.db').resolve()}")
    (found,) = mlflow.search_runs(experiment_names=["mmlm"], output_format="list")
    client = mlflow.MlflowClient()
    assert [m.step for m in client.get_metric_history(found.info.run_id, "val/loss")] == [2, 4]
    assert client.get_metric_history(found.info.run_id, "lr")
    artifacts = client.list_artifacts(found.info.run_id, "eval/step_000002/val_step_000002")
    assert [Path(a.path).name for a in artifacts] == ["samples.png"]
    assert found.data.params["train.lr"] == "0.01"


def test_report_to_names_are_checked():
    assert check_report_to(["tensorboard"]) == ["tensorboard"]
    with pytest.raises(ConfigError, match="unknown tracker 'comet'"):
        check_report_to(["comet"])
