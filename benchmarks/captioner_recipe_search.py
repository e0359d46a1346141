"""Recipe search for the VLM recipes: quality vs training steps (and seconds), through the real harness.

Each variant is the base recipe plus dotted overrides, trained with ``mmlm.api.train`` for a fixed
number of steps (so the LR schedule is the same length for every variant) and evaluated on the
``val`` split every ``--eval-every`` steps. The table shows, per variant, the measured steps/s
(training only: evaluation pauses are excluded), the val metric at each evaluation, the first
step where it reaches each ``--targets`` value, and the final test / compositional metrics.

Timings depend on what else runs on the machine: on a shared machine compare variants by
*steps*, and measure steps/s alone (``--probe``) to turn steps into minutes.

    python benchmarks/captioner_recipe_search.py                                   # the built-in variants
    python benchmarks/captioner_recipe_search.py --variants base lm128x2 --steps 600
    python benchmarks/captioner_recipe_search.py --variant wide="model.language.config.hidden_size=384"
    python benchmarks/captioner_recipe_search.py --probe --variants base lm128x2   # steps/s only
    python benchmarks/captioner_recipe_search.py --quick                           # smoke run, ~1 minute
"""

from __future__ import annotations

import argparse
import json
import shlex
import tempfile
import time
from pathlib import Path

from mmlm.api import train
from mmlm.config import load_config


def llama(width: int, layers: int) -> list[str]:
    """Overrides for a Llama of ``width`` x ``layers`` (64-wide heads, 4x MLP)."""
    heads = max(1, width // 64)
    key = "model.language.config"
    return [f"{key}.hidden_size={width}", f"{key}.intermediate_size={4 * width}", f"{key}.num_hidden_layers={layers}",
            f"{key}.num_attention_heads={heads}", f"{key}.num_key_value_heads={heads}"]


# Named variants of the base recipe (overrides relative to the YAML given with --config).
VARIANTS: dict[str, list[str]] = {
    "base": [],
    "lm128x2": llama(128, 2),
    "lm192x3": llama(192, 3),
    "lm256x4": llama(256, 4),
    "tokens64": ["model.projector.type=mlp"],  # no pixel shuffle: all 64 map tokens
    "batch16": ["data.batch_size=16"],
    "batch64": ["data.batch_size=64"],
    "lr2x": ["train.lr=2e-3", "train.module_lr={vision: 4e-3}"],
    "paraphrases": ["data.caption_choice=random"],
}
QUALITY_KEYS = ("exact_match", "accuracy", "cider")  # the first one the task reports is the table's metric


def metric_name(metrics: dict, split: str) -> str | None:
    for key in QUALITY_KEYS:
        if f"{split}/{key}" in metrics:
            return key
    return None


def training_seconds(metrics_file: Path, batch_size: int) -> list[tuple[int, float]]:
    """(step, cumulative training seconds) at every log record; evaluation pauses are not counted."""
    points, seconds, last_step = [], 0.0, 0
    for line in metrics_file.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if "samples_per_s" not in record:
            continue
        steps = record["step"] - last_step
        seconds += steps * batch_size / max(record["samples_per_s"], 1e-9)
        points.append((record["step"], seconds))
        last_step = record["step"]
    return points


def val_curve(metrics_file: Path, key: str) -> list[tuple[int, float]]:
    """(step, val metric) at every evaluation."""
    out = []
    for line in metrics_file.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if f"val/{key}" in record:
            out.append((record["step"], record[f"val/{key}"]))
    return out


def first_step_at(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, value in curve if value >= target), None)


def run_variant(config: str, name: str, overrides: list[str], search: list[str], out_root: Path) -> dict:
    out_dir = out_root / f"{name}_{time.strftime('%H%M%S')}"
    all_overrides = overrides + search + [f"output_dir={out_dir}"]
    cfg = load_config(config, all_overrides)
    started = time.perf_counter()
    result = train(cfg)
    metrics_file = Path(result["metrics_file"])
    key = metric_name(result, "val") or metric_name(result, "test")
    seconds = training_seconds(metrics_file, cfg.data.batch_size * cfg.train.grad_accum_steps)
    train_s = seconds[-1][1] if seconds else float("nan")
    return {
        "name": name, "overrides": overrides, "output_dir": str(out_dir), "metric": key,
        "steps": result["step"], "train_seconds": train_s, "steps_per_s": result["step"] / train_s,
        "wall_seconds": time.perf_counter() - started,
        "curve": val_curve(metrics_file, key) if key else [],
        "final": {k: v for k, v in result.items() if isinstance(v, float) and k.split("/")[0] in
                  ("test", "compositional", "val") and k.split("/")[-1] in QUALITY_KEYS},
    }


def print_table(rows: list[dict], targets: list[float]) -> None:
    steps = sorted({step for row in rows for step, _ in row["curve"]})
    metric = next((row["metric"] for row in rows if row["metric"]), "metric")
    print(f"\nval {metric} by training step (steps/s measured in this run: contended unless run alone)")
    head = f"{'variant':14s} {'steps/s':>7s} " + " ".join(f"{s:>6d}" for s in steps)
    head += " " + " ".join(f"{'@' + format(t, '.0%'):>7s}" for t in targets) + f" {'test':>6s} {'comp':>6s}"
    print(head)
    for row in rows:
        curve = dict(row["curve"])
        cells = " ".join(f"{curve[s]:6.3f}" if s in curve else f"{'':6s}" for s in steps)
        reach = " ".join(f"{first_step_at(row['curve'], t) or '-':>7}" for t in targets)
        final = row["final"]
        test = final.get(f"test/{row['metric']}", float("nan"))
        comp = final.get(f"compositional/{row['metric']}", float("nan"))
        print(f"{row['name']:14s} {row['steps_per_s']:7.2f} {cells} {reach} {test:6.3f} {comp:6.3f}")
    print("@X: first evaluated step whose val metric reached X. minutes alone = steps / (steps/s measured alone) / 60")


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'NAME=key=value key=value' -> (NAME, overrides); argparse names the flag in its error."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=\"key=value key=value\"")
    name, overrides = text.split("=", 1)
    return name, shlex.split(overrides)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/shapes_captioner.yaml")
    p.add_argument("--variants", nargs="*", default=["base", "lm192x3", "lm256x4"], choices=sorted(VARIANTS),
                   help="built-in variants to run (none: only the --variant ones)")
    p.add_argument("--variant", action="append", type=parse_variant, default=[],
                   help='an extra variant: NAME="key=value key=value" (repeatable)')
    p.add_argument("--steps", type=int, default=800, help="training steps per variant (the cosine schedule's length)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-samples", type=int, default=200, help="val/test/compositional samples per evaluation")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the recipe's train.num_threads)")
    p.add_argument("--targets", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    p.add_argument("--probe", action="store_true", help="steps/s only: 60 steps, no evaluation curve")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny data, a few steps")
    p.add_argument("--out", default=None, help="run folders go here (default: a temp folder)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args()

    search = [f"train.max_steps={args.steps}", "train.max_minutes=null", f"train.eval_every={args.eval_every}",
              f"eval.max_samples={args.eval_samples}", "eval.num_examples=4", "train.save_every=null",
              f"train.log_every={min(25, args.eval_every)}"]
    if args.probe:
        search = ["train.max_steps=60", "train.max_minutes=null", "train.eval_every=null", "eval.max_samples=8",
                  "eval.num_examples=1", "train.log_every=20", "eval.splits=[]"]
    if args.quick:
        search = ["train.max_steps=6", "train.max_minutes=null", "train.eval_every=3", "eval.max_samples=8",
                  "eval.num_examples=1", "train.log_every=3", "data.batch_size=8", "train.warmup_steps=2"]
        if load_config(args.config).data.source == "shapes":
            search += ["data.shapes.n_train=64", "data.shapes.n_val=8", "data.shapes.n_test=8",
                       "data.shapes.n_compositional=8"]
    if args.threads:
        search.append(f"train.num_threads={args.threads}")
    out_root = Path(args.out or tempfile.mkdtemp(prefix="recipe_search_"))
    variants = [(name, VARIANTS[name]) for name in args.variants] + list(args.variant)
    rows = []
    for name, overrides in variants:
        print(f"== {name}: {' '.join(overrides) or '(the recipe as is)'}", flush=True)
        rows.append(run_variant(args.config, name, overrides, search, out_root))
        print_table(rows, args.targets)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2), encoding="utf-8")
    print(f"\nrun folders: {out_root}")


if __name__ == "__main__":
    main()
