"""Faults: kill -9 at random moments (checkpoint writes included), failing writes, crashing and hanging workers.

Nothing may be lost: a killed run resumed from its last complete checkpoint ends bitwise equal to an
uninterrupted one, a half-written checkpoint is never picked up, a failed write leaves the previous
checkpoint byte for byte as it was, and a dead or stuck data worker is reported with the file it was reading.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import queue
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

import mmlm.data.datasets as data_module
from mmlm.config import DataConfig, RunConfig, TrainConfig
from mmlm.data import DataWorkerError, ImageTextDataset, Record, collate_image_text, guard_workers
from mmlm.training import CheckpointWriteError, Task, Trainer, latest_checkpoint, list_checkpoints
from mmlm.training import checkpoint as ckpt
from mmlm.training.trainer import reset_accelerate_state

REPO = Path(__file__).resolve().parents[1]

# The child: a small regression run that checkpoints every step. It announces each micro-batch, and pauses
# inside its PAUSE_AT_WRITE-th checkpoint write, so the parent can kill it at any moment, writes included.
CHILD = textwrap.dedent('''
    import os, sys, time
    from pathlib import Path
    import torch
    from safetensors.torch import save_file
    from torch import nn
    from torch.utils.data import Dataset
    from mmlm.config import DataConfig, RunConfig, TrainConfig
    from mmlm.training import Task, Trainer
    from mmlm.training import checkpoint as ckpt

    class Data(Dataset):
        def __init__(self, n, seed):
            g = torch.Generator().manual_seed(seed)
            self.x = torch.randn(n, 6, generator=g)
            self.y = self.x.sum(-1).sin()
        def __len__(self):
            return len(self.x)
        def __getitem__(self, i):
            return self.x[i], self.y[i]

    class Regression(Task):
        name = "regression"
        def build_model(self):
            return nn.Sequential(nn.Linear(6, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 1))
        def build_datasets(self, model):
            return {"train": Data(24, 1)}
        def collate(self, samples):
            return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])
        def training_loss(self, model, batch):
            print("BATCH", flush=True)
            time.sleep(0.02)
            x, y = batch
            return nn.functional.mse_loss(model(x + 0.05 * torch.randn_like(x)).squeeze(-1), y)
        def evaluate(self, model, dataset, out_dir, split):
            return {}
        def save_model(self, model, directory):
            save_file(model.state_dict(), str(Path(directory) / "model.safetensors"))

    write_json, writes = ckpt.write_json, []
    def pausing_write_json(path, data):  # inside a checkpoint write: state files on disk, no COMPLETE marker yet
        writes.append(data.get("step"))
        if len(writes) == int(os.environ.get("PAUSE_AT_WRITE", 0)):
            print("PAUSED in the write of step", data.get("step"), flush=True)
            time.sleep(120)  # the parent kills us here
        write_json(path, data)
    ckpt.write_json = pausing_write_json

    out, resume = sys.argv[1], sys.argv[2] == "resume"
    config = RunConfig(task="regression", output_dir=out, data=DataConfig(batch_size=4),
                       train=TrainConfig(lr=3e-3, warmup_steps=2, max_steps=20, save_every=1, keep_last=2,
                                         grad_accum_steps=1, mixed_precision="no", log_every=1, num_threads=1))
    trainer = Trainer(config, Regression(config), resume=resume)
    print("RESUMED", trainer.resumed_from.name if trainer.resumed_from else None, flush=True)
    trainer.fit()
    print("DONE", flush=True)
''')


class Child:
    """A training subprocess whose stdout lines arrive on a queue."""

    def __init__(self, script: Path, out: Path, resume: bool, pause_at_write: int = 0):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PAUSE_AT_WRITE": str(pause_at_write)}
        self.proc = subprocess.Popen([sys.executable, str(script), str(out), "resume" if resume else "fresh"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        with self.proc.stdout:
            for line in self.proc.stdout:
                self.lines.put(line.strip())

    def wait_for(self, prefix: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    raise AssertionError(f"child exited ({self.proc.returncode}) before '{prefix}': "
                                         f"{self.proc.stderr.read()[-2000:]}")
                continue
            if line.startswith(prefix):
                return line
        raise AssertionError(f"child printed no '{prefix}' within {timeout} s")

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc.stderr.close()

    def finish(self, timeout: float = 120.0):
        self.wait_for("DONE", timeout)
        assert self.proc.wait(timeout=30) == 0
        self.proc.stderr.close()


@pytest.mark.slow
def test_kill_9_at_random_moments_loses_nothing(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD, encoding="utf-8")
    reference = Child(script, tmp_path / "straight", resume=False)
    reference.finish()

    out = tmp_path / "killed"
    rng = random.Random(7)
    moments = ["during a checkpoint write", "at a random moment", "during a checkpoint write", "at a random moment"]
    kills = []
    pause = rng.randint(1, 3)
    child = Child(script, out, resume=False, pause_at_write=pause)
    for i, moment in enumerate(moments):
        if moment == "during a checkpoint write":
            child.wait_for("PAUSED")
        else:  # a random point a few steps on: counted in batches, so a fast machine cannot finish first
            for _ in range(rng.randint(1, 4)):
                child.wait_for("BATCH")
            time.sleep(rng.uniform(0.0, 0.015))
        child.kill()
        root = out / "checkpoints"
        complete = list_checkpoints(root)
        half_written = [p.name for p in root.iterdir() if p.name.startswith(ckpt.TMP_PREFIX)] if root.is_dir() else []
        kills.append((moment, [p.name for p in complete], half_written))
        if moment == "during a checkpoint write":
            assert half_written, f"the kill {moment} left no half-written folder: {kills[-1]}"
        for path in complete:  # every folder that counts as complete really is
            assert (path / "model.safetensors").is_file() and (path / ckpt.STATE_FILE).is_file()
            json.loads((path / ckpt.STATE_FILE).read_text(encoding="utf-8"))
        expected = complete[-1].name if complete else "None"
        next_is_write = i + 1 < len(moments) and moments[i + 1] == "during a checkpoint write"
        child = Child(script, out, resume=True, pause_at_write=rng.randint(1, 3) if next_is_write else 0)
        assert child.wait_for("RESUMED") == f"RESUMED {expected}", kills
    child.finish()
    print(f"kills (moment, complete checkpoints, half-written folders): {kills}")

    got = load_file(str(out / "model" / "model.safetensors"))
    want = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    assert got.keys() == want.keys()
    lost = [name for name in want if not torch.equal(got[name], want[name])]
    assert not lost, f"weights differ after {len(kills)} kills {kills}: {lost}"
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, 21))  # every step logged once: nothing lost, nothing doubled


# ----------------------------------------------------------------------------- failing writes (in process)


class Pairs(Dataset):
    def __init__(self):
        self.x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.x[i].sum()


class PairsTask(Task):
    name = "pairs"

    def build_model(self):
        return nn.Linear(4, 1)

    def build_datasets(self, model):
        return {"train": Pairs()}

    def collate(self, samples):
        return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])

    def training_loss(self, model, batch):
        return nn.functional.mse_loss(model(batch[0]).squeeze(-1), batch[1])

    def evaluate(self, model, dataset, out_dir, split):
        return {}

    def save_model(self, model, directory):
        save_file(model.state_dict(), str(Path(directory) / "model.safetensors"))


def pairs_config(out: Path) -> RunConfig:
    return RunConfig(task="pairs", output_dir=str(out), data=DataConfig(batch_size=4),
                     train=TrainConfig(lr=1e-2, warmup_steps=0, max_steps=6, save_every=2, keep_last=3,
                                       mixed_precision="no", log_every=1))


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def disk_full_in_the_middle_of_a_file(monkeypatch, folder_name: str):
    """torch.save writes half of the file into ``folder_name`` and then fails the way a full disk does."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if folder_name in str(f):
            Path(f).write_bytes(b"\x00" * 64)
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def read_only_folder(monkeypatch, folder_name: str):
    """Creating the checkpoint's temp folder fails the way a read-only file system does."""
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if folder_name in self.name:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)


@pytest.mark.parametrize("fault, message", [(disk_full_in_the_middle_of_a_file, "No space left on device"),
                                             (read_only_folder, "Read-only file system")],
                         ids=["ENOSPC", "EROFS"])
def test_failed_checkpoint_write_keeps_the_previous_one_and_resumes(tmp_path, monkeypatch, fault, message):
    config = pairs_config(tmp_path / "run")
    trainer = Trainer(config, PairsTask(config))
    root = tmp_path / "run" / "checkpoints"
    previous: dict[str, str] = {}
    real_finalize = ckpt.finalize

    def finalize_then_break_the_next_write(tmp, final, marker=True):
        done = real_finalize(tmp, final, marker)
        if final.name == "step_000002":
            previous.update(digest(final))
            fault(monkeypatch, "step_000004")
        return done

    monkeypatch.setattr(ckpt, "finalize", finalize_then_break_the_next_write)
    with pytest.raises(CheckpointWriteError, match=rf"step_000004 at step 4 .*{message}.*step_000002"):
        trainer.fit()
    monkeypatch.undo()
    assert [p.name for p in root.iterdir()] == ["step_000002"]  # nothing half-written left behind
    assert digest(root / "step_000002") == previous  # byte for byte as it was

    reset_accelerate_state()
    resumed = Trainer(config, PairsTask(config), resume=True)
    assert resumed.step == 2
    assert resumed.fit()["step"] == 6 and latest_checkpoint(root).name == "step_000006"


# ----------------------------------------------------------------------------- data workers that die or hang


@pytest.fixture
def images(tmp_path):
    for name in ("ok.png", "poison.png"):
        Image.new("RGB", (8, 8), "red").save(tmp_path / name)
    records = [Record(tmp_path / "ok.png", ["fine"], source=f"m.jsonl:{i + 1}") for i in range(8)]
    records[5] = Record(tmp_path / "poison.png", ["boom"], source="m.jsonl:6")
    return records


def poison(monkeypatch, action):
    """``load_image`` misbehaves on poison.png, in the worker process (patched before the workers fork)."""
    real = data_module.load_image

    def load_image(src, **kwargs):
        if str(src).endswith("poison.png"):
            action()
        return real(src, **kwargs)

    monkeypatch.setattr(data_module, "load_image", load_image)


def test_a_worker_that_dies_is_reported_with_its_file(images, monkeypatch):
    poison(monkeypatch, lambda: os.kill(os.getpid(), signal.SIGKILL))  # e.g. a decoder segfault, the OOM killer
    dataset = ImageTextDataset(images)
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_image_text)
    with pytest.raises(DataWorkerError, match=r"worker died: pid \d+ was reading .*poison\.png \(record m\.jsonl:6\)"):
        for _ in guard_workers(loader, dataset):
            pass


def test_a_worker_that_hangs_is_reported_with_its_file(images, monkeypatch):
    poison(monkeypatch, lambda: time.sleep(3))  # e.g. a stuck network file system (short: the loader joins it)
    dataset = ImageTextDataset(images)
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_image_text, timeout=2)
    start = time.monotonic()
    with pytest.raises(DataWorkerError, match=r"timed out after 2 seconds: pid \d+ is reading .*poison\.png"):
        for _ in guard_workers(loader, dataset):
            pass
    assert time.monotonic() - start < 30


def test_worker_errors_keep_their_type_and_file(images, tmp_path):
    (tmp_path / "poison.png").write_bytes(b"not a png")
    dataset = ImageTextDataset(images)
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_image_text)
    from mmlm.data import BadImageError

    with pytest.raises(BadImageError, match=r"poison\.png: not an image.*m\.jsonl:6"):
        for _ in guard_workers(loader, dataset):
            pass


class ImagesTask(PairsTask):
    """A linear model on 8x8 images read through the real dataset class, with DataLoader workers."""

    def __init__(self, config, records):
        super().__init__(config)
        self.records = records

    def build_model(self):
        return nn.Linear(8 * 8 * 3, 1)

    def build_datasets(self, model):
        return {"train": ImageTextDataset(self.records, pixels)}

    def collate(self, samples):
        x = torch.stack([s["pixel_values"] for s in samples])
        return x, x.mean(dim=1)


def pixels(image):
    return torch.tensor(list(image.getdata()), dtype=torch.float32).flatten() / 255


def test_a_worker_death_in_a_training_run_names_the_file(tmp_path, images, monkeypatch):
    poison(monkeypatch, lambda: os.kill(os.getpid(), signal.SIGKILL))
    config = pairs_config(tmp_path / "run")
    config.data.num_workers = 2
    with pytest.raises(DataWorkerError, match=r"worker died: pid \d+ was reading .*poison\.png \(record m\.jsonl:6\)"):
        Trainer(config, ImagesTask(config, images)).fit()
