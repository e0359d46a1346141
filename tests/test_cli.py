"""The command line: every subcommand's help, user errors as one line, and real runs on tiny models."""

import json
import subprocess
import sys

import pytest
import torch

from mmlm.api import load_vlm
from mmlm.cli import _image_paths, main
from mmlm.config import save_yaml

from test_tasks import TINY_SHAPES, TINY_VLM

COMMANDS = ["train", "eval", "caption", "classify", "generate", "data", "demo"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"mmlm {command}" in out


def test_user_error_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.yaml" in err and "Traceback" not in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: captioning\ntrain:\n  lrr: 1\n")
    assert main(["train", str(bad)]) == 2
    assert "did you mean 'lr'" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError):
        main(["--debug", "train", str(tmp_path / "missing.yaml")])


def test_data_shapes_and_inspect(tmp_path, capsys):
    assert main(["data", "shapes", "--out", str(tmp_path / "shapes"), "--n", "12", "--seed", "3"]) == 0
    manifest = tmp_path / "shapes" / "manifest.jsonl"
    assert manifest.is_file() and len(manifest.read_text().splitlines()) == 12
    capsys.readouterr()
    assert main(["data", "inspect", str(manifest)]) == 0
    assert "12" in capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    config = {"task": "captioning", "output_dir": str(folder / "run"), "model": TINY_VLM,
              "data": {"source": "shapes", "shapes": TINY_SHAPES, "batch_size": 8},
              "train": {"max_steps": 3, "warmup_steps": 1}, "eval": {"splits": ["test"], "num_examples": 2}}
    save_yaml(config, folder / "tiny.yaml")
    assert main(["train", str(folder / "tiny.yaml"), "train.lr=2e-3"]) == 0
    assert main(["data", "shapes", "--out", str(folder / "images"), "--n", "5"]) == 0
    return folder


def test_train_caption_classify_eval_from_the_cli(tiny_run, capsys):
    run, images = tiny_run / "run", tiny_run / "images"
    assert (run / "config.yaml").read_text().count("lr: 0.002") == 1
    capsys.readouterr()
    assert main(["caption", str(run), str(images), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 5 and all(isinstance(r["caption"], str) for r in rows)
    assert main(["classify", str(run), str(images), "--labels", "circle,square", "--prompt", "a small red {}",
                 "--prompt", "a large red {}", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 5 and all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in rows)
    model = load_vlm(run)
    expected = model.classify([str(p) for p in _image_paths([str(images)])], ["circle", "square"],
                              ["a small red {}", "a large red {}"], eos=False, ensemble="marginal")
    assert main(["classify", str(run), str(images), "--labels", "circle,square", "--prompt", "a small red {}",
                 "--prompt", "a large red {}", "--open-ended", "--ensemble", "marginal", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    got = torch.tensor([[r["probabilities"]["circle"], r["probabilities"]["square"]] for r in rows])
    torch.testing.assert_close(got, expected)
    assert main(["eval", str(run), "--split", "val"]) == 0
    assert (run / "eval_val" / "metrics.json").is_file()
    assert main(["classify", str(run), str(images), "--labels", "circle,circle"]) == 2
    assert "duplicate" in capsys.readouterr().err.lower()


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "mmlm.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "caption" in out.stdout
