"""The parts of multi-process training that one process can check: the streamed split and its resume, the
evaluation parts, bf16 on CPU for the three tasks (fp16: test_fp16_cpu.py), the FSDP plugin."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from distributed_helpers import config, saved_weights, write_data
from mmlm.api import train
from mmlm.config import FSDPConfig
from mmlm.data import StreamingImageTextDataset
from mmlm.training.distributed import fsdp_plugin
from mmlm.training.evaluation import split_for_process

TINY_SHAPES = {"n_train": 32, "n_val": 4, "n_test": 4, "n_compositional": 4, "image_size": 32, "max_shapes": 2}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"), n_train=16, n_val=2)["train_shards"]


def keys(dataset) -> list[str]:
    return [item["attributes"]["kind"] + str(item["index"]) for item in dataset]


def test_streamed_split_covers_every_sample_once_in_an_epoch_seeded_order(shards):
    dataset = StreamingImageTextDataset(shards, shuffle=True, shuffle_buffer=4, seed=3)
    dataset.set_epoch(0)
    whole = keys(dataset)
    parts = []
    for rank in range(2):
        dataset.set_distributed(rank, 2)
        parts.append(keys(dataset))
    assert sorted(parts[0] + parts[1]) == sorted(whole) and len(whole) == 16
    assert parts[0] == whole[0::2] and parts[1] == whole[1::2]  # 2 x B sees what 1 x 2B sees, per step
    dataset.set_distributed(0, 1)
    dataset.set_epoch(1)
    assert keys(dataset) != whole and sorted(keys(dataset)) == sorted(whole)  # reshuffled per epoch
    dataset.set_epoch(0)
    assert keys(dataset) == whole  # and the same again for the same (seed, epoch)
    dataset.skip(2, 3)
    assert keys(dataset) == whole[6:]  # resume: the first 2 batches of 3 are dropped before decoding


def test_streamed_split_by_dataloader_worker(shards):
    dataset = StreamingImageTextDataset(shards)
    dataset.set_epoch(0)
    whole = keys(dataset)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=lambda b: b)
    seen = [item["attributes"]["kind"] + str(item["index"]) for batch in loader for item in batch]
    assert sorted(seen) == sorted(whole)  # every sample once, none twice


def test_evaluation_parts_are_contiguous_and_in_order():
    dataset = list(range(10))
    parts = [split_for_process(dataset, 7, rank, 3) for rank in range(3)]
    assert [list(part) for part, *_ in parts] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [start for _, start, _, _ in parts] == [0, 3, 5]


def test_fsdp_plugin_is_fsdp2_with_full_state_dicts():
    plugin = fsdp_plugin(FSDPConfig(enabled=True, sharding_strategy="shard_grad_op"))
    assert plugin.fsdp_version == 2 and not plugin.reshard_after_forward
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)
    assert fsdp_plugin(FSDPConfig()) is None


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["captioning", "classification", "diffusion"])
def test_bf16_trains_and_resumes_bitwise(tmp_path, task):
    data = {"source": "shapes", "shapes": TINY_SHAPES, "batch_size": 8, "label_field": "kind"}
    steps = {"mixed_precision": "bf16", "lr": 3e-3, "max_steps": 6, "save_every": 3}
    full = config(task, tmp_path / "full", data, steps)
    result = train(full)
    seen = losses(tmp_path / "full")
    assert all(torch.isfinite(torch.tensor(seen))), seen
    assert sum(seen[-2:]) < sum(seen[:2]), f"bf16 loss did not fall: {seen}"
    assert result["step"] == 6
    halves = config(task, tmp_path / "halves", data, {**steps, "max_steps": 3})
    train(halves)
    train(config(task, tmp_path / "halves", data, steps), resume=True)
    a = {k.split("/", 1)[1]: v for k, v in saved_weights(tmp_path / "full").items()}
    b = {k.split("/", 1)[1]: v for k, v in saved_weights(tmp_path / "halves").items()}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_format_auto_detects_each_source_on_its_own(tmp_path):
    from mmlm.config import DataConfig
    from mmlm.data import ImageTextDataset, build_datasets

    paths = write_data(tmp_path, n_train=4, n_val=2)
    splits = build_datasets(DataConfig(source=paths["train_shards"], val_source=paths["val_jsonl"],
                                       test_source=paths["train_jsonl"]), None, None, seed=1)
    assert isinstance(splits["train"], StreamingImageTextDataset) and splits["train"].shuffle
    assert isinstance(splits["val"], ImageTextDataset) and len(splits["val"]) == 2  # JSONL beside tar shards
    assert isinstance(splits["test"], ImageTextDataset) and splits["train"].seed == splits["val"].seed == 1
