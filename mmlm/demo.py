"""``mmlm demo``: the whole framework on the embedded shapes data, in one run folder.

Generates the data, trains the shapes captioner and the shapes text-to-image model through the shared
harness, evaluates both (captions, zero-shot classification, prompt fidelity, FID/KID, caption round
trip) and writes report.md / report.html with pictures, metrics.json and the saved models.
"""

from __future__ import annotations

import time
from pathlib import Path

from mmlm.config import ConfigError, load_config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
ZERO_SHOT_TEMPLATES = ["a small {}", "a large {}"]  # captions start "a <size> <colour> <kind>"
DEMO_PROMPTS = ["a large red circle in the center", "a small blue square on the left",
                "a large green triangle at the top", "a small yellow star on the right",
                "a large purple square at the bottom", "a small orange circle in the center"]

# --quick: the same path at a fraction of the budget (lower quality, said so in the report).
QUICK_CAPTIONER = ["train.max_minutes=0.5", "train.warmup_steps=10", "data.shapes.n_test=64",
                   "data.shapes.n_compositional=64", "data.shapes.n_val=32", "eval.max_samples=64"]
QUICK_GENERATOR = ["train.max_minutes=0.4", "train.warmup_steps=10", "model.vae.train_steps=60",
                   "eval.max_samples=24", "eval.judge_steps=150", "data.shapes.n_test=32", "data.shapes.n_val=16"]


def recipe(name: str) -> Path:
    path = CONFIG_DIR / name
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path} (mmlm demo reads the recipes in the repository's configs/; "
                          "run it from a clone installed with `pip install -e .`)")
    return path


def _section(title: str) -> None:
    print(f"\n== {title}", flush=True)


def run_demo(out_dir: str | Path = "runs/demo", quick: bool = False) -> dict:
    """Train, evaluate and report; returns the metrics written to ``out_dir/metrics.json``."""
    from mmlm.api import load, train
    from mmlm.eval import write_metrics

    out = Path(out_dir)
    if (out / "captioner" / "checkpoints").exists() or (out / "generator" / "checkpoints").exists():
        raise ValueError(f"{out} already holds a demo run; pick another --out or delete it")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    _section("1/4 data: the procedural shapes dataset")
    data_summary = write_data_sample(out / "data_sample")

    _section("2/4 captioner: timm encoder -> projector -> causal LM, trained from scratch")
    cap_cfg = load_config(recipe("shapes_captioner.yaml"), QUICK_CAPTIONER if quick else [])
    cap_cfg.output_dir = str(out / "captioner")
    t0 = time.perf_counter()
    cap_result = train(cap_cfg)
    timings["captioner_s"] = time.perf_counter() - t0

    _section("3/4 generator: text-conditioned diffusion (UNet on 2x2 pixel patches), trained from scratch")
    gen_cfg = load_config(recipe("shapes_diffusion.yaml"), QUICK_GENERATOR if quick else [])
    gen_cfg.output_dir = str(out / "generator")
    gen_cfg.eval.captioner = str(out / "captioner" / "model")  # caption round trip of generated images
    t0 = time.perf_counter()
    gen_result = train(gen_cfg)
    timings["generator_s"] = time.perf_counter() - t0

    _section("4/4 evaluation and report")
    captioner, generator = load(out / "captioner"), load(out / "generator")
    zero_shot = zero_shot_classification(captioner, cap_cfg, n=64 if quick else 500)
    timings["total_s"] = time.perf_counter() - started
    metrics = {
        "quick": quick,
        "captioner": _split_metrics(cap_result),
        "zero_shot_classification": zero_shot["metrics"],
        "generator": _split_metrics(gen_result),
        "data": data_summary,
        "timings": timings,
    }
    write_metrics(metrics, out / "metrics.json")
    report = write_report(out, metrics, captioner, generator, cap_cfg, zero_shot, quick)
    print_next_steps(out, report)
    return metrics


def _split_metrics(result: dict) -> dict:
    keep = ("step", "elapsed_s", "train/loss")
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
    """The captioner, never trained to classify, scores "<colour> <kind>" labels of the main shape."""
    from mmlm.data.shapes import generate_shapes
    from mmlm.eval import classification_report
    from mmlm.tasks.classification import shapes_label_space

    labels = shapes_label_space("colour+kind")
    records = generate_shapes(n, split="test", config=cfg.data.shapes)
    images = [r.image for r in records]
    # A caption goes on after "<colour> <kind>" (position, more shapes): no EOS after the label; the size
    # templates are alternatives, so their probabilities are summed rather than their scores averaged.
    probs = captioner.classify(images, labels, prompt=ZERO_SHOT_TEMPLATES, batch_size=32, eos=False,
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


def write_report(out: Path, metrics: dict, captioner, generator, cap_cfg, zero_shot: dict, quick: bool) -> Path:
    """report.md + report.html: metrics tables, captioned test images, zero-shot probabilities, generated grids."""
    from mmlm.eval import ReportWriter

    report = ReportWriter(out, "mmlm demo: shapes captioner, zero-shot classifier and generator")
    if quick:
        report.text("**Quick run** (`--quick`): trained for well under a minute per model, so quality is far below "
                    "the full demo's. Run `mmlm demo` without `--quick` for the real figures.")
    t = metrics["timings"]
    report.text(f"Total time {t['total_s'] / 60:.1f} min (captioner {t['captioner_s'] / 60:.1f} min, "
                f"generator {t['generator_s'] / 60:.1f} min, including their evaluations).")

    report.section("Captioner")
    report.metrics(metrics["captioner"])
    records = zero_shot["records"][:12]
    captions = captioner.caption([r.image for r in records])
    labels, probs = zero_shot["labels"], zero_shot["probs"][:12]
    texts = []
    for caption, row in zip(captions, probs):
        top = row.topk(2)
        shown = ", ".join(f"{labels[i]} {p:.2f}" for p, i in zip(top.values.tolist(), top.indices.tolist()))
        texts.append(f"[{shown}] {caption}")
    report.image_grid([r.image for r in records], texts, name="test_captions",
                      caption="Test images: [top zero-shot labels with probabilities] and the predicted caption")
    report.loss_curve(out / "captioner" / "metrics.jsonl", name="captioner_loss", caption="Captioner loss")

    report.section("Zero-shot classification by prompt")
    report.text(f"The captioner scores the {len(labels)} labels '<colour> <kind>' of the main shape in the "
                f"templates {ZERO_SHOT_TEMPLATES} (open-ended: no end of text after the label; the size templates "
                f"are alternatives: probabilities summed over them, then normalised over the labels).")
    report.metrics(metrics["zero_shot_classification"])

    report.section("Generator")
    report.metrics(metrics["generator"])
    for prompt in DEMO_PROMPTS[: 3 if quick else len(DEMO_PROMPTS)]:
        images = generator.generate([prompt], num_images_per_prompt=8, seed=0)
        report.image_grid(images, None, name=f"generated_{prompt.replace(' ', '_')}", caption=f"'{prompt}'")
    report.loss_curve(out / "generator" / "metrics.jsonl", name="generator_loss", caption="Generator loss")
    return report.write()["markdown"]


def print_next_steps(out: Path, report: Path) -> None:
    print(f"\nReport: {report} (and {report.with_suffix('.html')})\nTry the trained models:")
    print(f"  mmlm caption {out}/captioner {out}/data_sample")
    print(f"  mmlm classify {out}/captioner {out}/data_sample --labels 'red circle,blue square,green star' "
          "--prompt 'a small {}' --prompt 'a large {}' --open-ended --ensemble marginal")
    print(f"  mmlm generate {out}/generator \"a large blue star at the top\" --n 8 --grid --out stars.png")
