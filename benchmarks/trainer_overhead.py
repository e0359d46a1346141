"""Samples/s of the mmlm Trainer against a bare hand-written PyTorch loop, in the same run.

    python benchmarks/trainer_overhead.py [--steps 200] [--batch-size 64] [--width 1024] [--repeats 3]

Both loops train the same MLP on the same in-memory data with the same AdamW, warmup + cosine
LR, gradient clipping and batch size. Both are timed at the same point, the start of each
step's loss computation: the rate is counted from step ``--skip`` to the last step, so set-up,
the first steps' warm-up, evaluation and saving stay out and everything a step does between
two forward passes (backward, clipping, optimiser, schedule, logging, data) stays in. Loops
alternate and the best of ``--repeats`` counts.
The goal is an overhead under 5%. Run it alone on the machine: timings collapse when another
process shares the cores.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
from accelerate.state import AcceleratorState, GradientState
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mmlm.config import DataConfig, RunConfig, TrainConfig
from mmlm.training import Task, Trainer

DIM, CLASSES, SAMPLES = 256, 10, 8192
STAMPS: list[float] = []  # perf_counter at the start of every step's forward pass


class RandomClasses(Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(SAMPLES, DIM, generator=g)
        self.y = torch.randint(0, CLASSES, (SAMPLES,), generator=g)

    def __len__(self):
        return SAMPLES

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def collate(samples):
    return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])


def build_model(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, CLASSES))


class BenchTask(Task):
    name = "bench"

    def __init__(self, config: RunConfig, width: int):
        super().__init__(config)
        self.width = width

    def build_model(self):
        return build_model(self.width)

    def build_datasets(self, model):
        return {"train": RandomClasses()}

    def collate(self, samples):
        return collate(samples)

    def training_loss(self, model, batch):
        STAMPS.append(time.perf_counter())
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)

    def evaluate(self, model, dataset, out_dir, split):
        return {}

    def save_model(self, model, directory):
        torch.save(model.state_dict(), Path(directory) / "weights.pt")


def bare_loop(steps: int, batch_size: int, width: int, lr: float, warmup: int) -> None:
    """What one writes by hand: DataLoader, AdamW, LambdaLR warmup + cosine, clipping."""
    model = build_model(width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)

    def factor(step):
        warm = min(1.0, (step + 1) / warmup)
        progress = max(0.0, (step - warmup) / max(1, steps - warmup))
        return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    loader = DataLoader(RandomClasses(), batch_size=batch_size, shuffle=True, drop_last=True, collate_fn=collate)
    step = 0
    while step < steps:
        for x, y in loader:
            STAMPS.append(time.perf_counter())
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step == steps:
                break


def harness_loop(steps: int, batch_size: int, width: int, lr: float, warmup: int, out: Path) -> None:
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    config = RunConfig(
        task="bench", output_dir=str(out), data=DataConfig(batch_size=batch_size),
        train=TrainConfig(lr=lr, warmup_steps=warmup, max_steps=steps, max_grad_norm=1.0, log_every=50,
                          mixed_precision="no"),
    )
    Trainer(config, BenchTask(config, width)).fit()


def seconds_per_step(run, steps: int, skip: int) -> float:
    """Mean time between the starts of consecutive steps, from step ``skip`` to the last."""
    STAMPS.clear()
    run(steps)
    if len(STAMPS) != steps:
        raise RuntimeError(f"expected {steps} timed steps, got {len(STAMPS)}")
    return (STAMPS[-1] - STAMPS[skip]) / (steps - 1 - skip)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--skip", type=int, default=20, help="warm-up steps left out of the timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lr, warmup = 1e-3, 10
    if not 0 <= args.skip < args.steps - 1:
        parser.error("--skip must be >= 0 and below --steps - 1")
    best = {"bare PyTorch loop": math.inf, "mmlm Trainer": math.inf}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            best["bare PyTorch loop"] = min(best["bare PyTorch loop"], seconds_per_step(
                lambda n: bare_loop(n, args.batch_size, args.width, lr, warmup), args.steps, args.skip))
            best["mmlm Trainer"] = min(best["mmlm Trainer"], seconds_per_step(
                lambda n, out=Path(tmp) / f"run_{repeat}": harness_loop(n, args.batch_size, args.width, lr, warmup, out),
                args.steps, args.skip))
    bare = args.batch_size / best["bare PyTorch loop"]
    print(f"\nMLP {DIM}-{args.width}-{args.width}-{CLASSES}, batch {args.batch_size}, "
          f"steps {args.skip}..{args.steps} timed, {torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"| {'loop':<18} | {'samples/s':>10} | {'vs bare':>8} |")
    print(f"|{'-' * 20}|{'-' * 12}|{'-' * 10}|")
    for name, seconds in best.items():
        rate = args.batch_size / seconds
        print(f"| {name:<18} | {rate:>10.0f} | {rate / bare:>8.1%} |")


if __name__ == "__main__":
    main()
