"""Time to quality: train a recipe once per wall-clock budget and print the quality each budget reaches.

Every budget is a separate run from scratch with ``train.max_minutes`` set to it: the LR schedule
is fitted to the budget (warmup, then cosine decay over the elapsed time), so a 5-minute run is
not the first half of a 10-minute one. Evaluation runs only after training (``train.eval_every``
is switched off) and is not counted in the budget. Captioning reports exact attribute match
(shapes) or CIDEr; classification reports accuracy; on the test and, for shapes, the
compositional split (colour-kind pairs never seen in training).

Run it alone on the machine: the budget is wall-clock time, so anything else running shrinks the
number of steps each budget buys.

    python benchmarks/time_to_quality.py configs/shapes_captioner.yaml --budgets 1 2.5 5 10
    python benchmarks/time_to_quality.py configs/shapes_classifier.yaml --budgets 1 2.5 5
    python benchmarks/time_to_quality.py configs/shapes_diffusion.yaml --budgets 2.5 5 10   # prompt fidelity
    python benchmarks/time_to_quality.py configs/digits_classifier.yaml --budgets 1 2 --override train.num_threads=2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from mmlm.api import train
from mmlm.config import load_config

QUALITY_KEYS = ("exact_match", "accuracy", "fidelity", "cider")  # the first one the task reports is the table's metric
SPLITS = ("test", "compositional")


def quality_metric(result: dict) -> str:
    for key in QUALITY_KEYS:
        if f"test/{key}" in result or f"val/{key}" in result:
            return key
    raise ValueError(f"none of {QUALITY_KEYS} in the run's metrics {sorted(k for k in result if '/' in k)}")


def run_budget(config: str, minutes: float, overrides: list[str], out_root: Path) -> dict:
    """One training run of ``minutes`` wall-clock minutes; its final metrics and step count."""
    if minutes <= 0:
        raise ValueError(f"--budgets: expected minutes > 0, got {minutes}")
    out_dir = out_root / f"{minutes:g}min"
    budget = [f"train.max_minutes={minutes}", "train.max_steps=null", "train.epochs=null",
              "train.eval_every=null", "train.save_every=null", f"output_dir={out_dir}"]
    cfg = load_config(config, budget + overrides)  # user overrides last: they win
    splits = [s for s in SPLITS if s in cfg.eval.splits] or list(cfg.eval.splits)
    started = time.perf_counter()
    result = train(cfg)
    metric = quality_metric(result)
    return {
        "minutes": minutes, "steps": result["step"], "train_seconds": result["elapsed_s"],
        "steps_per_s": result["step"] / max(result["elapsed_s"], 1e-9), "wall_seconds": time.perf_counter() - started,
        "metric": metric, "scores": {s: result.get(f"{s}/{metric}") for s in splits}, "output_dir": str(out_dir),
    }


def print_table(config: str, rows: list[dict]) -> None:
    metric = rows[0]["metric"]
    splits = list(rows[0]["scores"])
    print(f"\n{config}: {metric} after training for each budget (separate runs)")
    print(f"{'minutes':>7s} {'steps':>6s} {'steps/s':>7s} " + " ".join(f"{s:>13s}" for s in splits))
    for row in rows:
        cells = " ".join(f"{row['scores'][s]:13.3f}" if row["scores"][s] is not None else f"{'-':>13s}"
                         for s in splits)
        print(f"{row['minutes']:7g} {row['steps']:6d} {row['steps_per_s']:7.2f} {cells}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="recipe YAML, e.g. configs/shapes_captioner.yaml")
    p.add_argument("--budgets", type=float, nargs="+", default=[1, 2.5, 5, 10], help="training minutes, one run each")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override applied to every run (repeatable)")
    p.add_argument("--out", default=None, help="run folders go here (default: a temp folder)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args()

    load_config(args.config, args.override)  # fail on a bad recipe or override before the first run
    out_root = Path(args.out or tempfile.mkdtemp(prefix="time_to_quality_"))
    rows = []
    for minutes in args.budgets:
        print(f"== {minutes:g} minutes", flush=True)
        rows.append(run_budget(args.config, minutes, args.override, out_root))
        print_table(args.config, rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2), encoding="utf-8")
    print(f"\nrun folders: {out_root}")


if __name__ == "__main__":
    main()
