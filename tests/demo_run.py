"""One `mmlm demo --quick` run per test session, shared by test_demo.py and test_readme.py (it takes ~2 min)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

QUICK_DEMO = ["mmlm", "demo", "--quick", "--out"]  # + the run folder


@dataclass(frozen=True)
class DemoRun:
    out: Path      # the run folder
    stdout: str    # what the command printed


_RUN: DemoRun | None = None


def quick_demo(tmp_path_factory) -> DemoRun:
    """Run the console script once (as a user would) and reuse the run folder for the rest of the session."""
    global _RUN
    if _RUN is None:
        out = tmp_path_factory.getbasetemp() / "quick_demo"
        done = subprocess.run(QUICK_DEMO + [str(out)], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
        _RUN = DemoRun(out, done.stdout)
    return _RUN
