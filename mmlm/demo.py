"""``mmlm demo``: the whole framework on the embedded shapes data, in one run folder.

Generates the data, trains the shapes captioner and the shapes text-to-image model through the shared
harness, evaluates both once (captions, zero-shot classification, prompt fidelity, FID/KID, caption round
trip) and writes report.md / report.html with pictures, metrics.json and the saved models.

Quality is set in optimizer steps (each recipe's ``train.max_steps``, sized to reach the bars in
:mod:`mmlm.eval.bars`), so every machine trains the same models and only the duration differs: the demo
times the first steps of each stage and prints an ETA (:mod:`mmlm.demo_plan`). ``max_minutes`` caps the
whole run; then the bars may not be reached, and the terminal and the report say so. ``vqa`` adds a
third stage, the captioner fine-tuned to answer questions (:mod:`mmlm.demo_vqa`).
"""

from __future__ import annotations

import time
from pathlib import Path

from tqdm.auto import tqdm

from mmlm.config import ConfigError, load_config
from mmlm.demo_plan import (
    SpeedMeter, Stage, StageWatch, cap_shares, format_duration, matmul_gflops, remaining_cap, run_eta,
)
from mmlm.demo_report import QUICK_NOTE, cap_note, write_report

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
ZERO_SHOT_TEMPLATES = ["a small {}", "a large {}"]  # captions start "a <size> ..."
ZERO_SHOT_IMAGES = 500  # +-2 points (95%) at 90% accuracy: 1.96 * sqrt(.9 * .1 / 500) = 2.6, 1.9 at 95%

# --quick: the same path at a fraction of the steps, each stage also capped in minutes (said so in the report).
QUICK_CAPTIONER = ["train.max_steps=250", "train.max_minutes=0.5", "train.warmup_steps=10",
                   "data.shapes.n_test=64", "data.shapes.n_compositional=64", "data.shapes.n_val=32",
                   "eval.max_samples=64"]
QUICK_GENERATOR = ["train.max_steps=150", "train.max_minutes=0.4", "train.warmup_steps=10",
                   "model.vae.train_steps=60", "eval.max_samples=24", "eval.judge_steps=150",
                   "data.shapes.n_test=32", "data.shapes.n_val=16"]

def on_captioner(captioner_dir: Path) -> list[str]:
    """The generator reads its prompts with the demo captioner's LM, frozen (trained first, so its embeddings
    already tell the caption words apart), instead of training a text encoder of its own.

    It reads the LM's input embeddings (hidden layer 0), not its last layer: the captioner's last layer is tuned to
    predict the next caption word from image tokens, and a generator on it stayed near chance on the kind of shape
    (fidelity 35% at 2,000 steps against 86% on the embeddings; benchmarks/results/shapes_diffusion.md)."""
    return ["model.text_encoder.kind=lm", f"model.text_encoder.name_or_path={captioner_dir}",
            "model.text_encoder.hidden_layer=0"]


def recipe(name: str) -> Path:
    path = CONFIG_DIR / name
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path} (mmlm demo reads the recipes in the repository's configs/; "
                          "run it from a clone installed with `pip install -e .`)")
    return path


def _section(title: str) -> None:
    print(f"\n== {title}", flush=True)


def planned_steps(cfg, name: str) -> int:
    if cfg.train.max_steps is None:
        raise ConfigError(f"the demo's {name} recipe needs train.max_steps: the demo's quality is set in steps")
    return int(cfg.train.max_steps)


class Progress:
    """Prints the measured speed and the ETAs of the stage and of the whole run (from the stage's log)."""

    def __init__(self, stages: list[Stage], started: float, caps: dict[str, float] | None = None,
                 max_minutes: float | None = None):
        self.stages, self.started, self.max_minutes = stages, started, max_minutes
        self.caps = caps if caps is not None else {}  # shared with run_demo, which fills it stage by stage

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def message(self, name: str, meter: SpeedMeter, step: int) -> str:
        stage = self.stage(name)
        stage.steps_per_s = meter.steps_per_s
        left = (stage.steps - step) / stage.steps_per_s
        cap = self.caps.get(name)
        if cap is not None and meter.last is not None:
            left = min(left, max(0.0, cap * 60 - meter.last[1]))
        elapsed = time.perf_counter() - self.started
        total = run_eta(self.stages, name, left, elapsed)
        if total is not None and self.max_minutes is not None:
            total = min(total, max(0.0, self.max_minutes * 60 - elapsed))
        first, last = meter.span
        text = (f"{name}: {stage.steps_per_s:.2f} steps/s (timed over steps {first}-{last}); "
                f"about {format_duration(left)} of training left in this stage")
        if total is not None:
            text += f", about {format_duration(total)} left for the whole demo"
        if cap is not None and stage.steps / stage.steps_per_s > cap * 60:
            reach = int(cap * 60 * stage.steps_per_s)
            text += (f"; the cap ({cap:.1f} training min) allows about {reach:,} of {stage.steps:,} steps: "
                     "the bars may not be reached")
        return text

    def watch(self, name: str, run_dir: Path) -> StageWatch:
        return StageWatch(run_dir / "metrics.jsonl", self.stage(name).steps,
                          lambda meter, step: tqdm.write("ETA " + self.message(name, meter, step)))


def run_demo(out_dir: str | Path = "runs/demo", quick: bool = False, max_minutes: float | None = None,
             vqa: bool = False) -> dict:
    """Train, evaluate and report; returns the metrics written to ``out_dir/metrics.json``.

    ``max_minutes`` caps the whole run (then the bars may not be reached); ``vqa`` adds the question-answering
    stage."""
    from mmlm.api import load, train
    from mmlm.demo_vqa import vqa_overrides
    from mmlm.eval import write_metrics

    out = Path(out_dir)
    if (out / "captioner" / "checkpoints").exists() or (out / "generator" / "checkpoints").exists():
        raise ValueError(f"{out} already holds a demo run; pick another --out or delete it")
    if max_minutes is not None and max_minutes <= 0:
        raise ValueError(f"--max-minutes: expected > 0, got {max_minutes}")
    cap_cfg = load_config(recipe("shapes_captioner.yaml"), QUICK_CAPTIONER if quick else [])
    captioner_dir = out / "captioner" / "model"
    gen_cfg = load_config(recipe("shapes_diffusion.yaml"),
                          on_captioner(captioner_dir) + (QUICK_GENERATOR if quick else []))
    vqa_cfg = load_config(recipe("shapes_vqa.yaml"), vqa_overrides(captioner_dir, quick)) if vqa else None
    stages = [Stage("captioner", planned_steps(cap_cfg, "captioner")),
              Stage("generator", planned_steps(gen_cfg, "generator"))]
    if vqa_cfg is not None:
        stages.append(Stage("vqa", planned_steps(vqa_cfg, "vqa")))
    sections = iter(f"{k}/{len(stages) + 2}" for k in range(1, len(stages) + 3))
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    print("Plan: " + ", ".join(f"{s.name} {s.steps:,} steps" for s in stages)
          + ". Quality is set in steps; the time depends on this machine (ETAs follow once the first steps "
            "are timed).")
    machine = machine_speed(cap_cfg.train.num_threads)
    print(f"This machine: CPU fp32 matmul {machine['matmul_gflops']:.0f} GFLOP/s with {machine['threads']} threads "
          "(steps/s scale with it: place your run beside the README's figures).")
    if quick:
        print(QUICK_NOTE)
    caps: dict[str, float] = {}
    if max_minutes is not None:
        caps["captioner"] = cap_shares(stages, max_minutes)["captioner"]
        print(cap_note(max_minutes))
    progress = Progress(stages, started, caps, max_minutes)

    _section(f"{next(sections)} data: the procedural shapes dataset")
    data_summary = write_data_sample(out / "data_sample")

    def run_stage(index: int, cfg, title: str) -> dict:
        stage = stages[index]
        _section(f"{next(sections)} {stage.name}: {title}")
        cfg.output_dir = str(out / stage.name)
        if max_minutes is not None and index > 0:
            caps[stage.name] = remaining_cap(max_minutes, time.perf_counter() - started, stages[index:])
        _apply_cap(cfg, caps.get(stage.name))
        if cfg.train.max_minutes is not None:  # the ETA honours a cap from --max-minutes or the recipe
            caps[stage.name] = cfg.train.max_minutes
        t0 = time.perf_counter()
        with progress.watch(stage.name, out / stage.name):
            result = train(cfg)
        timings[f"{stage.name}_s"] = time.perf_counter() - t0
        _record_speed(stage, result)
        return result

    cap_result = run_stage(0, cap_cfg, "timm encoder -> projector -> causal LM, trained from scratch")
    gen_cfg.eval.captioner = str(captioner_dir)  # caption round trip of generated images
    gen_result = run_stage(1, gen_cfg, "text-conditioned diffusion (UNet on 2x2 pixel patches) on the captioner's LM")
    vqa_result = None if vqa_cfg is None else run_stage(
        2, vqa_cfg, "the captioner fine-tuned to answer questions about the images (configs/shapes_vqa.yaml)")

    _section(f"{next(sections)} evaluation and report")
    t0 = time.perf_counter()
    captioner, generator = load(out / "captioner"), load(out / "generator")
    zero_shot = zero_shot_classification(captioner, cap_cfg, n=64 if quick else ZERO_SHOT_IMAGES)
    timings["zero_shot_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - started
    metrics = {
        "quick": quick,
        "max_minutes": max_minutes,
        "captioner": _split_metrics(cap_result),
        "zero_shot_classification": zero_shot["metrics"],
        "generator": _split_metrics(gen_result),
        "plan": {s.name: {"planned_steps": s.steps, "steps_per_s": s.steps_per_s} for s in stages},
        "data": data_summary,
        "machine": machine,
        "timings": timings,
    }
    if vqa_result is not None:
        metrics["vqa"] = _split_metrics(vqa_result)
    metrics["bars"] = bar_summary(metrics)
    write_metrics(metrics, out / "metrics.json")
    vqa_model = None if vqa_cfg is None else (load(out / "vqa"), vqa_cfg)
    report = write_report(out, metrics, captioner, generator, zero_shot, quick, vqa_model)
    metrics["timings"]["report_s"] = time.perf_counter() - started - timings["total_s"]
    write_metrics(metrics, out / "metrics.json")
    print_outcome(metrics)
    print_next_steps(out, report)
    return metrics


def machine_speed(threads: int | None) -> dict:
    """fp32 matmul GFLOP/s with the threads the recipes train with."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        return {"matmul_gflops": round(matmul_gflops(), 1), "threads": torch.get_num_threads()}
    finally:
        torch.set_num_threads(before)


def _apply_cap(cfg, cap_minutes: float | None) -> None:
    """The stage's share of ``--max-minutes`` as its training-time cap (a tighter cap in the recipe wins)."""
    if cap_minutes is None:
        return
    current = cfg.train.max_minutes
    cfg.train.max_minutes = cap_minutes if current is None else min(current, cap_minutes)


def _record_speed(stage: Stage, result: dict) -> None:
    """The stage's speed over the whole run (training time only), replacing the early estimate."""
    if result.get("elapsed_s"):
        stage.steps_per_s = result["step"] / result["elapsed_s"]


def bar_summary(metrics: dict) -> dict:
    """Every bar with its figure and whether it was met, per stage; ``all_met`` over all of them."""
    from mmlm.eval.bars import bar_results

    rows, all_met = {}, True
    for stage in ("captioner", "zero_shot_classification", "generator", "vqa"):
        if stage not in metrics:  # the VQA stage runs with --vqa only
            continue
        for bar, value, ok in bar_results(stage, metrics[stage]):
            rows[f"{stage}/{bar.key}"] = {"label": bar.label, "value": value, "bar": bar.threshold, "met": ok}
            all_met &= ok
    return {"all_met": all_met, "bars": rows}


def print_outcome(metrics: dict) -> None:
    """The bars, one line each, in the terminal."""
    from mmlm.eval.bars import percent

    print()
    for row in metrics["bars"]["bars"].values():
        value = "not measured" if row["value"] is None else percent(row["value"])
        print(f"  {'met    ' if row['met'] else 'NOT met'}  {row['label']} {value} (bar {percent(row['bar'], 0)})")
    if metrics["bars"]["all_met"]:
        print("Every quality bar was met.")
    elif metrics["quick"]:
        print(QUICK_NOTE)
    elif metrics["max_minutes"] is not None:
        print(cap_note(metrics["max_minutes"]))


def _split_metrics(result: dict) -> dict:
    keep = ("step", "samples_seen", "elapsed_s", "train/loss")
    return {k: v for k, v in result.items() if k in keep or k.startswith(("test/", "compositional/", "val/"))}


def write_data_sample(folder: Path, n: int = 16) -> dict:
    """A few shapes samples on disk (PNGs + manifest.jsonl, the bring-your-own-data format) and a summary."""
    from mmlm.config import ShapesConfig
    from mmlm.data.shapes import generate_shapes, write_dataset

    records = generate_shapes(n, split="test", config=ShapesConfig())
    manifest = write_dataset(records, folder)
    print(f"wrote {n} samples to {manifest}; e.g. '{records[0].captions[0]}'")
    return {"sample_manifest": str(manifest), "sample_size": n}


def zero_shot_classification(captioner, cfg, n: int) -> dict:
    """The captioner, never trained to classify, scores "<colour> <kind>" labels of the main shape (each worded as
    its captions word a shape: "circle in green" after kind_colour training)."""
    from mmlm.data.shapes import generate_shapes
    from mmlm.data.shapes_captions import colour_kind_words
    from mmlm.eval import classification_report
    from mmlm.tasks.classification import shapes_label_space

    labels = shapes_label_space("colour+kind")
    records = generate_shapes(n, split="test", config=cfg.data.shapes)
    images = [r.image for r in records]
    # A caption goes on after "<colour> <kind>" (position, more shapes): no EOS after the label; the size
    # templates are alternatives, so their probabilities are summed rather than their scores averaged.
    texts = [colour_kind_words(*label.split(), cfg.data.shapes.word_order) for label in labels]
    probs = captioner.classify(images, texts, prompt=ZERO_SHOT_TEMPLATES, batch_size=32, eos=False,
                               ensemble="marginal")
    truth = [f"{r.attributes['colour']} {r.attributes['kind']}" for r in records]
    predicted = [labels[i] for i in probs.argmax(-1).tolist()]
    report = classification_report(truth, predicted, labels)
    kind_acc = sum(t.split()[1] == p.split()[1] for t, p in zip(truth, predicted)) / n
    colour_acc = sum(t.split()[0] == p.split()[0] for t, p in zip(truth, predicted)) / n
    metrics = {"accuracy": report["accuracy"], "kind_accuracy": kind_acc, "colour_accuracy": colour_acc,
               "macro_f1": report["macro_f1"], "num_images": n, "templates": ZERO_SHOT_TEMPLATES}
    print(f"zero-shot colour+kind accuracy {report['accuracy']:.3f} on {n} test images")
    return {"metrics": metrics, "records": records, "probs": probs, "labels": labels}


def print_next_steps(out: Path, report: Path) -> None:
    print(f"\nReport: {report} (and {report.with_suffix('.html')})\nTry the trained models:")
    print(f"  mmlm caption {out}/captioner {out}/data_sample")
    print(f"  mmlm classify {out}/captioner {out}/data_sample --labels 'circle in red,square in blue,star in green' "
          "--prompt 'a small {}' --prompt 'a large {}' --open-ended --ensemble marginal")
    print(f"  mmlm generate {out}/generator \"a large blue star at the top\" --n 8 --grid --out stars.png")
    if (out / "vqa" / "model").is_dir():
        print(f"  mmlm ask {out}/vqa {out}/data_sample --question \"how many circles are there?\"")
