"""One `mmlm demo --quick` run per test session, shared by test_demo.py and test_readme.py (it takes ~2 min)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

QUICK_DEMO = ["mmlm", "demo", "--quick", "--out"]  # + the run folder


@dataclass(frozen=True)
class DemoRun:
    out: Path      # the run folder
    stdout: str    # what the command printed


_RUN: DemoRun | None = None
_FAILED: str | None = None  # a failed run is not retried by every test that needs it


def quick_demo(tmp_path_factory) -> DemoRun:
    """Run the console script once (as a user would) and reuse the run folder for the rest of the session."""
    global _RUN, _FAILED
    if _FAILED is not None:
        pytest.fail(f"`mmlm demo --quick` failed earlier in this session: {_FAILED}")
    if _RUN is None:
        out = tmp_path_factory.getbasetemp() / "quick_demo"
        try:
            done = subprocess.run(QUICK_DEMO + [str(out)], capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            _FAILED = "it ran past 600 s"
            raise
        if done.returncode != 0:
            _FAILED = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
            pytest.fail(f"`mmlm demo --quick` exited {done.returncode}:\n{done.stderr[-4000:]}")
        _RUN = DemoRun(out, done.stdout)
    return _RUN
