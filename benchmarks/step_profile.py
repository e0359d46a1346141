"""Where a training step of each demo recipe spends its time, and what the usual speed-ups buy on this machine.

For each recipe the script builds the task's model, a real batch and the recipe's AdamW exactly as the Trainer
does, then

1. profiles a few steps with ``torch.profiler`` (forward + backward + clipping + AdamW) and prints the ops that
   take the most self time, so a reader sees what a step is made of;
2. times steps/s for the variants ``eager`` (the recipe as the Trainer runs it: AdamW fused where it can be),
   ``loop_adamw`` (AdamW's per-tensor loop, torch's CPU default, ``train.fused_adamw: false``),
   ``channels_last`` (the image side in NHWC memory format) and ``compile`` (``torch.compile`` of the model),
   in alternating rounds, best round counted, with the ratio to ``eager`` measured in the same run, and the
   seconds of the first two steps (where ``compile`` pays its compilation).

Run it alone (timings collapse when another process shares the cores):

    python benchmarks/step_profile.py                                    # both demo recipes
    python benchmarks/step_profile.py --recipes configs/shapes_captioner.yaml --variants eager loop_adamw
    python benchmarks/step_profile.py --quick                            # smoke run, tiny counts
    python benchmarks/step_profile.py --recipes configs/shapes_captioner.yaml --variants eager \
        --also "stream=model.vision.colour_stream=true"                  # an option's cost per step, same rounds
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from accelerate.utils import set_seed

from captioner_recipe_search import parse_variant  # NAME="key=value ...", as its --variant reads it
from mmlm.api import get_task
from mmlm.config import load_config
from mmlm.training.optim import build_optimizer

RECIPES = ["configs/shapes_captioner.yaml", "configs/shapes_diffusion.yaml"]
VARIANTS = ["eager", "loop_adamw", "channels_last", "compile"]
SMALL_DATA = ["data.shapes.n_train=512", "data.shapes.n_val=8", "data.shapes.n_test=8",
              "data.shapes.n_compositional=8"]


def build_step(recipe: str, variant: str, threads: int | None,
               overrides: list[str] = ()) -> Callable[[], float]:
    """One training step of ``recipe`` (with config ``overrides``) as a closure (returns the loss), set up
    for ``variant``."""
    cfg = load_config(recipe, SMALL_DATA + list(overrides))
    torch.set_num_threads(threads or cfg.train.num_threads or torch.get_num_threads())
    task = get_task(cfg)
    set_seed(cfg.train.seed)
    model = task.build_model()
    task.prepare_once(model)
    datasets = task.build_datasets(model)
    batch = task.collate([datasets["train"][i] for i in range(cfg.data.batch_size)])
    recipe_optimizer = build_optimizer(model, task.trainable_groups(model), cfg.train,
                                       freeze=lambda name, part: task.freeze_part(model, name, part))
    if isinstance(recipe_optimizer, torch.optim.AdamW):
        keep = ("params", "lr", "betas", "weight_decay", "eps")  # the implementation flags come from the variant
        groups = [{k: v for k, v in group.items() if k in keep} for group in recipe_optimizer.param_groups]
        fused = recipe_optimizer.defaults["fused"] and variant != "loop_adamw"
        optimizer = torch.optim.AdamW(groups, fused=fused or None)
    else:  # train.optimizer=muon: timed as the Trainer builds it
        optimizer, groups = recipe_optimizer, recipe_optimizer.param_groups
    if variant == "channels_last":
        model.to(memory_format=torch.channels_last)
        if batch.get("pixel_values") is not None:
            batch["pixel_values"] = batch["pixel_values"].contiguous(memory_format=torch.channels_last)
    train_model = torch.compile(model) if variant == "compile" else model
    params = [p for group in groups for p in group["params"]]
    model.train()

    def step() -> float:
        loss = task.training_loss(train_model, batch)
        loss.backward()
        if cfg.train.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def profile(step: Callable[[], float], steps: int, top: int) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    print(table)


def steps_per_s(step: Callable[[], float], steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", nargs="+", default=RECIPES)
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    p.add_argument("--steps", type=int, default=30, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--profile-steps", type=int, default=5)
    p.add_argument("--top", type=int, default=15, help="ops shown in the profile table")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the recipe's)")
    p.add_argument("--also", action="append", type=parse_variant, default=[], metavar='NAME="key=value ..."',
                   help="an extra eager variant with these config overrides, timed in the same rounds (repeatable)")
    p.add_argument("--quick", action="store_true", help="tiny counts: checks the script runs")
    args = p.parse_args()
    if args.quick:
        args.steps, args.rounds, args.profile_steps, args.top = 2, 1, 1, 5
        args.variants = [v for v in args.variants if v != "compile"]
    for recipe in args.recipes:
        print(f"\n=== {recipe}: profile of {args.profile_steps} training steps (ops by self CPU time)")
        steps = {variant: build_step(recipe, variant, args.threads) for variant in args.variants}
        steps.update({name: build_step(recipe, "eager", args.threads, overrides) for name, overrides in args.also})
        profile(steps["eager"] if "eager" in steps else next(iter(steps.values())), args.profile_steps, args.top)
        first_calls = {}
        for variant, step in steps.items():  # warm-up: first-call costs (compilation too) stay out of the timing
            started = time.perf_counter()
            step(), step()
            first_calls[variant] = time.perf_counter() - started
        best = {variant: 0.0 for variant in steps}
        for _ in range(args.rounds):
            for variant, step in steps.items():
                best[variant] = max(best[variant], steps_per_s(step, args.steps))
        reference = best.get("eager")
        print(f"{'variant':14s} {'steps/s':>8s} {'vs eager':>9s} {'first 2 steps':>14s}")
        for variant, rate in best.items():
            ratio = f"{rate / reference:8.2f}x" if reference else f"{'-':>9s}"
            print(f"{variant:14s} {rate:8.2f} {ratio} {first_calls[variant]:13.1f}s")


if __name__ == "__main__":
    main()
