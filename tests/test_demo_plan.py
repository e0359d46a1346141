"""Fast checks of the demo's step budget, ETA, --max-minutes cap, bars and report formatting (no training)."""

import json

import pytest
from PIL import Image

from mmlm.demo import Progress, planned_steps, run_demo
from mmlm.demo_report import QUICK_NOTE, cap_note, summary_lines
from mmlm.demo_plan import (
    EVAL_SHARE,
    REPORT_SHARE,
    SpeedMeter,
    Stage,
    StageWatch,
    cap_shares,
    format_duration,
    remaining_cap,
    run_eta,
)
from mmlm.eval.bars import BARS, Bar, format_metric, steps_to_bar
from mmlm.eval.report import ReportWriter, caption_lines


def test_recipes_set_quality_in_steps():
    from mmlm.config import load_config
    from mmlm.demo import recipe

    for name in ("shapes_captioner.yaml", "shapes_diffusion.yaml", "shapes_classifier.yaml"):
        cfg = load_config(recipe(name))
        assert cfg.train.max_steps and cfg.train.max_minutes is None, name
    gen = load_config(recipe("shapes_diffusion.yaml"))
    assert len(gen.eval.samplers) == 1 and gen.eval.splits == ["test"]  # the demo evaluates once, one sampler
    cfg = load_config(recipe("shapes_captioner.yaml"), ["train.max_steps=null"])
    with pytest.raises(Exception, match="max_steps"):
        planned_steps(cfg, "captioner")


def test_format_duration():
    assert format_duration(42) == "42 s" and format_duration(125) == "2 min 5 s" and format_duration(-3) == "0 s"
    assert format_duration(19 * 60 + 40) == "20 min"


def test_speed_meter_leaves_out_the_first_row_and_waits_for_enough_steps():
    meter = SpeedMeter(min_steps=40)
    meter.add(25, 30.0)  # the first row carries start-up costs: not timed
    meter.add(50, 35.0)
    assert meter.steps_per_s is None  # 25 steps timed < 40
    meter.add(75, 40.0)
    assert meter.steps_per_s == pytest.approx(5.0) and meter.span == (25, 75)


def test_stage_watch_reports_once_measured_and_again_at_half(tmp_path):
    calls = []
    path = tmp_path / "metrics.jsonl"
    watch = StageWatch(path, total_steps=200, on_speed=lambda m, step: calls.append((step, m.steps_per_s)),
                       min_steps=40)
    rows = [{"step": s, "loss": 1.0, "elapsed_s": s / 4} for s in range(25, 201, 25)]
    rows.insert(2, {"step": 50, "val/loss": 0.3})  # evaluation rows are ignored
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(text[: len(text) - 7])  # a half-written last line waits for the next poll
    watch.poll()
    path.write_text(text)
    watch.poll()
    assert calls == [(75, pytest.approx(4.0)), (100, pytest.approx(4.0))]


def test_run_eta_uses_the_measured_stage_for_the_next_one():
    stages = [Stage("captioner", 1000, steps_per_s=2.0), Stage("generator", 2000)]
    left = 300.0  # captioner training still to go
    eta = run_eta(stages, "captioner", left, elapsed_s=200.0)
    generator = 2000 / (2.0 / stages[1].relative_cost) * (1 + EVAL_SHARE)
    assert eta == pytest.approx(left + generator + REPORT_SHARE * (200 + left + generator))
    assert run_eta([Stage("captioner", 10), Stage("generator", 10)], "captioner", 5.0, 0.0) is None
    # in the last stage only its own rest and the report remain
    assert run_eta(stages, "generator", 60.0, 900.0) == pytest.approx(60 + REPORT_SHARE * 960)


def test_max_minutes_cap_is_shared_by_cost_and_leaves_room_for_evaluation():
    stages = [Stage("captioner", 1000), Stage("generator", 2000)]
    shares = cap_shares(stages, 20)
    assert sum(shares.values()) == pytest.approx(20 * (1 - REPORT_SHARE) / (1 + EVAL_SHARE))
    assert shares["generator"] / shares["captioner"] == pytest.approx(2 * stages[1].relative_cost)
    # the generator gets what the captioner left, and a little even when the cap is spent
    assert remaining_cap(20, 5 * 60, stages[1:]) == pytest.approx(15 * (1 - REPORT_SHARE) / (1 + EVAL_SHARE))
    assert remaining_cap(20, 25 * 60, stages[1:]) == 0.05
    with pytest.raises(ValueError, match="max-minutes"):
        cap_shares(stages, 0)
    with pytest.raises(ValueError, match="max-minutes"):
        run_demo("unused", max_minutes=-1)


def test_progress_message_gives_etas_and_warns_when_the_cap_cuts_the_steps():
    stages = [Stage("captioner", 1000), Stage("generator", 2000)]
    meter = SpeedMeter(min_steps=1)
    meter.add(25, 10.0)
    meter.add(75, 35.0)  # 2 steps/s
    import time

    text = Progress(stages, time.perf_counter()).message("captioner", meter, 75)
    assert "2.00 steps/s (timed over steps 25-75)" in text and "7 min 42 s of training left in this stage" in text
    assert "left for the whole demo" in text and "may not be reached" not in text
    capped = Progress(stages, time.perf_counter(), {"captioner": 2.0}).message("captioner", meter, 75)
    assert "allows about 240 of 1,000 steps: the bars may not be reached" in capped
    assert "1 min 25 s of training left" in capped  # the cap, not the steps, ends this stage
    assert "bars may not be reached" in cap_note(10) and "--max-minutes 10" in cap_note(10)
    whole = Progress(stages, time.perf_counter(), {"captioner": 0.5}, max_minutes=1.0).message("captioner", meter, 75)
    assert "about 1 min 0 s left for the whole demo" in whole or "about 59 s left for the whole demo" in whole


def test_bar_and_metric_formatting():
    bar = Bar("test/exact_match", "exact match", 0.95)
    assert bar.describe(0.9712) == "exact match 97.1% (bar 95%)" and bar.met(0.9712) and not bar.met(0.94)
    assert bar.describe(None) == "exact match not measured (bar 95%)" and not bar.met(float("nan"))
    assert format_metric("test/exact_match", 0.9712) == "97.1%"
    assert format_metric("test/kind_accuracy/dpm++:20", 0.5) == "50.0%"
    assert format_metric("step", 2800.0) == "2,800" and format_metric("num_images", 500) == "500"
    assert format_metric("samples_seen", 89600) == "89,600" and format_metric("test/fid", 12.34567) == "12.3457"
    assert format_metric("train/loss", 0.00012) == "0.00012"
    assert steps_to_bar([(500, 0.6), (250, 0.2), (1000, 0.96), (750, 0.951)], 0.95) == 750
    assert steps_to_bar([(500, 0.6)], 0.95) is None
    assert {b.key for b in BARS["captioner"]} == {"test/exact_match", "compositional/exact_match"}


def test_report_results_table_shows_each_figure_beside_its_bar(tmp_path):
    report = ReportWriter(tmp_path, "t")
    report.results({"test": {"exact_match": 0.9712}, "compositional": {"exact_match": 0.80}, "step": 1000},
                   BARS["captioner"])
    md = report.to_markdown()
    assert "| test/exact_match | 97.1% | bar 95%: met |" in md
    assert "| compositional/exact_match | 80.0% | bar 85%: NOT met |" in md
    assert "| step | 1,000 |  |" in md


def test_report_image_grid_wraps_full_captions(tmp_path):
    long = ("[red circle 97%, blue square 2%] a small red circle at the top left, a large green square at the "
            "bottom right and a small yellow star in the center")
    images = [Image.new("RGB", (16, 16), "red")] * 2
    assert caption_lines([long], 128) > 4  # more than the four lines a plain grid keeps
    cut = ReportWriter(tmp_path / "a", "t").image_grid(images, [long, "a"], name="g")
    full = ReportWriter(tmp_path / "b", "t").image_grid(images, [long, "a"], name="g", full_captions=True)
    with Image.open(cut) as a, Image.open(full) as b:
        assert b.height - a.height == (caption_lines([long], 128) - 4) * 15  # 15 px a line at font 12


def _metrics(all_met: bool, **extra):
    bars = {"captioner/test/exact_match": {"label": "exact match, test", "value": 0.97 if all_met else 0.80,
                                           "bar": 0.95, "met": all_met}}
    metrics = {"quick": False, "max_minutes": None,
               "captioner": {"step": 1000, "samples_seen": 32000}, "generator": {"step": 1500, "samples_seen": 48000},
               "plan": {"captioner": {"planned_steps": 1000, "steps_per_s": 2.2},
                        "generator": {"planned_steps": 2000, "steps_per_s": 1.9}},
               "timings": {"total_s": 1200, "captioner_s": 480, "generator_s": 690, "zero_shot_s": 30},
               "machine": {"matmul_gflops": 63.4, "threads": 2},
               "bars": {"all_met": all_met, "bars": bars}}
    metrics.update(extra)
    return metrics


def test_report_summary_says_what_how_long_and_whether_every_bar_was_met():
    lines = summary_lines(_metrics(True))
    assert len(lines) == 3
    assert "captioner for 1,000 steps (32,000 samples)" in lines[0]
    assert "generator for 1,500 steps of the 2,000 planned (48,000 samples)" in lines[0]
    assert "20.0 min in all" in lines[1] and "captioner 8.0 min at 2.20 steps/s" in lines[1]
    assert "matmul 63 GFLOP/s (2 threads)" in lines[1]  # the machine's speed, so a reader can place the run
    assert "every quality bar met (1 of 1)" in lines[2]
    capped = summary_lines(_metrics(False, max_minutes=12.0))
    assert "0 of 1 quality bars met; missed: exact match, test 80.0% (bar 95%)" in capped[2]
    assert capped[3] == cap_note(12.0)
    assert summary_lines(_metrics(False, quick=True))[3] == QUICK_NOTE


def test_report_summary_names_the_vqa_stage_when_it_ran():
    metrics = _metrics(True)
    assert "answer questions" not in " ".join(summary_lines(metrics))
    metrics["vqa"] = {"step": 3000, "samples_seen": 96000}
    metrics["plan"]["vqa"] = {"planned_steps": 3000, "steps_per_s": 2.5}
    metrics["timings"]["vqa_s"] = 1320
    lines = summary_lines(metrics)
    assert "then fine-tuned the captioner to answer questions: a vqa for 3,000 steps (96,000 samples)" in lines[0]
    assert "VQA 22.0 min at 2.50 steps/s" in lines[1]


def test_bar_summary_judges_the_vqa_bars_only_when_the_stage_ran():
    from mmlm.demo import bar_summary

    metrics = {"captioner": {"test/exact_match": 0.97, "compositional/exact_match": 0.9},
               "zero_shot_classification": {"accuracy": 0.93}, "generator": {"test/fidelity": 0.91}}
    assert bar_summary(metrics)["all_met"] and not any(k.startswith("vqa/") for k in bar_summary(metrics)["bars"])
    metrics["vqa"] = {"test/accuracy": 0.97, "compositional/accuracy": 0.9, "test/accuracy_count": 0.85}
    summary = bar_summary(metrics)
    assert not summary["all_met"] and summary["bars"]["vqa/test/accuracy_count"]["met"] is False
    assert summary["bars"]["vqa/test/accuracy"] == {"label": "VQA accuracy, test", "value": 0.97, "bar": 0.95,
                                                    "met": True}


def test_demo_vqa_stage_starts_from_the_demo_captioner(tmp_path):
    from mmlm.config import load_config
    from mmlm.demo import recipe
    from mmlm.demo_vqa import QUESTIONS_PER_IMAGE, shown_questions, vqa_overrides

    cfg = load_config(recipe("shapes_vqa.yaml"), vqa_overrides(tmp_path / "captioner" / "model", quick=False))
    assert cfg.model.init_from == str(tmp_path / "captioner" / "model") and cfg.train.max_steps == 3000
    assert cfg.eval.splits == ["test", "compositional"]
    images, pairs = shown_questions(cfg, n_images=4)
    assert len(images) == len(pairs) == 4 and all(1 <= len(qs) <= QUESTIONS_PER_IMAGE for qs in pairs)
    assert all(len(set(qs)) == len(qs) and all(q.endswith("?") and a for q, a in qs) for qs in pairs)


def test_cli_demo_takes_max_minutes():
    from mmlm.cli import build_parser

    args = build_parser().parse_args(["demo", "--max-minutes", "12.5", "--out", "x"])
    assert args.max_minutes == 12.5 and args.quick is False and args.vqa is False
    assert build_parser().parse_args(["demo", "--vqa"]).vqa is True


def test_time_to_quality_reports_steps_and_samples_to_each_bar():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "time_to_quality.py"
    spec = importlib.util.spec_from_file_location("time_to_quality", path)
    ttq = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ttq)

    def row(steps, test, comp, curve=()):
        return {"task": "captioning", "metric": "exact_match", "unit": "steps", "budget": steps, "steps": steps,
                "samples": 32 * steps, "steps_per_s": 2.0, "scores": {"test": test, "compositional": comp},
                "val_curve": list(curve)}

    rows = [row(500, 0.80, 0.30), row(1000, 0.96, 0.70, [(500, 0.9), (750, 0.955)]), row(2000, 0.98, 0.9)]
    reached = {r["key"]: r for r in ttq.bars_reached(rows)}
    assert reached["test/exact_match"]["steps"] == 1000 and reached["test/exact_match"]["samples"] == 32000
    assert reached["test/exact_match"]["val_steps"] == 750
    assert reached["compositional/exact_match"]["steps"] == 2000
    assert ttq.bars_reached(rows[:1])[0]["steps"] is None
    with pytest.raises(ValueError, match="steps > 0"):
        ttq.run_budget("configs/shapes_captioner.yaml", 0, [], Path("unused"), unit="steps")


def test_matmul_speed_counts_two_flops_per_multiply_add(monkeypatch):
    from mmlm import demo_plan

    clock = iter([0.0, 0.5] * 10)  # every timed matmul "takes" 0.5 s
    monkeypatch.setattr("time.perf_counter", lambda: next(clock))
    assert demo_plan.matmul_gflops(size=100, repeats=2) == 2 * 100**3 / 0.5 / 1e9
