"""Two CPU processes (torchrun, gloo) train like one process with the same global batch.

The test launches this file as a script: ``python -m torch.distributed.run --nproc_per_node 2
tests/test_trainer_distributed.py OUT BATCH``. Evaluation and checkpoints run during the
2-process run too, so a hang on "evaluate on the main process only" would time out here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset

from mmlm.config import DataConfig, RunConfig, TrainConfig
from mmlm.training import Task, Trainer
from mmlm.training.trainer import reset_accelerate_state


class Blobs(Dataset):
    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=g)
        self.y = (self.x[:, 0] + self.x[:, 1] > 0).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class SkippingBlobs(Blobs):
    """Reports one skipped image per process (as a process with bad files would), plus one every process met."""

    @property
    def skipped(self):
        return [(f"rank{os.environ.get('RANK', '0')}.png", "truncated"), ("shared.png", "truncated")]


class BlobTask(Task):
    """Two-class classification with a tiny MLP; deterministic loss (no RNG), so ranks only differ by data."""

    name = "blobs"

    def build_model(self):
        return nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 2))

    def prepare_once(self, model):
        """A one-off preparation (as the VAE pre-stage): only the main process runs it, the others get its result."""
        with torch.no_grad():
            model[0].bias.fill_(0.5)
        with open(Path(self.config.output_dir).parent / f"{Path(self.config.output_dir).name}-prepared.txt", "a") as f:
            f.write(os.environ.get("RANK", "0") + "\n")

    def build_datasets(self, model):
        return {"train": SkippingBlobs(64, 1), "val": Blobs(16, 2)}

    def collate(self, samples):
        return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])

    def training_loss(self, model, batch):
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)

    def evaluate(self, model, dataset, out_dir, split):
        x, y = self.collate([dataset[i] for i in range(len(dataset))])
        return {"accuracy": (model(x).argmax(-1) == y).float().mean().item()}

    def save_model(self, model, directory):
        save_file(model.state_dict(), str(Path(directory) / "model.safetensors"))


def run(output_dir: str, batch_size: int) -> None:
    config = RunConfig(
        task="blobs",
        output_dir=output_dir,
        data=DataConfig(batch_size=batch_size),
        train=TrainConfig(lr=1e-2, warmup_steps=2, max_steps=6, grad_accum_steps=2, eval_every=3, save_every=3,
                          best_metric="val/accuracy", log_every=2, mixed_precision="no", num_threads=1),
    )
    Trainer(config, BlobTask(config)).fit()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(out: Path, processes: int, batch_size: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               f"--master_port={_free_port()}", __file__, str(out), str(batch_size)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    _launch(tmp_path / "two", processes=2, batch_size=4)  # 2 x 4 x accumulation 2 = 16 per step
    threads = torch.get_num_threads()
    reset_accelerate_state()
    try:
        run(str(tmp_path / "one"), batch_size=8)  # 1 x 8 x accumulation 2 = 16 per step, in this process
    finally:
        reset_accelerate_state()
        torch.set_num_threads(threads)
    two = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    one = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, rtol=1e-5, atol=1e-6)
    checkpoint = tmp_path / "two" / "checkpoints" / "step_000006"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    assert (tmp_path / "two" / "best" / "model.safetensors").is_file()
    assert (tmp_path / "two-prepared.txt").read_text() == "0\n"  # once, on the main process only
    reported = (tmp_path / "two" / "skipped.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["source"] for line in reported) == ["rank0.png", "rank1.png", "shared.png"]


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]))
    if torch.distributed.is_initialized():  # a clean gloo teardown (no "terminate called" at exit)
        torch.distributed.destroy_process_group()
