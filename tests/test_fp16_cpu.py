"""``train.mixed_precision: fp16`` on CPU: torch's CPU fp16 autocast and GradScaler through accelerate's fp16 paths
(accelerate itself leaves both out on CPU; mmlm.training.distributed.enable_fp16_on_cpu)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from distributed_helpers import config, saved_weights
from mmlm.api import train
from mmlm.config import load_config
from mmlm.training.distributed import build_accelerator, reset_accelerate_state

TINY_SHAPES = {"n_train": 32, "n_val": 4, "n_test": 4, "n_compositional": 4, "image_size": 32, "max_shapes": 2}


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_fp16_on_cpu_autocasts_and_scales_gradients(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: accelerate's own fp16 path runs there")
    try:
        accelerator = build_accelerator(load_config({"train": {"mixed_precision": "fp16"}}).train, tmp_path)
        assert isinstance(accelerator.scaler, torch.amp.GradScaler) and accelerator.scaler.is_enabled()
        with accelerator.autocast():
            out = torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4))
        assert out.dtype == torch.float16
    finally:
        reset_accelerate_state()


@pytest.mark.slow
@pytest.mark.parametrize("task", ["captioning", "classification", "diffusion"])
def test_fp16_trains_and_resumes_bitwise(tmp_path, task):
    data = {"source": "shapes", "shapes": TINY_SHAPES, "batch_size": 8, "label_field": "kind"}
    steps = {"mixed_precision": "fp16", "lr": 3e-3, "max_steps": 6, "save_every": 3}
    quick = {"judge_steps": 5}  # diffusion's shapes judge: its accuracy is not under test here
    train(config(task, tmp_path / "full", data, steps, quick))
    seen = losses(tmp_path / "full")
    assert all(torch.isfinite(torch.tensor(seen))), seen
    assert sum(seen[-2:]) < sum(seen[:2]), f"fp16 loss did not fall: {seen}"
    scaler = torch.load(tmp_path / "full" / "checkpoints" / "step_000003" / "scaler.pt")
    assert 0 < scaler["scale"] <= 65536.0  # the GradScaler's state travels with the checkpoint

    train(config(task, tmp_path / "fp32", data, {**steps, "mixed_precision": "no", "max_steps": 2}, quick))
    fp32 = losses(tmp_path / "fp32")
    assert seen[1] != fp32[1] and seen[1] == pytest.approx(fp32[1], rel=2e-2)  # fp16 compute, not a silent fp32

    train(config(task, tmp_path / "halves", data, {**steps, "max_steps": 3}, quick))
    train(config(task, tmp_path / "halves", data, steps, quick), resume=True)
    a = {k.split("/", 1)[1]: v for k, v in saved_weights(tmp_path / "full").items()}
    b = {k.split("/", 1)[1]: v for k, v in saved_weights(tmp_path / "halves").items()}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
