"""The demo's report: the outcome in three lines, then each model's figures beside their bars and its pictures."""

from __future__ import annotations

from pathlib import Path

DEMO_PROMPTS = ["a large red circle in the center", "a small blue square on the left",
                "a large green triangle at the top", "a small yellow star on the right",
                "a large purple square at the bottom", "a small orange circle in the center"]
EXPLAINED_IMAGES = 3  # test images whose explanation overlays the report shows
QUICK_NOTE = ("Quick run (--quick): a few hundred steps per model, so the quality is far below the full demo's "
              "and the bars are not expected to be met. Run `mmlm demo` without --quick for the real figures.")


def cap_note(max_minutes: float) -> str:
    return (f"Capped by --max-minutes {max_minutes:g}: each stage stops at its share of the cap even if its "
            "planned steps are not done, so the quality bars may not be reached.")


def summary_lines(metrics: dict) -> list[str]:
    """The report's first section: what was trained, how long it took, whether every bar was met."""
    cap, gen, t = metrics["captioner"], metrics["generator"], metrics["timings"]
    plan = metrics["plan"]

    def trained(name: str, result: dict) -> str:
        steps, planned = int(result.get("step", 0)), plan[name]["planned_steps"]
        of = "" if steps >= planned else f" of the {planned:,} planned"
        return f"a {name} for {steps:,} steps{of} ({int(result.get('samples_seen', 0)):,} samples)"

    def speed(name: str) -> str:
        rate = plan[name]["steps_per_s"]
        return "" if rate is None else f" at {rate:.2f} steps/s"

    rows = metrics["bars"]["bars"].values()
    met = sum(r["met"] for r in rows)
    if metrics["bars"]["all_met"]:
        verdict = f"every quality bar met ({met} of {len(rows)})."
    else:
        misses = [f"{r['label']} " + ("not measured" if r["value"] is None else f"{100 * r['value']:.1f}%")
                  + f" (bar {100 * r['bar']:.0f}%)" for r in rows if not r["met"]]
        verdict = f"{met} of {len(rows)} quality bars met; missed: " + "; ".join(misses) + "."
    also = ""
    if "vqa" in metrics:
        also = f", then fine-tuned the captioner to answer questions: {trained('vqa', metrics['vqa'])}"
    vqa_time = f", VQA {t['vqa_s'] / 60:.1f} min{speed('vqa')}" if "vqa_s" in t else ""
    lines = [
        f"**Trained** from scratch on the shapes data: {trained('captioner', cap)} and {trained('generator', gen)} "
        f"(reading its prompts with the captioner's LM){also}.",
        f"**Took** {t['total_s'] / 60:.1f} min in all: captioner {t['captioner_s'] / 60:.1f} min{speed('captioner')}, "
        f"generator {t['generator_s'] / 60:.1f} min{speed('generator')}{vqa_time} (each with its evaluation), zero-shot "
        f"classification {t['zero_shot_s'] / 60:.1f} min, on a machine with CPU fp32 matmul "
        f"{metrics['machine']['matmul_gflops']:.0f} GFLOP/s ({metrics['machine']['threads']} threads).",
        f"**Result**: {verdict}",
    ]
    if metrics["quick"]:
        lines.append(QUICK_NOTE)
    if metrics["max_minutes"] is not None:
        lines.append(cap_note(metrics["max_minutes"]))
    return lines


def write_report(out: Path, metrics: dict, captioner, generator, zero_shot: dict, quick: bool,
                 vqa_model: tuple | None = None) -> Path:
    """report.md + report.html: the outcome first, then each model's figures beside their bars, captioned test
    images (full captions), zero-shot probabilities, generated grids and (``vqa_model``: (model, config)) the
    questions answered on test images."""
    from mmlm.eval import ReportWriter
    from mmlm.eval.bars import BARS

    report = ReportWriter(out, "mmlm demo: shapes captioner, zero-shot classifier and generator")
    report.section("Outcome")
    for line in summary_lines(metrics):  # one paragraph each: Markdown would join plain lines
        report.text(line)

    report.section("Captioner")
    report.results(metrics["captioner"], BARS["captioner"])
    records = zero_shot["records"][:12]
    captions = captioner.caption([r.image for r in records])
    labels, probs = zero_shot["labels"], zero_shot["probs"][:12]
    texts = []
    for caption, row in zip(captions, probs):
        top = row.topk(2)
        shown = ", ".join(f"{labels[i]} {100 * p:.0f}%" for p, i in zip(top.values.tolist(), top.indices.tolist()))
        texts.append(f"[{shown}] {caption}")
    report.image_grid([r.image for r in records], texts, name="test_captions", ncols=6, cell_size=160,
                      full_captions=True,
                      caption="Test images: [top zero-shot labels with probabilities] and the predicted caption")
    report.loss_curve(out / "captioner" / "metrics.jsonl", name="captioner_loss", caption="Captioner loss")
    explanation_overlays(report, captioner, [r.image for r in records[:EXPLAINED_IMAGES]])

    report.section("Zero-shot classification by prompt")
    templates = metrics["zero_shot_classification"]["templates"]
    report.text(f"The captioner scores the {len(labels)} labels '<colour> <kind>' of the main shape in the "
                f"templates {templates} (open-ended: no end of text after the label; the size templates "
                f"are alternatives: probabilities summed over them, then normalised over the labels).")
    report.results(metrics["zero_shot_classification"], BARS["zero_shot_classification"])

    report.section("Generator")
    report.results(metrics["generator"], BARS["generator"])
    for prompt in DEMO_PROMPTS[: 3 if quick else len(DEMO_PROMPTS)]:
        images = generator.generate([prompt], num_images_per_prompt=8, seed=0)
        report.image_grid(images, None, name=f"generated_{prompt.replace(' ', '_')}", caption=f"'{prompt}'")
    report.loss_curve(out / "generator" / "metrics.jsonl", name="generator_loss", caption="Generator loss")
    if vqa_model is not None:
        from mmlm.demo_vqa import report_section

        report_section(report, *vqa_model, metrics["vqa"])
    return report.write()["markdown"]


def explanation_overlays(report, captioner, images) -> None:
    """Where the captioner looks: one strip per image, a saliency map per content word of its caption."""
    from mmlm.models.explain import overlay

    report.section("Where the captioner looks")
    report.text("The pixels' gradient (saliency) of each content word of the predicted caption (red: most "
                "relevant). `mmlm explain` writes these for any image (also attention rollout and gradient x "
                "attention); `benchmarks/pointing.py` measures how often a word's peak falls inside the shape it "
                "names.")
    for k, (image, item) in enumerate(zip(images, captioner.explain(images))):
        report.image(overlay(image, item, "saliency", panel=128), caption=item.caption, name=f"explained_{k}")
