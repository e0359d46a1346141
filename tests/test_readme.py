"""Every command and Python block in README.md runs, and does what the README says it does.

After `mmlm demo --quick` has written a run folder (once per session, shared with test_demo.py), each fenced
``bash`` line and ``python`` block runs in a scratch folder where ``runs/demo`` points at that run and ``configs/``
at the repository's recipes. README lines say what they need with a trailing comment, and run here as follows:

- ``# needs: minutes``: ``mmlm demo`` is the quick run above (checked to be the same command with ``--quick``);
- every training command (``mmlm train``, ``mmlm.training``) runs on tiny data for 2 steps (overrides appended);
- ``# needs: gpu``: ``accelerate launch --multi_gpu`` with 2 processes, which on a CPU machine are 2 CPU processes;
- ``# needs: internet``: Hub ids replaced by local folders built here, ``pretrained=True`` by random init;
- ``pip install`` is checked statically (the extras exist), the test command must be exactly what ``.ci/run`` runs.

A command the runner cannot run, or whose output does not match the README's claim, fails the test; the meta-tests
at the end feed broken commands through the same runner.
"""

from __future__ import annotations

import json
import re
import shlex
import os
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

import mmlm
from mmlm import api
from mmlm.cli import build_parser

from demo_run import QUICK_DEMO, quick_demo

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
NEEDS = re.compile(r"#\s*needs:\s*(\w+)")
# Appended to every training command: tiny data, 2 steps, one small evaluation split.
QUICK_TRAIN = ["train.max_steps=2", "train.warmup_steps=1", "train.log_every=1", "data.batch_size=8",
               "data.eval_batch_size=8", "data.shapes.n_train=64", "data.shapes.n_val=8", "data.shapes.n_test=8",
               "data.shapes.n_compositional=8", "eval.splits=[test]", "eval.num_examples=2"]
GPU_PROCESSES = 2
TIMEOUT_S = 300


# ---------------------------------------------------------------------------- parsing the README


@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int  # of the opening fence, 1-based

    @property
    def needs(self) -> set[str]:
        return set(NEEDS.findall(self.code))


def code_blocks(text: str) -> list[Block]:
    blocks, lang, start, lines = [], None, 0, []
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            if lang is None:
                lang, start, lines = line[3:].strip(), number, []
            else:
                blocks.append(Block(lang, "\n".join(lines) + "\n", start))
                lang = None
        elif lang is not None:
            lines.append(line)
    assert lang is None, f"README.md:{start}: unclosed code block"
    return blocks


def shell_commands(block: Block) -> list[str]:
    """One entry per command; backslash continuations joined; blank and comment-only lines dropped."""
    commands, pending = [], ""
    for line in block.code.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line = pending + line
        pending = ""
        if line.strip() and not line.lstrip().startswith("#"):
            commands.append(line.strip())
    return commands


BLOCKS = code_blocks(README.read_text(encoding="utf-8"))
SHELL = [cmd for b in BLOCKS if b.lang in ("bash", "sh", "shell") for cmd in shell_commands(b)]
PYTHON = [b for b in BLOCKS if b.lang == "python"]


def test_the_readme_has_the_blocks_this_test_knows():
    assert {b.lang for b in BLOCKS} <= {"bash", "python"}, "a README block in a language this test does not run"
    assert len(SHELL) >= 7 and len(PYTHON) >= 2


# ---------------------------------------------------------------------------- the runner


@dataclass
class Ran:
    argv: list[str]
    stdout: str
    stderr: str


class Workspace:
    """A scratch folder laid out like the repository root after `mmlm demo`: runs/demo, configs/."""

    def __init__(self, folder: Path, demo):
        self.folder, self.demo = folder, demo
        (folder / "runs").mkdir(parents=True, exist_ok=True)
        if not (folder / "runs" / "demo").exists():
            (folder / "runs" / "demo").symlink_to(demo.out, target_is_directory=True)
            (folder / "configs").symlink_to(ROOT / "configs", target_is_directory=True)


def _segments(command: str) -> list[list[str]]:
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    tokens = list(lexer)
    operators = [t for t in tokens if t and set(t) <= set("();<>|&")]
    assert all(op == "&&" for op in operators), f"{command!r}: the README runner only chains with &&, got {operators}"
    segments, current = [], []
    for token in tokens:
        if token == "&&":
            segments.append(current)
            current = []
        else:
            current.append(token)
    return segments + [current]


def _mmlm_args(argv: list[str]) -> list[str] | None:
    """The mmlm CLI arguments of a command (``mmlm ...``, ``python -m mmlm.cli ...``, launchers), else None."""
    if argv[0] == "mmlm":
        return argv[1:]
    if "mmlm.cli" in argv and argv[argv.index("mmlm.cli") - 1] == "-m":
        return argv[argv.index("mmlm.cli") + 1:]
    return None


def _check_pip(argv: list[str], command: str) -> None:
    assert argv[:4] == ["python3", "-m", "pip", "install"], command
    args = argv[4:]
    assert args[:1] == ["-e"] and len(args) == 2, f"{command!r}: expected `pip install -e .[extras]`"
    match = re.fullmatch(r"\.(?:\[([\w,]+)\])?", args[1])
    assert match, f"{command!r}: install target {args[1]!r} is not the repository"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra in filter(None, (match.group(1) or "").split(",")):
        assert extra in extras, f"{command!r}: no extra {extra!r} in pyproject.toml (have {', '.join(extras)})"


def _check_test_command(command: str) -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in ci, f"README's test command {command!r} is not a line of .ci/run"


def _rewrite(argv: list[str], needs: set[str], command: str) -> list[str]:
    argv = list(argv)
    if "gpu" in needs:  # the CPU form: 2 processes (--multi_gpu makes accelerate start them without GPUs)
        assert argv[:2] == ["accelerate", "launch"] and "--multi_gpu" in argv, \
            f"{command!r}: a `needs: gpu` line must be `accelerate launch --multi_gpu ...` (CPU form: 2 processes)"
        argv[argv.index("--num_processes") + 1] = str(GPU_PROCESSES)
    args = _mmlm_args(argv)
    if args and args[0] == "train":
        argv += QUICK_TRAIN
    return argv


def run_command(command: str, work: Workspace) -> list[Ran]:
    """Run one README shell line the way the module docstring says; raise AssertionError when it fails."""
    needs = set(NEEDS.findall(command))
    assert needs <= {"gpu", "internet", "minutes"}, f"{command!r}: unknown needs {needs}"
    results = []
    for argv in _segments(command):
        assert argv, f"{command!r}: empty command"
        if argv[:3] == ["python3", "-m", "pip"]:
            _check_pip(argv, command)
            continue
        if argv[:3] == ["python3", "-m", "pytest"]:
            _check_test_command(command.split("#")[0].strip())
            continue
        args = _mmlm_args(argv)
        if args and args[0] == "demo":
            assert "minutes" in needs, f"{command!r}: the demo takes minutes; mark it `# needs: minutes`"
            parse = build_parser().parse_args
            quick = parse(args + ["--quick", "--out", str(work.demo.out)])
            assert quick == parse(QUICK_DEMO[1:] + [str(work.demo.out)]), f"{command!r} is not the demo the test ran"
            results.append(Ran(argv, work.demo.stdout, ""))
            continue
        argv = _rewrite(argv, needs, command)
        done = subprocess.run(argv, cwd=work.folder, capture_output=True, text=True, timeout=TIMEOUT_S,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
        assert done.returncode == 0, f"{command!r} exited {done.returncode}:\n{done.stderr[-3000:]}"
        ran = Ran(argv, done.stdout, done.stderr)
        check_output(ran, work)
        results.append(ran)
    return results


# ---------------------------------------------------------------------------- what each command promises


def _option(argv, name, default=None):
    return argv[argv.index(name) + 1] if name in argv else default


def _check_caption(ran: Ran, args: list[str], work: Workspace):
    rows = [line.split(None, 1) for line in ran.stdout.strip().splitlines()]
    assert rows and all(len(r) == 2 and r[1].strip() for r in rows), ran.stdout  # "<path>  <caption>", non-empty
    assert all((work.folder / r[0]).is_file() for r in rows)


def _check_classify(ran: Ran, args: list[str], work: Workspace):
    labels = [label.strip() for label in _option(args, "--labels").split(",")]
    lines = ran.stdout.strip().splitlines()
    assert lines, "classify printed nothing"
    for line in lines:
        path, rest = line.split(None, 1)
        shown = {label: float(m.group(1)) for label in labels
                 if (m := re.search(rf"(?<!\S){re.escape(label)}=([0-9.]+)", rest))}
        assert (work.folder / path).is_file() and shown, line
        top = max(shown.values())  # the top label first, then the top 3 scores (ties at 3 decimals: any of them)
        assert any(rest.startswith(label) for label, value in shown.items() if value == top), line
        assert all(0 <= v <= 1 for v in shown.values()), line
        if len(labels) <= 3:  # every label shown: the probabilities sum to 1 (printed to 3 decimals)
            assert len(shown) == len(labels) and abs(sum(shown.values()) - 1) <= 2e-3 * len(labels), line


def _check_generate(ran: Ran, args: list[str], work: Workspace):
    out, n = work.folder / _option(args, "--out", "generated.png"), int(_option(args, "--n", "1"))
    if "--grid" in args or n == 1:
        assert ran.stdout.split() == [str(_option(args, "--out", "generated.png"))]
        width, height = Image.open(out).size
        columns, rows = min(n, 8), -(-n // 8)
        assert abs(width / columns - height / rows) < 8, (width, height)  # n square cells in rows of at most 8
    else:
        assert len(ran.stdout.split()) == n and all((work.folder / p).is_file() for p in ran.stdout.split())


def _check_train(ran: Ran, args: list[str], work: Workspace):
    launcher = ran.argv[0]
    processes = int(_option(ran.argv, "--nproc_per_node", _option(ran.argv, "--num_processes", "1")))
    if launcher not in ("torchrun", "accelerate") or ("--cpu" in ran.argv):
        processes = 1
    header = [line for line in (ran.stdout + ran.stderr).splitlines() if "mmlm: " in line and " x cpu" in line]
    assert header and all(f" on {processes} x cpu" in line for line in header), (processes, header)
    result = json.loads(ran.stdout[ran.stdout.index("{"):])
    assert result["step"] == 2
    out = work.folder / _option(args, "--output-dir", "runs/shapes_captioner")
    assert (out / "model" / "config.json").is_file() and (out / "config.yaml").is_file()


def _check_export(ran: Ran, args: list[str], work: Workspace):
    out = work.folder / args[2]
    assert ran.stdout.split() == [args[2]] or ran.stdout.strip() == str(out), ran.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"] and (out / "processor_config.json").is_file()


CHECKS = {"caption": _check_caption, "classify": _check_classify, "generate": _check_generate,
          "train": _check_train, "export": _check_export}


def check_output(ran: Ran, work: Workspace):
    args = _mmlm_args(ran.argv)
    assert args and args[0] in CHECKS, f"{shlex.join(ran.argv)}: no check in tests/test_readme.py for this command"
    CHECKS[args[0]](ran, args, work)


# ---------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("readme"), quick_demo(tmp_path_factory))


@pytest.mark.slow
@pytest.mark.parametrize("command", SHELL)
def test_readme_shell_command(command, work):
    run_command(command, work)


def _local_qwen(folder: Path) -> Path:
    """A tiny Qwen2 (the real architecture) + a tokenizer trained here: the offline stand-in for a Hub id."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mmlm.models import train_tokenizer

    if not (folder / "config.json").is_file():
        tokenizer = train_tokenizer(["a red circle", "a blue square", "a green star"], vocab_size=300)
        torch.manual_seed(0)
        lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
        lm.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def _local_sd(folder: Path) -> Path:
    """A tiny Stable-Diffusion-style pipeline built offline (tests/diffusers_fixtures.py): the Hub id's stand-in."""
    if not (folder / "model_index.json").is_file():
        sys.path.insert(0, str(Path(__file__).parent))
        from diffusers_fixtures import tiny_sd_pipeline

        tiny_sd_pipeline(folder)
    return folder


def offline(code: str, work: Workspace) -> str:
    """The `needs: internet` lines with Hub downloads replaced by local stand-ins; each line must change."""
    replacements = {"pretrained=True": lambda: "pretrained=False",
                    "stable-diffusion-v1-5/stable-diffusion-v1-5": lambda: str(_local_sd(work.folder / "local_sd")),
                    '"Qwen/Qwen2.5-0.5B"': lambda: repr(str(_local_qwen(work.folder / "local_qwen")))}
    lines = []
    for line in code.splitlines():
        if "internet" in NEEDS.findall(line):
            changed = line
            for old, new in replacements.items():
                if old in changed:
                    changed = changed.replace(old, new())
            assert changed != line, f"{line.strip()!r} needs the internet and has no offline stand-in in this test"
            line = changed
        lines.append(line)
    return "\n".join(lines) + "\n"


def _quick_train(real):
    calls = []

    def train(config, overrides=(), **kwargs):
        calls.append(config)
        return real(config, list(overrides) + QUICK_TRAIN, **kwargs)

    train.calls = calls
    return train


def run_python(block: Block, work: Workspace, monkeypatch) -> dict:
    code = offline(block.code, work) if "internet" in block.needs else block.code
    monkeypatch.chdir(work.folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The README block's mmlm.train runs the quick form (tiny data, 2 steps) of the real facade function.
    assert callable(mmlm.train), "mmlm.train must stay the facade function after mmlm.training is imported"
    train = _quick_train(mmlm.train)
    monkeypatch.setattr(mmlm, "train", train)
    namespace = {"__name__": "__readme__"}
    exec(compile(code, f"{README}:{block.line}", "exec"), namespace)
    namespace["_train_calls"] = train.calls
    return namespace


def _check_api_block(ns: dict, work: Workspace):
    assert len(ns["captions"]) == len(ns["images"]) == 2
    assert all(isinstance(c, str) and c.strip() for c in ns["captions"])
    probs = ns["probs"]
    assert tuple(probs.shape) == (2, 2) and torch.allclose(probs.sum(-1), torch.ones(2), atol=1e-5)
    assert len(ns["pictures"]) == 1 and isinstance(ns["pictures"][0], Image.Image)
    assert ns["_train_calls"] and ns["result"]["step"] == 2
    assert isinstance(ns["metrics"], dict) and "exact_match" in ns["metrics"]
    assert (work.folder / "runs" / "shapes_captioner" / "eval_test" / "metrics.json").is_file()


def _check_parts_block(ns: dict, work: Workspace):
    folder = work.folder / "my_vlm"
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors"} <= files and not any(f.endswith((".bin", ".pkl", ".pt")) for f in files)
    assert type(ns["model"]).__name__ == "VisionLanguageModel"
    assert type(ns["model"].language_model).__name__ == "Qwen2ForCausalLM"


def _check_auto_block(ns: dict, work: Workspace):
    assert type(ns["model"]).__name__ == "MmlmVLMForConditionalGeneration"
    assert len(ns["captions"]) == 1 and ns["captions"][0].strip()  # and equal to caption(): the block asserts it


def _check_llava_block(ns: dict, work: Workspace):
    assert type(ns["model"]).__name__ == "LlavaForConditionalGeneration"
    trained = api.load(work.folder / "runs" / "llava")  # the run the README's export line exported
    assert ns["caption"] == trained.caption([ns["image"]])[0].strip()


def _check_pipeline_block(ns: dict, work: Workspace):
    assert ns["_train_calls"] and ns["result"]["step"] == 2
    folder = work.folder / "runs" / "finetune_sd_lora" / "model"
    assert (folder / "model_index.json").is_file() and (folder / "pytorch_lora_weights.safetensors").is_file()
    assert isinstance(ns["image"], Image.Image) and ns["image"].size == (16, 16)  # the tiny pipeline's resolution


PYTHON_CHECKS = {"StableDiffusionPipeline": _check_pipeline_block, "mmlm.load(": _check_api_block, "VisionLanguageModel.from_config": _check_parts_block,
                 "AutoModelForImageTextToText": _check_auto_block, "LlavaForConditionalGeneration": _check_llava_block}


@pytest.mark.slow
@pytest.mark.parametrize("block", PYTHON, ids=lambda b: f"README.md:{b.line}")
def test_readme_python_block(block, work, monkeypatch):
    checks = [check for marker, check in PYTHON_CHECKS.items() if marker in block.code]
    assert len(checks) == 1, f"README.md:{block.line}: a Python block needs exactly one check in this test"
    checks[0](run_python(block, work, monkeypatch), work)


# ---------------------------------------------------------------------------- meta-tests: the runner can fail


@pytest.mark.slow
@pytest.mark.parametrize("broken", [
    "mmlm caption runs/demo/captioner runs/demo/no_such_folder",              # a path that is not there
    'mmlm generate runs/demo/generator "a red star" --n 2 --grd --out s.png',  # a misspelt flag
    "mmlm classify runs/demo/generator runs/demo/data_sample --labels a,b",    # the wrong kind of model
    "mmlm data shapes --out x --n 2",                                          # a command nothing checks
    "python3 -m pip install -e .[nosuchextra]",                                # an extra pyproject lacks
    "python3 -m pytest -q tests/test_cli.py",                                  # not what .ci/run runs
    "mmlm demo",                                                               # minutes, unmarked
    "mmlm caption runs/demo/captioner runs/demo/data_sample | head -2",        # shell plumbing it cannot run
])
def test_a_broken_readme_command_fails(broken, work):
    with pytest.raises(AssertionError):
        run_command(broken, work)


@pytest.mark.slow
def test_a_broken_python_block_fails(work, monkeypatch):
    block = next(b for b in PYTHON if "mmlm.load(" in b.code)
    broken = Block("python", block.code.replace("num_beams=1", "num_beam=1"), block.line)
    with pytest.raises(TypeError):
        run_python(broken, work, monkeypatch)
    code = block.code[:block.code.index("generator = ")]  # up to the classification; the claim (2, 2) is broken
    bad_claim = Block("python", code.replace('"square in blue"', '"square in blue", "star in green"'), block.line)
    with pytest.raises(AssertionError):
        _check_api_block(run_python(bad_claim, work, monkeypatch), work)


def test_offline_stand_ins_cover_every_internet_line(tmp_path):
    class Demo:
        out, stdout = tmp_path, ""

    work = Workspace(tmp_path / "w", Demo())
    with pytest.raises(AssertionError, match="no offline stand-in"):
        offline('x = Thing("org/model")   # needs: internet\n', work)
    assert "pretrained=False" in offline("v = VisionConfig(pretrained=True)  # needs: internet\n", work)


def test_ci_runs_exactly_the_readme_test_command():
    tests = [c for c in SHELL if "pytest" in c]
    assert len(tests) == 1
    assert tests[0] in (ROOT / ".ci" / "run").read_text().splitlines()
