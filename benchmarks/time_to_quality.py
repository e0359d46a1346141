"""Steps (and time) to quality: train a recipe once per budget and print the quality each budget reaches.

``--steps`` budgets (the default way: machine-independent) set ``train.max_steps``; ``--budgets`` set
wall-clock minutes (``train.max_minutes``). Every budget is a separate run from scratch whose LR schedule is
fitted to it (warmup, then decay over the steps or the elapsed time), so a 500-step run is not the first half
of a 1,000-step one. Evaluation runs only after training (``train.eval_every`` is off unless ``--every``
asks for a val curve inside each run) and is not counted in the budget. Captioning reports exact attribute
match (shapes) or CIDEr; classification accuracy; diffusion prompt fidelity; on the test and, for shapes, the
compositional split (colour-kind pairs never seen in training).

The table gives steps, samples seen and the measured steps/s of each run, and then the steps and samples
to each quality bar (mmlm.eval.bars, the demo's bars): the smallest budget that met it. Steps are the
figure that compares across machines; steps/s turns them into this machine's minutes. Timings need the
machine to itself (anything else running lowers steps/s, never the quality at a step count).

    python benchmarks/time_to_quality.py configs/shapes_captioner.yaml --steps 250 500 750 1000
    python benchmarks/time_to_quality.py configs/shapes_diffusion.yaml --steps 1000 2000 5000 --every 500
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
from mmlm.eval.bars import BARS, Bar, steps_to_bar
from mmlm.eval.plots import read_metrics_jsonl

QUALITY_KEYS = ("exact_match", "accuracy", "fidelity", "cider")  # the first one the task reports is the table's metric
SPLITS = ("test", "compositional")
TASK_BARS = {"captioning": BARS["captioner"], "diffusion": BARS["generator"], "vqa": BARS["vqa"]}


def quality_metric(result: dict) -> str:
    for key in QUALITY_KEYS:
        if f"test/{key}" in result or f"val/{key}" in result:
            return key
    raise ValueError(f"none of {QUALITY_KEYS} in the run's metrics {sorted(k for k in result if '/' in k)}")


def run_budget(config: str, budget: float, overrides: list[str], out_root: Path, unit: str = "minutes",
               every: int | None = None) -> dict:
    """One training run of ``budget`` minutes (or steps, ``unit="steps"``); its final metrics and speed."""
    if unit not in ("steps", "minutes"):
        raise ValueError(f"unit: expected 'steps' or 'minutes', got {unit!r}")
    if budget <= 0:
        raise ValueError(f"--{'steps' if unit == 'steps' else 'budgets'}: expected {unit} > 0, got {budget}")
    out_dir = out_root / (f"{int(budget)}steps" if unit == "steps" else f"{budget:g}min")
    limit = ([f"train.max_steps={int(budget)}", "train.max_minutes=null"] if unit == "steps"
             else [f"train.max_minutes={budget}", "train.max_steps=null"])
    fixed = limit + ["train.epochs=null", f"train.eval_every={every or 'null'}", "train.save_every=null",
                     f"output_dir={out_dir}"]
    cfg = load_config(config, fixed + overrides)  # user overrides last: they win
    splits = [s for s in SPLITS if s in cfg.eval.splits] or list(cfg.eval.splits)
    started = time.perf_counter()
    result = train(cfg)
    metric = quality_metric(result)
    val_curve = [(row["step"], row[f"val/{metric}"]) for row in read_metrics_jsonl(out_dir / "metrics.jsonl")
                 if f"val/{metric}" in row]
    return {
        "budget": budget, "unit": unit, "task": cfg.task, "steps": result["step"],
        "samples": result.get("samples_seen", result["step"] * cfg.data.batch_size),
        "batch_size": cfg.data.batch_size * cfg.train.grad_accum_steps, "train_seconds": result["elapsed_s"],
        "steps_per_s": result["step"] / max(result["elapsed_s"], 1e-9), "wall_seconds": time.perf_counter() - started,
        "metric": metric, "scores": {s: result.get(f"{s}/{metric}") for s in splits}, "val_curve": val_curve,
        "output_dir": str(out_dir),
    }


def bars_reached(rows: list[dict]) -> list[dict]:
    """Per bar of the task: the fewest steps (and samples) among the runs whose final figure met it."""
    if not rows:
        return []
    out = []
    for bar in TASK_BARS.get(rows[0]["task"], ()):
        split, metric = bar.key.split("/", 1)
        if metric != rows[0]["metric"]:
            continue
        curve = [(r["steps"], r["scores"].get(split)) for r in rows if r["scores"].get(split) is not None]
        step = steps_to_bar(curve, bar.threshold)
        samples = next((r["samples"] for r in rows if r["steps"] == step), None)
        out.append({"bar": bar.describe(None).replace(" not measured", ""), "key": bar.key,
                    "threshold": bar.threshold, "steps": step, "samples": samples,
                    "val_steps": _val_steps(rows, bar)})
    return out


def _val_steps(rows: list[dict], bar: Bar) -> int | None:
    """The first val evaluation inside any run (``--every``) that met the bar's threshold."""
    hits = [steps_to_bar(r["val_curve"], bar.threshold) for r in rows if r["val_curve"]]
    hits = [h for h in hits if h is not None]
    return min(hits) if hits else None


def print_table(config: str, rows: list[dict]) -> None:
    metric = rows[0]["metric"]
    splits = list(rows[0]["scores"])
    unit = rows[0]["unit"]
    print(f"\n{config}: {metric} after training for each budget (separate runs)")
    print(f"{'budget':>9s} {'steps':>6s} {'samples':>8s} {'steps/s':>7s} " + " ".join(f"{s:>13s}" for s in splits))
    for row in rows:
        cells = " ".join(f"{100 * row['scores'][s]:12.1f}%" if row["scores"][s] is not None else f"{'-':>13s}"
                         for s in splits)
        budget = f"{int(row['budget'])}" if unit == "steps" else f"{row['budget']:g} min"
        print(f"{budget:>9s} {row['steps']:6d} {row['samples']:8d} {row['steps_per_s']:7.2f} {cells}")
        if row["val_curve"]:
            print(f"{'':>9s} val curve: " + ", ".join(f"{s}: {100 * v:.1f}%" for s, v in row["val_curve"]))
    for reached in bars_reached(rows):
        where = (f"{reached['steps']:,} steps ({reached['samples']:,} samples)" if reached["steps"] is not None
                 else "not reached by any budget")
        print(f"steps to bar: {reached['bar']}: {where}"
              + (f"; val first met at step {reached['val_steps']:,}" if reached["val_steps"] is not None else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="recipe YAML, e.g. configs/shapes_captioner.yaml")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--steps", type=int, nargs="+", default=None, help="optimizer steps, one run each (default)")
    which.add_argument("--budgets", type=float, nargs="+", default=None, help="training minutes, one run each")
    p.add_argument("--every", type=int, default=None, help="also evaluate val every N steps inside each run")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override applied to every run (repeatable)")
    p.add_argument("--out", default=None, help="run folders go here (default: a temp folder)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args()

    unit, budgets = ("minutes", args.budgets) if args.budgets else ("steps", args.steps or [500, 1000, 2000])
    load_config(args.config, args.override)  # fail on a bad recipe or override before the first run
    out_root = Path(args.out or tempfile.mkdtemp(prefix="time_to_quality_"))
    rows = []
    for budget in budgets:
        print(f"== {budget:g} {unit}", flush=True)
        rows.append(run_budget(args.config, budget, args.override, out_root, unit, args.every))
        print_table(args.config, rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": rows, "bars": bars_reached(rows)}, indent=2), encoding="utf-8")
    print(f"\nrun folders: {out_root}")


if __name__ == "__main__":
    main()
