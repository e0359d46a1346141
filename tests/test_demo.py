"""`mmlm demo --quick` end to end: every promised file exists and the metrics are numbers in range."""

import json
import math

import pytest

from demo_run import quick_demo


def _numbers(tree, prefix=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _numbers(value, f"{prefix}{key}/")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield prefix.rstrip("/"), tree


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path, tmp_path_factory):
    run = quick_demo(tmp_path_factory)  # `mmlm demo --quick --out <folder>`, once per session
    out, printed = run.out, run.stdout
    for name in ("report.md", "report.html", "metrics.json", "captioner/model/model.safetensors",
                 "generator/model/config.json", "captioner/loss_curve.png", "generator/loss_curve.png",
                 "data_sample/manifest.jsonl"):
        assert (out / name).is_file(), name
    images = {p.name for p in (out / "images").glob("*.png")}
    assert "test_captions.png" in images and any(n.startswith("generated_") for n in images)
    assert {"explained_0.png", "explained_1.png", "explained_2.png"} <= images  # explanation overlays
    report = (out / "report.md").read_text()
    assert "Quick run" in report and "images/test_captions.png" in report
    assert report.index("## Outcome") < report.index("## Captioner") and "bar 95%" in report  # figures beside bars
    assert report.index("## Captioner") < report.index("## Where the captioner looks") < report.index("## Zero-shot")
    assert "Plan: captioner 250 steps, generator 150 steps" in printed and "Quick run" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    numbers = dict(_numbers(metrics))
    assert all(math.isfinite(v) for v in numbers.values())
    for key in ("captioner/test/exact_match", "captioner/test/bleu_4", "captioner/compositional/exact_match",
                "zero_shot_classification/accuracy", "generator/test/fidelity", "generator/test/kid_mean"):
        assert key in numbers, key
    for key, value in numbers.items():
        if key.endswith(("exact_match", "accuracy", "fidelity", "bleu_4", "rouge_l")):
            assert 0.0 <= value <= 1.0, (key, value)
    # How long it takes is machine-bound (a benchmark's job); what it records must add up.
    timings = metrics["timings"]
    assert {"captioner_s", "generator_s", "zero_shot_s", "total_s"} <= set(timings)
    assert 0 < timings["captioner_s"] + timings["generator_s"] + timings["zero_shot_s"] <= timings["total_s"]
    assert f"mmlm caption {out}/captioner" in printed and "mmlm generate" in printed
    run_examples(out, tmp_path)


def run_examples(out, tmp_path):
    """The pipeline examples work on the demo's models (generate -> caption -> classify; caption a folder)."""
    import subprocess
    import sys
    from pathlib import Path

    examples = Path(__file__).resolve().parent.parent / "examples"
    grid = tmp_path / "round_trip.png"
    done = subprocess.run([sys.executable, str(examples / "round_trip.py"), str(out / "generator"),
                           str(out / "captioner"), "--out", str(grid)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert grid.is_file() and done.stdout.count("caption:") == 3
    jsonl = tmp_path / "captions.jsonl"
    done = subprocess.run([sys.executable, str(examples / "caption_folder.py"), str(out / "captioner"),
                           str(out / "data_sample"), str(jsonl)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(rows) == 16 and all(isinstance(r["caption"], str) for r in rows)


@pytest.mark.slow
def test_quick_demo_with_vqa_adds_the_question_answering_stage(tmp_path):
    """`mmlm demo --quick --vqa`: a third stage starts from the demo's captioner; its figures sit beside their bars
    and the report shows test images with questions and answers."""
    import subprocess

    out = tmp_path / "demo"
    done = subprocess.run(["mmlm", "demo", "--quick", "--vqa", "--out", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Plan: captioner 250 steps, generator 150 steps, vqa 100 steps" in done.stdout
    assert "3/5 generator" in done.stdout and "4/5 vqa" in done.stdout and f"mmlm ask {out}/vqa" in done.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    vqa = metrics["vqa"]
    assert 0 < vqa["step"] <= 100 and metrics["plan"]["vqa"]["planned_steps"] == 100
    for key in ("test/accuracy", "compositional/accuracy", "test/accuracy_count"):
        assert 0.0 <= vqa[key] <= 1.0, key
        assert f"vqa/{key}" in metrics["bars"]["bars"], key
    assert f"init_from: {out}/captioner/model" in (out / "vqa" / "config.yaml").read_text()  # the two-stage recipe
    report = (out / "report.md").read_text()
    assert report.index("## Generator") < report.index("## Visual question answering")
    assert "VQA accuracy, test" in report and "(bar 95%)" in report and "images/vqa_answers.png" in report
    assert "then fine-tuned the captioner to answer questions" in report
    assert (out / "vqa" / "model" / "model.safetensors").is_file()
