"""Exact resume and checkpoint safety: a crashed-and-resumed run ends bitwise equal to an uninterrupted one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset

from mmlm.config import DataConfig, RunConfig, TrainConfig
from mmlm.training import (
    CheckpointError,
    CheckpointWriteError,
    Task,
    Trainer,
    TrainingError,
    latest_checkpoint,
)
from mmlm.training import checkpoint as ckpt
from mmlm.eval.plots import read_metrics_jsonl as read_metrics
from mmlm.training.trainer import reset_accelerate_state


class DropoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 32), nn.GELU(), nn.Dropout(0.2), nn.Linear(32, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1)


class Noisy(Dataset):
    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 6, generator=g)
        self.y = self.x.sum(-1).tanh()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class SimulatedCrash(RuntimeError):
    pass


class NoisyTask(Task):
    """Uses the global RNG in the loss (like diffusion noise) and in evaluation."""

    name = "noisy"

    def __init__(self, config, crash_at_call: int | None = None):
        super().__init__(config)
        self.crash_at_call = crash_at_call
        self.calls = 0

    def build_model(self):
        return DropoutNet()

    def build_datasets(self, model):
        return {"train": Noisy(40, 1), "val": Noisy(8, 2)}

    def collate(self, samples):
        return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])

    def training_loss(self, model, batch):
        self.calls += 1
        if self.calls == self.crash_at_call:
            raise SimulatedCrash(f"crash at micro-batch {self.calls}")
        x, y = batch
        x = x + 0.1 * torch.randn_like(x)
        return nn.functional.mse_loss(model(x), y)

    def evaluate(self, model, dataset, out_dir, split):
        x, y = self.collate([dataset[i] for i in range(len(dataset))])
        noise = torch.randn(()).item()  # evaluation randomness must not shift training's RNG
        return {"loss": nn.functional.mse_loss(model(x), y).item(), "noise": noise}

    def save_model(self, model, directory):
        save_file(model.state_dict(), str(Path(directory) / "model.safetensors"))


def make_config(out: Path, **train) -> RunConfig:
    # 40 samples / batch 4 = 10 micro-batches = 5 steps per epoch with accumulation 2
    defaults = {"lr": 5e-3, "warmup_steps": 3, "max_steps": 13, "schedule": "cosine", "grad_accum_steps": 2,
                "ema_decay": 0.9, "save_every": 3, "eval_every": 4, "keep_last": 5, "log_every": 1,
                "mixed_precision": "no", "max_grad_norm": 0.5}
    return RunConfig(task="noisy", output_dir=str(out), data=DataConfig(batch_size=4),
                     train=TrainConfig(**{**defaults, **train}))


def final_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    state = {f"model.{k}": v.clone() for k, v in trainer.unwrapped.state_dict().items()}
    state.update({f"ema.{k}": v.clone() for k, v in trainer.ema.shadow.items()})
    opt = trainer.optimizer.state_dict()["state"]
    state.update({f"adam.{i}.{k}": v.clone() for i, s in opt.items() for k, v in s.items()})
    return state


def test_crashed_and_resumed_run_ends_bitwise_equal(tmp_path):
    config = make_config(tmp_path / "straight")
    straight = Trainer(config, NoisyTask(config))
    straight.fit()
    expected = final_state(straight)

    reset_accelerate_state()
    config = make_config(tmp_path / "crashed")
    # micro-batch 16 is step 8's second half: after the step-6 checkpoint, mid-epoch (epoch 1, batch 2 of 10)
    with pytest.raises(SimulatedCrash):
        Trainer(config, NoisyTask(config, crash_at_call=16)).fit()
    assert latest_checkpoint(tmp_path / "crashed" / "checkpoints").name == "step_000006"

    reset_accelerate_state()
    resumed = Trainer(config, NoisyTask(config), resume=True)
    assert (resumed.step, resumed.epoch, resumed.batch_in_epoch) == (6, 1, 2)
    result = resumed.fit()
    assert result["step"] == 13
    got = final_state(resumed)
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    saved = load_file(str(tmp_path / "crashed" / "model" / "model.safetensors"))
    straight_saved = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    assert all(torch.equal(saved[k], straight_saved[k]) for k in saved)

    steps = [r["step"] for r in read_metrics(tmp_path / "crashed" / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 14))  # records the crash left after step 6 were dropped, none doubled
    same = [r for r in read_metrics(tmp_path / "straight" / "metrics.jsonl") if "loss" in r]
    assert [r["loss"] for r in same] == [r["loss"] for r in read_metrics(tmp_path / "crashed" / "metrics.jsonl")
                                          if "loss" in r]


def test_evaluation_does_not_change_the_training_trajectory(tmp_path):
    config = make_config(tmp_path / "quiet", max_steps=6, eval_every=None, save_every=None)
    quiet = Trainer(config, NoisyTask(config))
    quiet.fit()
    reset_accelerate_state()
    config = make_config(tmp_path / "busy", max_steps=6, eval_every=1, save_every=2)
    busy = Trainer(config, NoisyTask(config))
    busy.fit()
    for name, value in final_state(quiet).items():
        assert torch.equal(final_state(busy)[name], value), name


def test_resume_picks_only_complete_checkpoints(tmp_path):
    config = make_config(tmp_path / "run", max_steps=4, save_every=2, eval_every=None)
    Trainer(config, NoisyTask(config)).fit()
    root = tmp_path / "run" / "checkpoints"
    half_written = root / "step_000009"
    half_written.mkdir()
    (half_written / "model.safetensors").write_bytes(b"partial")
    (root / ".tmp-step_000010").mkdir()
    assert latest_checkpoint(root).name == "step_000004"

    reset_accelerate_state()
    assert Trainer(config, NoisyTask(config), resume=True).step == 4
    reset_accelerate_state()
    assert Trainer(config, NoisyTask(config), resume=str(root / "step_000002")).step == 2
    reset_accelerate_state()
    with pytest.raises(CheckpointError, match="step_000009: incomplete checkpoint"):
        Trainer(config, NoisyTask(config), resume=half_written)
    reset_accelerate_state()
    fresh = make_config(tmp_path / "fresh", max_steps=2)
    assert Trainer(fresh, NoisyTask(fresh), resume=True).step == 0  # nothing to resume: start


def test_resume_into_a_new_folder_and_after_a_cut_short_metrics_line(tmp_path):
    config = make_config(tmp_path / "run", max_steps=4, save_every=2, eval_every=None)
    Trainer(config, NoisyTask(config)).fit()
    metrics = tmp_path / "run" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:3]) + "\n" + lines[3][:7])  # kill -9 in the middle of a write

    reset_accelerate_state()
    resumed = Trainer(config, NoisyTask(config), resume=str(tmp_path / "run" / "checkpoints" / "step_000002"))
    assert resumed.step == 2 and resumed.fit()["step"] == 4
    assert [r["step"] for r in read_metrics(metrics) if "loss" in r] == [1, 2, 3, 4]  # the cut line is gone

    reset_accelerate_state()
    elsewhere = make_config(tmp_path / "elsewhere", max_steps=4, save_every=2, eval_every=None)
    moved = Trainer(elsewhere, NoisyTask(elsewhere), resume=str(tmp_path / "run" / "checkpoints" / "step_000002"))
    assert moved.fit()["step"] == 4
    assert [r["step"] for r in read_metrics(tmp_path / "elsewhere" / "metrics.jsonl") if "loss" in r] == [3, 4]

    metrics.write_text('{"step": 1}\nnot json\n{"step": 2}\n')  # a bad line inside is an error, not a crash trace
    reset_accelerate_state()
    with pytest.raises(ValueError, match="metrics.jsonl:2: invalid JSON"):
        Trainer(config, NoisyTask(config), resume=True).fit()


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    config = make_config(tmp_path / "run", max_steps=8, save_every=2, eval_every=None)
    trainer = Trainer(config, NoisyTask(config))
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == "step_000004":
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(CheckpointWriteError, match=r"step_000004 at step 4 .*No space left.*step_000002") as info:
        trainer.fit()
    assert isinstance(info.value, TrainingError) and isinstance(info.value, OSError)
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_000002"]  # the temp folder was removed
    previous = root / "step_000002"
    assert ckpt.read_state(previous)["step"] == 2
    assert set(load_file(str(previous / "model.safetensors"))) == set(DropoutNet().state_dict())
