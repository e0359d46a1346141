"""The command line: every subcommand's help, every flag of every verb run with its effect checked, and
every failure as one line on stderr (user errors exit 2, internal errors 1)."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmlm import cli
from mmlm.api import load_text_to_image, load_vlm
from mmlm.cli import build_parser, main
from mmlm.commands import _image_paths
from mmlm.config import save_yaml

from test_diffusion import tiny_model
from test_tasks import TINY_SHAPES, TINY_VLM

COMMANDS = ["train", "eval", "caption", "classify", "generate", "data", "demo"]
HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"mmlm {command}" in out


def _flags(parser: argparse.ArgumentParser, prefix: str = "mmlm"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _flags(sub, f"{prefix} {name}")
        else:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    yield prefix, option


def test_every_flag_of_every_verb_is_exercised_by_a_test():
    """A flag added to the parser that no test passes (as a quoted "--flag" in tests/) fails this test."""
    sources = "".join(path.read_text(encoding="utf-8") for path in sorted(HERE.glob("*.py")))
    flags = list(_flags(build_parser()))
    assert len(flags) > 25
    missing = [f"{verb} {flag}" for verb, flag in flags if f'"{flag}"' not in sources]
    assert not missing, f"flags no test runs: {missing}"


# ---------------------------------------------------------------------------- failures: one line each


def _one_error_line(capsys, prefix="error: "):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix) and "Traceback" not in err, err
    return lines[0]


def test_missing_config_file_and_bad_keys(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in _one_error_line(capsys)
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: captioning\ntrain:\n  lrr: 1\n")
    assert main(["train", str(bad)]) == 2
    assert "did you mean 'lr'" in _one_error_line(capsys)
    good = tmp_path / "good.yaml"
    good.write_text("task: captioning\ntrain:\n  max_steps: 1\n")
    assert main(["train", str(good), "train.max_stepz=3"]) == 2  # a bad override key on the command line
    assert "max_stepz" in (line := _one_error_line(capsys)) and "max_steps" in line


def test_missing_model_folder_and_missing_image(tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    assert main(["caption", str(tmp_path / "no_model"), str(image)]) == 2
    assert "no_model" in _one_error_line(capsys)
    assert main(["generate", str(tmp_path / "no_model"), "a red circle"]) == 2
    assert "no_model" in _one_error_line(capsys)
    assert main(["classify", str(tmp_path / "no_model"), str(tmp_path / "nope.png"), "--labels", "a,b"]) == 2
    assert "nope.png" in _one_error_line(capsys)  # images are checked before a model is loaded
    assert main(["data", "inspect", str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl" in _one_error_line(capsys)


@pytest.mark.parametrize("argv, says", [
    (["train"], "required: config"),
    (["caption", "m", "x.png", "--num-beams", "two"], "invalid int value: 'two'"),
    (["generate", "m", "p", "--scheduler", "euler"], "invalid choice: 'euler'"),
    (["classify", "m", "x.png"], "--labels"),
    (["data"], "required: ACTION"),
    (["caption", "m", "x.png", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_a_bad_flag_is_one_line_and_exit_2(argv, says, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    line = _one_error_line(capsys, prefix="mmlm")
    assert says in line and "--help" in line


def test_an_internal_error_is_one_line_with_where_to_report_it(monkeypatch, capsys):
    def broken(args):
        raise KeyError("boom")  # a bug, not a user error

    monkeypatch.setattr(cli, "cmd_data_inspect", broken)
    assert main(["data", "inspect", "some.jsonl"]) == 1
    line = _one_error_line(capsys, prefix="internal error: ")
    assert "KeyError" in line and "boom" in line and cli.REPORT_TO in line
    assert "mmlm --debug data inspect some.jsonl" in line
    with pytest.raises(KeyError):
        main(["--debug", "data", "inspect", "some.jsonl"])


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="missing.yaml"):
        main(["--debug", "train", str(tmp_path / "missing.yaml")])


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "mmlm.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "caption" in out.stdout


# ---------------------------------------------------------------------------- data


def _manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def test_data_shapes_flags_and_inspect(tmp_path, capsys):
    flags = ["--n", "6", "--seed", "3", "--image-size", "32", "--max-shapes", "1", "--language", "zh"]
    assert main(["data", "shapes", "--out", str(tmp_path / "a")] + flags) == 0
    rows = _manifest(tmp_path / "a")
    assert len(rows) == 6 and all(r["attributes"]["count"] == 1 for r in rows)
    assert all(Image.open(tmp_path / "a" / r["image"]).size == (32, 32) for r in rows)
    assert all("\u4e00" <= r["captions"][0][0] <= "\u9fff" for r in rows)  # Chinese captions
    assert main(["data", "shapes", "--out", str(tmp_path / "b")] + flags) == 0
    assert _manifest(tmp_path / "b") == rows  # the seed makes it reproducible
    assert main(["data", "shapes", "--out", str(tmp_path / "c"), "--n", "6", "--seed", "4"]) == 0
    other = _manifest(tmp_path / "c")
    assert other != rows and max(r["attributes"]["count"] for r in other) <= 3
    assert Image.open(tmp_path / "c" / other[0]["image"]).size == (64, 64)
    capsys.readouterr()
    assert main(["data", "inspect", str(tmp_path / "a" / "manifest.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "records: 6" in out and "32x32" in out and "bad rows: 0" in out


# ---------------------------------------------------------------------------- train, eval, caption, classify


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    config = {"task": "captioning", "output_dir": str(folder / "unused"), "model": TINY_VLM,
              "data": {"source": "shapes", "shapes": TINY_SHAPES, "batch_size": 8},
              "train": {"max_steps": 3, "warmup_steps": 1}, "eval": {"splits": ["test"], "num_examples": 2}}
    save_yaml(config, folder / "tiny.yaml")
    assert main(["train", str(folder / "tiny.yaml"), "train.lr=2e-3", "--output-dir", str(folder / "run")]) == 0
    assert not (folder / "unused").exists()  # --output-dir wins over the config's output_dir
    assert main(["data", "shapes", "--out", str(folder / "images"), "--n", "5"]) == 0
    return folder


def _result(out: str) -> dict:
    """The JSON result `mmlm train` prints last (after the run's own progress lines)."""
    return json.loads(out[out.index("{\n"):])


def test_train_overrides_and_resume(tiny_run, capsys):
    run = tiny_run / "run"
    assert (run / "config.yaml").read_text().count("lr: 0.002") == 1
    capsys.readouterr()
    argv = ["train", str(tiny_run / "tiny.yaml"), "train.lr=2e-3", "--output-dir", str(run)]
    assert main(argv + ["train.max_steps=4", "--resume"]) == 0  # from the last checkpoint (step 3)
    assert _result(capsys.readouterr().out)["step"] == 4
    checkpoint = sorted((run / "checkpoints").glob("step_000003*"))[0]
    assert main(argv + ["train.max_steps=5", "--resume", str(checkpoint)]) == 0  # from a given checkpoint
    assert _result(capsys.readouterr().out)["step"] == 5


def test_eval_flags(tiny_run, capsys):
    run, images = tiny_run / "run", tiny_run / "images"
    assert main(["eval", str(run), "--split", "val"]) == 0
    assert json.loads((run / "eval_val" / "metrics.json").read_text())["num_samples"] == TINY_SHAPES["n_val"]
    capsys.readouterr()
    out = tiny_run / "eval_manifest"
    assert main(["eval", str(run / "model"), "--data", str(images / "manifest.jsonl"), "--split", "train",
                 "--out", str(out), "data.caption_choice=first"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 1 <= metrics["num_samples"] <= 5  # the manifest's train split
    assert metrics == json.loads((out / "metrics.json").read_text())
    assert (out / "report.md").is_file()


def _table(out: str) -> dict[str, str]:
    return dict(line.split(None, 1) for line in out.strip().splitlines())


def test_caption_flags(tiny_run, capsys):
    run, images = tiny_run / "run", tiny_run / "images"
    paths = [str(p) for p in _image_paths([str(images)])]
    model = load_vlm(run)
    capsys.readouterr()
    assert main(["caption", str(run), str(images), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in rows] == paths and all(isinstance(r["caption"], str) for r in rows)
    assert [r["caption"] for r in rows] == model.caption(paths)
    assert main(["caption", str(run), *paths[:2], "--prompt", "look:", "--max-new-tokens", "2", "--num-beams", "2",
                 "--batch-size", "1"]) == 0
    table = _table(capsys.readouterr().out)  # no --json: one "<path>  <caption>" line per image
    expected = model.caption(paths[:2], prompt="look:", max_new_tokens=2, num_beams=2)
    assert list(table) == paths[:2] and list(table.values()) == [c.strip() for c in expected]
    assert all(len(model.tokenizer(c, add_special_tokens=False)["input_ids"]) <= 2 for c in expected)


def test_classify_flags(tiny_run, capsys):
    run, images = tiny_run / "run", tiny_run / "images"
    paths = [str(p) for p in _image_paths([str(images)])]
    model = load_vlm(run)
    capsys.readouterr()
    assert main(["classify", str(run), str(images), "--labels", "circle,square", "--prompt", "a small red {}",
                 "--prompt", "a large red {}", "--batch-size", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 5 and all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in rows)
    got = torch.tensor([[r["probabilities"]["circle"], r["probabilities"]["square"]] for r in rows])
    torch.testing.assert_close(got, model.classify(paths, ["circle", "square"], ["a small red {}", "a large red {}"]))
    assert all(r["label"] == max(r["probabilities"], key=r["probabilities"].get) for r in rows)
    expected = model.classify(paths, ["circle", "square"], ["a small red {}", "a large red {}"], eos=False,
                              ensemble="marginal")
    assert main(["classify", str(run), str(images), "--labels", "circle,square", "--prompt", "a small red {}",
                 "--prompt", "a large red {}", "--open-ended", "--ensemble", "marginal", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    got = torch.tensor([[r["probabilities"]["circle"], r["probabilities"]["square"]] for r in rows])
    torch.testing.assert_close(got, expected)
    assert main(["classify", str(run), paths[0], "--labels", "circle,square,star"]) == 0  # the table
    line = capsys.readouterr().out.strip()
    probs = model.classify(paths[:1], ["circle", "square", "star"], ["a photo of a {}"])[0].tolist()
    best = ["circle", "square", "star"][int(np.argmax(probs))]
    assert line.startswith(paths[0]) and line.split()[1] == best and f"{best}={max(probs):.3f}" in line
    assert main(["classify", str(run), str(images), "--labels", "circle,circle"]) == 2
    assert "duplicate" in capsys.readouterr().err.lower()


# ---------------------------------------------------------------------------- generate


@pytest.fixture(scope="module")
def tiny_generator(tmp_path_factory):
    folder = tmp_path_factory.mktemp("t2i") / "model"
    tiny_model().save_pretrained(folder)
    return folder


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_generate_flags(tiny_generator, tmp_path, capsys):
    model = load_text_to_image(tiny_generator)
    kwargs = dict(num_inference_steps=3, guidance_scale=3.0, seed=7, negative_prompt="a blue square",
                  scheduler="ddim")
    expected = model.generate(["a red circle"] * 3, **kwargs)
    flags = ["--steps", "3", "--guidance-scale", "3.0", "--seed", "7", "--negative-prompt", "a blue square",
             "--scheduler", "ddim"]
    assert main(["generate", str(tiny_generator), "a red circle", "--n", "3", "--out", str(tmp_path / "c.png")]
                + flags) == 0
    written = [Path(p) for p in capsys.readouterr().out.split()]
    assert [p.name for p in written] == ["c_00.png", "c_01.png", "c_02.png"]
    for path, image in zip(written, expected):
        np.testing.assert_array_equal(_pixels(path), np.asarray(image))
    grid = tmp_path / "grid" / "stars.png"
    assert main(["generate", str(tiny_generator), "a red circle", "--n", "3", "--grid", "--out", str(grid)]
                + flags) == 0
    assert capsys.readouterr().out.split() == [str(grid)]
    cell = max(96, expected[0].width)
    width, height = Image.open(grid).size
    assert 3 * cell <= width < 4 * cell and cell <= height < 2 * cell  # one row of 3 cells
    one = tmp_path / "one.png"
    assert main(["generate", str(tiny_generator), "a red circle", "--out", str(one)] + flags) == 0
    np.testing.assert_array_equal(_pixels(one), np.asarray(expected[0]))
    assert main(["generate", str(tiny_generator), "a red circle", "--out", str(tmp_path / "s8.png"),
                 "--seed", "8", "--steps", "3"]) == 0
    assert not np.array_equal(_pixels(tmp_path / "s8.png"), np.asarray(expected[0]))
