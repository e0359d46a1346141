"""The training harness on toy tasks: run folder, accumulation, parameter groups, schedule, stops, errors."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset

from mmlm.config import ConfigError, DataConfig, RunConfig, TrainConfig, from_dict
from mmlm.training import (
    EMA,
    NonFiniteLossError,
    Task,
    Trainer,
    TrainingError,
    WarmupDecaySchedule,
    lr_factor,
    parameter_groups,
)
from mmlm.eval.plots import read_metrics_jsonl as read_metrics
from mmlm.training.trainer import reset_accelerate_state


class ToyNet(nn.Module):
    def __init__(self, dim: int = 8):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim, 16), nn.LayerNorm(16), nn.GELU())
        self.head = nn.Linear(16, 1)
        self.checkpointing = False

    def forward(self, x):
        return self.head(self.body(x)).squeeze(-1)

    def trainable_groups(self):
        return {"body": self.body, "head": self.head}

    def enable_gradient_checkpointing(self):
        self.checkpointing = True


class Pairs(Dataset):
    """y = sin(x . w) with fixed w; x drawn from ``seed``."""

    def __init__(self, n: int, seed: int, dim: int = 8):
        self.x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
        self.y = torch.sin(self.x @ torch.randn(dim, generator=torch.Generator().manual_seed(99)))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class ToyTask(Task):
    name = "toy"

    def __init__(self, config, n_train=64, n_val=16, nan_at_call=None, model_cls=ToyNet):
        super().__init__(config)
        self.n_train, self.n_val, self.nan_at_call, self.model_cls = n_train, n_val, nan_at_call, model_cls
        self.calls = 0

    def build_model(self):
        return self.model_cls()

    def build_datasets(self, model):
        return {"train": Pairs(self.n_train, 1), "val": Pairs(self.n_val, 2)}

    def collate(self, samples):
        return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])

    def training_loss(self, model, batch):
        self.calls += 1
        x, y = batch
        loss = nn.functional.mse_loss(model(x), y)
        return loss * float("nan") if self.calls == self.nan_at_call else loss

    def evaluate(self, model, dataset, out_dir, split):
        x, y = self.collate([dataset[i] for i in range(len(dataset))])
        mse = nn.functional.mse_loss(model(x), y).item()
        return {"loss": mse, "score": -mse}

    def save_model(self, model, directory):
        save_file(model.state_dict(), str(Path(directory) / "model.safetensors"))


def make_config(tmp_path, batch_size=8, **train) -> RunConfig:
    defaults = {"lr": 1e-2, "warmup_steps": 2, "max_steps": 6, "log_every": 1, "mixed_precision": "no",
                "max_grad_norm": None}
    return RunConfig(
        task="toy",
        output_dir=str(tmp_path / "run"),
        data=DataConfig(batch_size=batch_size),
        train=TrainConfig(**{**defaults, **train}),
    )


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.unwrapped.state_dict().items()}


def test_fit_writes_the_run_folder_and_learns(tmp_path):
    config = make_config(tmp_path, max_steps=24, save_every=8, eval_every=8, keep_last=2,
                         best_metric="val/score", ema_decay=0.8, weight_decay=0.0)
    trainer = Trainer(config, ToyTask(config))
    untrained = trainer.evaluate("val")["val/loss"]
    result = trainer.fit()
    run = tmp_path / "run"

    assert result["step"] == 24 and result["epoch"] == 3.0
    assert (run / "config.yaml").is_file() and (run / "loss_curve.png").stat().st_size > 1000
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000016", "step_000024"]
    assert (run / "model" / "model.safetensors").is_file()
    best = json.loads((run / "best" / "best_metric.json").read_text())
    assert best["metric"] == "val/score" and best["step"] in (8, 16, 24)
    assert result["best/val/score"] == pytest.approx(best["value"])

    records = read_metrics(run / "metrics.jsonl")
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, 25))
    assert {"lr", "samples_per_s", "elapsed_s", "epoch"} <= set(train_records[0])
    assert [r["step"] for r in records if "val/score" in r] == [8, 16, 24]
    assert result["val/loss"] < 0.8 * untrained, (untrained, result["val/loss"])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(1, 25))
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([r["loss"] for r in train_records])
    assert [e.step for e in events.Scalars("val/score")] == [8, 16, 24]

    # the final model holds the EMA weights, not the live ones
    saved = load_file(str(run / "model" / "model.safetensors"))
    config2 = make_config(tmp_path / "again", max_steps=24, ema_decay=0.8, weight_decay=0.0)
    trainer = Trainer(config2, ToyTask(config2))
    trainer.fit()
    assert not torch.equal(saved["head.weight"], trainer.unwrapped.head.weight.detach())
    assert torch.allclose(saved["head.weight"], trainer.ema.shadow["head.weight"])


def test_accumulation_matches_one_big_batch(tmp_path):
    big_cfg = make_config(tmp_path / "big", batch_size=16, max_steps=3)
    big = Trainer(big_cfg, ToyTask(big_cfg))
    big.fit()
    reset_accelerate_state()
    acc_cfg = make_config(tmp_path / "acc", batch_size=4, grad_accum_steps=4, max_steps=3)
    accumulated = Trainer(acc_cfg, ToyTask(acc_cfg))
    accumulated.fit()
    assert accumulated.samples_seen == big.samples_seen == 48
    for name, value in weights(big).items():
        torch.testing.assert_close(weights(accumulated)[name], value, rtol=1e-5, atol=1e-6)


def test_adamw_is_fused_by_default_and_steps_as_the_per_tensor_loop_does(tmp_path):
    fused_cfg = make_config(tmp_path / "fused", max_steps=4, weight_decay=0.1)
    fused = Trainer(fused_cfg, ToyTask(fused_cfg))
    assert fused.optimizer.defaults["fused"] is True
    fused.fit()
    reset_accelerate_state()
    loop_cfg = make_config(tmp_path / "loop", max_steps=4, weight_decay=0.1, fused_adamw=False)
    loop = Trainer(loop_cfg, ToyTask(loop_cfg))
    assert not loop.optimizer.defaults["fused"]
    initial = weights(loop)
    loop.fit()
    assert any(not torch.equal(value, initial[name]) for name, value in weights(loop).items())
    for name, value in weights(loop).items():
        torch.testing.assert_close(weights(fused)[name], value, rtol=1e-5, atol=1e-6)


def test_module_lr_freezes_parts_and_skips_decay_on_norms_and_biases(tmp_path):
    config = make_config(tmp_path, module_lr={"body": 0.0, "head": 5e-3})
    trainer = Trainer(config, ToyTask(config))
    body_before = {k: v.clone() for k, v in trainer.unwrapped.body.state_dict().items()}
    head_before = trainer.unwrapped.head.weight.detach().clone()
    groups = trainer.optimizer.param_groups
    assert {g["name"] for g in groups} == {"head"}
    assert all(not p.requires_grad for p in trainer.unwrapped.body.parameters())
    decay = {g["decay"]: g for g in groups}
    assert decay[True]["weight_decay"] == config.train.weight_decay and decay[False]["weight_decay"] == 0.0
    assert decay[False]["params"][0] is trainer.unwrapped.head.bias
    trainer.fit()
    for k, v in trainer.unwrapped.body.state_dict().items():
        assert torch.equal(v, body_before[k])
    assert not torch.equal(trainer.unwrapped.head.weight, head_before)
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[-2]["lr/head"] > 0

    model = ToyNet()
    norm_and_bias = parameter_groups(model, model.trainable_groups(), TrainConfig(lr=1.0))
    no_decay = [p for g in norm_and_bias if not g["decay"] for p in g["params"]]
    assert {id(p) for p in no_decay} == {id(p) for n, p in model.named_parameters() if p.ndim == 1}
    with pytest.raises(ConfigError, match="unknown part.*'bdy'"):
        parameter_groups(model, model.trainable_groups(), TrainConfig(module_lr={"bdy": 1.0}))


def test_position_embeddings_get_no_weight_decay():
    class WithPositions(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
            self.wpe = nn.Embedding(4, 8)
            self.proj = nn.Linear(8, 8)

    model = WithPositions()
    groups = parameter_groups(model, {"model": model}, TrainConfig())
    decayed = [p for g in groups if g["decay"] for p in g["params"]]
    assert [id(p) for p in decayed] == [id(model.proj.weight)]


def test_schedule_warmup_cosine_constant_and_time():
    assert lr_factor(0, 4, 0.0, "cosine", 0.1) == pytest.approx(0.25)
    assert lr_factor(3, 4, 0.0, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 4, 0.5, "cosine", 0.1) == pytest.approx(0.55)
    assert lr_factor(10, 4, 1.0, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(10, 0, 0.7, "constant", 0.1) == 1.0

    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=2.0)
    schedule = WarmupDecaySchedule(opt, warmup_steps=2, schedule="cosine", min_lr_ratio=0.0, total_steps=6)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert lrs == pytest.approx([1.0, 2.0, 2.0, 2 * 0.5 * (1 + math.cos(math.pi / 4)), 1.0, 2 * 0.5 * (1 + math.cos(3 * math.pi / 4))])
    schedule.set_time_fraction(1.0)  # a spent time budget decays to the minimum whatever the step
    schedule.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)
    state = schedule.state_dict()
    assert set(state) == {"last_epoch", "_step_count", "_last_lr", "time_fraction"}


def test_nan_loss_stops_before_the_optimizer_steps(tmp_path):
    config = make_config(tmp_path, max_steps=10, save_every=2)
    trainer = Trainer(config, ToyTask(config, nan_at_call=3))
    with pytest.raises(NonFiniteLossError, match=r"step 3 .*step_000002") as info:
        trainer.fit()
    assert isinstance(info.value, FloatingPointError) and isinstance(info.value, TrainingError)
    saved = load_file(str(tmp_path / "run" / "checkpoints" / "step_000002" / "model.safetensors"))
    for name, value in weights(trainer).items():
        assert torch.equal(value, saved[name]), name


def test_config_errors_surface(tmp_path):
    with pytest.raises(ConfigError, match="grad_accum_steps"):
        from_dict(RunConfig, {"train": {"grad_accum_steps": 0}})
    task = ToyTask(make_config(tmp_path))
    bad = {
        "max_steps, epochs or max_minutes": {"max_steps": None},
        "mixed_precision": {"mixed_precision": "fp8"},
        "ema_decay": {"ema_decay": 1.5},
        "keep_last": {"keep_last": 0},
    }
    for message, train in bad.items():
        with pytest.raises(ConfigError, match=message):
            Trainer(make_config(tmp_path, **train), task)

    class NoVal(ToyTask):
        def build_datasets(self, model):
            return {"train": Pairs(16, 1)}

    config = make_config(tmp_path, best_metric="val/score")
    with pytest.raises(ConfigError, match="needs a 'val' split"):
        Trainer(config, NoVal(config))
    config = make_config(tmp_path, best_metric="val/accuracy", eval_every=2)
    with pytest.raises(ConfigError, match="val/accuracy.*not among.*val/score"):
        Trainer(config, ToyTask(config)).fit()


def test_refuses_to_mix_runs_in_one_output_dir(tmp_path):
    config = make_config(tmp_path, max_steps=2)
    Trainer(config, ToyTask(config)).fit()
    reset_accelerate_state()
    with pytest.raises(TrainingError, match="already holds checkpoints.*resume=True"):
        Trainer(config, ToyTask(config))


class FakeClock:
    """``time.perf_counter`` that moves only when told: a training step costs ``step_s``, whatever the machine."""

    def __init__(self, step_s: float = 0.0625):  # a power of two: sums are exact
        self.now, self.step_s = 1000.0, step_s

    def __call__(self) -> float:
        return self.now


class ClockedTask(ToyTask):
    """Each training forward advances the fake clock by one step's time; each evaluation by ``eval_s``."""

    def __init__(self, config, clock: FakeClock, eval_s: float = 0.0):
        super().__init__(config)
        self.clock, self.eval_s, self.eval_steps = clock, eval_s, []

    def training_loss(self, model, batch):
        self.clock.now += self.clock.step_s
        return super().training_loss(model, batch)

    def evaluate(self, model, dataset, out_dir, split):
        self.clock.now += self.eval_s
        self.eval_steps.append(self.clock.now)
        return super().evaluate(model, dataset, out_dir, split)


def test_stops_by_epochs_and_by_wall_clock(tmp_path, capsys, monkeypatch):
    config = make_config(tmp_path / "epochs", max_steps=None, epochs=1.5)
    assert Trainer(config, ToyTask(config)).fit()["step"] == 12  # 64 samples / 8 = 8 steps per epoch

    reset_accelerate_state()
    clock = FakeClock()
    monkeypatch.setattr(time, "perf_counter", clock)
    config = make_config(tmp_path / "clock", max_steps=None, max_minutes=0.01, warmup_steps=0, min_lr_ratio=0.1)
    result = Trainer(config, ClockedTask(config, clock)).fit()
    assert result["step"] == 10  # the first step that reaches the 0.6 s budget at 0.0625 s per step
    assert result["elapsed_s"] == 0.625
    last_lr = [r for r in read_metrics(tmp_path / "clock" / "run" / "metrics.jsonl") if "lr" in r][-1]["lr"]
    assert last_lr < 0.2 * config.train.lr  # the schedule decayed over the time budget
    assert "eta=0:0" in capsys.readouterr().err  # the progress bar counts down the budget


def test_evaluation_pauses_the_training_clock(tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(time, "perf_counter", clock)
    config = make_config(tmp_path, max_steps=None, max_minutes=0.01, eval_every=4, warmup_steps=0)
    task = ClockedTask(config, clock, eval_s=5.0)  # each evaluation takes far longer than the whole budget
    result = Trainer(config, task).fit()
    assert len(task.eval_steps) == 3  # at steps 4 and 8 (between training steps), and the final one at 10
    assert result["step"] == 10  # the budget bought as many steps as without evaluations...
    assert result["elapsed_s"] == 0.625  # ...and evaluation time was not counted in it


def test_gradient_checkpointing_switch(tmp_path):
    config = make_config(tmp_path, gradient_checkpointing=True)
    assert Trainer(config, ToyTask(config)).unwrapped.checkpointing

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 1)

    reset_accelerate_state()
    with pytest.raises(ConfigError, match="Plain has neither"):
        Trainer(config, ToyTask(config, model_cls=Plain))


def test_compiled_model_saves_without_orig_mod_prefix(tmp_path, monkeypatch):
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: real_compile(model, backend="eager"))
    config = make_config(tmp_path, max_steps=2, compile=True, warmup_steps=0)
    trainer = Trainer(config, ToyTask(config))
    assert trainer.train_model is not trainer.model
    trainer.fit()
    saved = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    assert set(saved) == set(ToyNet().state_dict())
    assert set(load_file(str(tmp_path / "run" / "checkpoints" / "step_000002" / "model.safetensors"))) == set(saved)


def test_ema_follows_the_weights_and_swaps_back():
    model = nn.Linear(2, 1, bias=False)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(1.0)
    start = ema.shadow["weight"].clone()
    ema.update()  # first update: decay min(0.5, 1/10) = 0.1
    torch.testing.assert_close(ema.shadow["weight"], 0.1 * start + 0.9)
    with ema.applied():
        torch.testing.assert_close(model.weight.detach(), ema.shadow["weight"])
    assert torch.equal(model.weight.detach(), torch.ones(1, 2))
    with pytest.raises(ValueError, match="ema_decay"):
        EMA(model, decay=1.0)




def test_module_lr_zero_freezes_through_the_task(tmp_path):
    """The trainer freezes a part with module_lr 0 by the task's freeze_part (train never imports models);
    the image-text tasks keep it in eval mode for good (models.freezing.freeze)."""
    frozen = []

    class FreezingTask(ToyTask):
        def freeze_part(self, model, name, part):
            frozen.append(name)
            super().freeze_part(model, name, part)

    config = make_config(tmp_path, module_lr={"body": 0.0}, max_steps=1)
    trainer = Trainer(config, FreezingTask(config))
    assert frozen == ["body"] and not any(p.requires_grad for p in trainer.unwrapped.body.parameters())

    from mmlm.tasks.captioning import CaptioningTask

    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    CaptioningTask(config).freeze_part(model, "tower", model[1])
    model.train()
    assert model.training and not model[1].training and model[0].weight.requires_grad
