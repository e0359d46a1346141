"""The real tasks on 2 CPU processes (torchrun, gloo): the same parameters as 1 process with the same global batch
(and as accumulation; diffusion too, its draws keyed per sample), distributed evaluation equal to 1 process, random
captions per epoch, kill -9 and resume, FSDP2 on CPU.

Tiny models (a 1-block ViT tower and a 1-layer Llama: no BatchNorm, whose batch statistics would differ between
2 x 4 and 1 x 8 samples), 32 shapes images with 1-2 shapes (captions of different lengths, so only a loss
normalised by the label tokens of the whole step gives equal parameters).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from distributed_helpers import config, launch, saved_weights, write_data

STEPS = 8  # 2 epochs of 32 samples at a global batch of 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"))


def assert_same_weights(a: Path, b: Path, exact: bool = False) -> None:
    wa = {k.split('/', 1)[1]: v for k, v in saved_weights(a).items()}
    wb = {k.split('/', 1)[1]: v for k, v in saved_weights(b).items()}
    assert wa.keys() == wb.keys()
    for name, value in wa.items():
        if exact:
            assert torch.equal(value, wb[name]), name
        else:
            torch.testing.assert_close(wb[name], value, rtol=1e-5, atol=1e-5, msg=name)


def predictions(run: Path) -> list[str]:
    rows = next(run.glob(f"eval/val_step_{STEPS:06d}/val_captions.jsonl")).read_text().splitlines()
    return [json.loads(row)["prediction"] for row in rows]


def captions_by_epoch(folder: Path, processes: int) -> list[dict[str, str]]:
    """{sample index: the caption it trained on} per epoch, from the per-rank logs of a run."""
    steps = [json.loads(line) for line in (folder / "rank0.jsonl").read_text().splitlines()]
    for rank in range(1, processes):
        for i, line in enumerate((folder / f"rank{rank}.jsonl").read_text().splitlines()):
            steps[i].update(json.loads(line))
    per_epoch = len(steps) // 2
    return [{k: v for step in steps[e * per_epoch:(e + 1) * per_epoch] for k, v in step.items()} for e in (0, 1)]


@pytest.fixture(scope="module")
def manifest_runs(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("manifest")
    source = {"source": data["train_jsonl"], "val_source": data["val_jsonl"]}
    runs = {"two": (2, 4, 1), "one": (1, 8, 1), "accumulated": (1, 4, 2)}
    for name, (processes, batch, accumulation) in runs.items():
        cfg = config("captioning", root / name, {**source, "batch_size": batch},
                     {"max_steps": STEPS, "grad_accum_steps": accumulation})
        launch(cfg, processes, "--log-captions", str(root / f"{name}_captions"))
    return root


@pytest.mark.slow
def test_captioning_two_processes_equal_one_process_and_accumulation(manifest_runs):
    root = manifest_runs
    assert_same_weights(root / "one", root / "two")
    assert_same_weights(root / "one", root / "accumulated")
    # distributed evaluation (each process its half, gathered in order) gives what 1 process gives
    assert predictions(root / "two") == predictions(root / "one")
    two, one = (json.loads((root / name / "metrics.json").read_text()) for name in ("two", "one"))
    for key, value in one.items():
        if key.startswith("val/"):
            assert two[key] == pytest.approx(value, abs=1e-6), key
    assert two["val/num_samples"] == 8


@pytest.mark.slow
def test_random_caption_choice_changes_per_epoch_and_repeats_with_the_seed(manifest_runs):
    two = captions_by_epoch(manifest_runs / "two_captions", 2)
    one = captions_by_epoch(manifest_runs / "one_captions", 1)
    assert len(two[0]) == len(two[1]) == 32  # both processes logged, each its half of every step
    changed = sum(two[0][k] != two[1][k] for k in two[0])
    assert changed >= 16, f"only {changed} of 32 captions changed between epochs"  # 4 captions each: ~24
    assert two == one  # the same seed picks the same caption per (epoch, sample), however many processes


@pytest.mark.slow
def test_fsdp_on_cpu_trains_like_one_process_saves_a_model_one_process_loads_and_resumes(manifest_runs, data,
                                                                                          tmp_path):
    """FSDP2 on 2 gloo processes: sharded parameters and gradients give the 1 x 8 run's parameters; distributed
    evaluation and the saved folder use the gathered full state dict; a mid-epoch checkpoint resumes bitwise."""
    import shutil

    from mmlm.api import evaluate

    source = {"source": data["train_jsonl"], "val_source": data["val_jsonl"]}
    train = {"max_steps": STEPS, "save_every": 3, "keep_last": 3, "fsdp": {"enabled": True}}
    run = tmp_path / "fsdp"
    done = launch(config("captioning", run, source, train), 2)
    assert "on 2 x cpu" in done.stdout
    assert (run / "checkpoints" / "step_000003" / "pytorch_model_fsdp.bin").is_file()  # accelerate's FSDP format
    assert_same_weights(manifest_runs / "one", run)
    assert predictions(run) == predictions(manifest_runs / "one")
    evaluate(run, split="val", out_dir=tmp_path / "reloaded")  # the saved folder, in this one process
    rows = (tmp_path / "reloaded" / "val_captions.jsonl").read_text().splitlines()
    assert [json.loads(row)["prediction"] for row in rows] == predictions(run)

    resumed = tmp_path / "resumed"
    shutil.copytree(run / "checkpoints" / "step_000003", resumed / "checkpoints" / "step_000003")
    shutil.copy(run / "metrics.jsonl", resumed / "metrics.jsonl")  # resume continues the run's metrics log
    launch(config("captioning", resumed, source, train), 2, "--resume")
    assert_same_weights(run, resumed, exact=True)


def test_muon_with_fsdp_stops_with_a_config_error_before_training(data, tmp_path):
    source = {"source": data["train_jsonl"], "val_source": data["val_jsonl"]}
    train = {"max_steps": 2, "optimizer": "muon", "fsdp": {"enabled": True}}
    done = launch(config("captioning", tmp_path / "muon", source, train), 2, check=False)
    assert done.returncode != 0
    assert "train.optimizer='muon' with train.fsdp" in done.stdout + done.stderr
    assert not (tmp_path / "muon" / "checkpoints").exists()


@pytest.fixture(scope="module")
def shard_runs(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    source = {"source": data["train_shards"], "val_source": data["val_jsonl"]}  # format auto: each on its own
    train = {"max_steps": STEPS, "save_every": 3}
    launch(config("captioning", root / "two", source, train), 2)
    launch(config("captioning", root / "one", {**source, "batch_size": 8}, train), 1)
    return root, source, train


@pytest.mark.slow
def test_streamed_shards_two_processes_equal_one_process(shard_runs):
    root, _, _ = shard_runs
    assert_same_weights(root / "one", root / "two")
    assert predictions(root / "two") == predictions(root / "one")


@pytest.mark.slow
def test_kill_minus_nine_then_resume_ends_bitwise_equal(shard_runs):
    root, source, train = shard_runs
    cfg = config("captioning", root / "killed", source, train)
    crashed = launch(cfg, 2, "--kill-at-step", "5", check=False)
    assert crashed.returncode != 0
    checkpoints = sorted(p.name for p in (root / "killed" / "checkpoints").iterdir() if not p.name.startswith("."))
    assert checkpoints == ["step_000003"]  # mid-epoch: resume skips 3 streamed batches
    launch(cfg, 2, "--resume")
    assert_same_weights(root / "two", root / "killed", exact=True)


def train_losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
def test_classification_trains_on_two_processes(data, tmp_path):
    run = tmp_path / "classification"
    cfg = config("classification", run, {"source": data["train_jsonl"], "val_source": data["train_shards"],
                                         "label_field": "kind"})  # streamed val: evaluated in parts by both
    launch(cfg, 2)
    losses = train_losses(run)
    assert len(losses) == 4 and all(map(torch.isfinite, torch.tensor(losses)))
    assert (run / "model" / "config.json").is_file()
    assert 0.0 <= json.loads((run / "metrics.json").read_text())["val/accuracy"] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("train_source, runs", [
    ("train_jsonl", {"two": (2, 4, 1), "one": (1, 8, 1)}),
    ("train_shards", {"two": (2, 4, 1), "one": (1, 8, 1), "accumulated": (1, 4, 2)}),  # streamed: keys by crc32
])
def test_diffusion_two_processes_equal_one_process(data, tmp_path, train_source, runs):
    """Each sample's caption dropout, noise and timestep come from a generator keyed by (seed, epoch, sample), so
    the split of a step over processes and micro-batches changes nothing (global RNG draws: ~7e-3 apart).
    lr 5e-4: Adam turns the rounding noise of near-zero gradients (e.g. attention key biases) into steps ~ lr."""
    source = {"source": data[train_source], "val_source": data["val_jsonl"]}
    for name, (processes, batch, accumulation) in runs.items():
        launch(config("diffusion", tmp_path / name, {**source, "batch_size": batch},
                      {"max_steps": STEPS, "grad_accum_steps": accumulation, "lr": 5e-4}), processes)
    for name in runs:
        if name != "one":
            assert_same_weights(tmp_path / "one", tmp_path / name)
    losses = train_losses(tmp_path / "two")
    assert len(losses) == STEPS and all(map(torch.isfinite, torch.tensor(losses)))
    assert (tmp_path / "two" / "model" / "config.json").is_file()
