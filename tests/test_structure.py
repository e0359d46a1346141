"""The package's shape: layer import rules, no import cycles, short files, and a VLM that never loads diffusers.

The rules (see ../shared/DESIGN.md): cli -> api -> tasks -> train -> models, data, eval -> config.
Models never import train, tasks, api, cli or data; data never imports models; tasks never import
api or cli; only cli.py reads argv; no two mmlm modules import each other, directly or around a loop,
at module level.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mmlm"
MAX_LINES = 400

# layer prefix -> module prefixes it must never import (anywhere in the file, function-level imports included)
FORBIDDEN = {
    "mmlm.models": ("mmlm.training", "mmlm.tasks", "mmlm.api", "mmlm.cli", "mmlm.data"),
    "mmlm.data": ("mmlm.models", "mmlm.training", "mmlm.tasks", "mmlm.api", "mmlm.cli"),
    "mmlm.tasks": ("mmlm.api", "mmlm.cli"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module, top_level_only: bool) -> list[ast.Import | ast.ImportFrom]:
    """Import statements; with ``top_level_only``, those run at import time (not in functions or TYPE_CHECKING)."""
    found, stack = [], list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
            continue
        if top_level_only and (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                               or _is_type_checking(node)):
            continue
        stack.extend(ast.iter_child_nodes(node))
    return found


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """Dotted names an import statement in ``module`` refers to; ``from pkg import sub`` names ``pkg.sub``."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module if FILES[module].name == "__init__.py" else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in FILES else base for alias in node.names]


def _known(name: str) -> str | None:
    """The mmlm module a dotted name lives in (the longest prefix that is one), or None."""
    while name and name not in FILES:
        name = name.rpartition(".")[0]
    return name or None


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _parse(module: str) -> ast.Module:
    return ast.parse(FILES[module].read_text(encoding="utf-8"), filename=str(FILES[module]))


def layer_violations() -> list[str]:
    problems = []
    for module in FILES:
        rules = [banned for layer, banned in FORBIDDEN.items() if _within(module, layer)]
        if not rules:
            continue
        for node in _imports(_parse(module), top_level_only=False):
            for target in _targets(module, node):
                if any(_within(target, b) for banned in rules for b in banned):
                    problems.append(f"{FILES[module].relative_to(ROOT)}:{node.lineno}: {module} imports {target}")
    return problems


def argv_uses(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, name) of every use of argparse or sys.argv in ``tree``."""
    uses = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""] + ([f"sys.{a.name}" for a in node.names] if node.module == "sys" else [])
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            names = [f"{node.value.id}.{node.attr}"]
        uses += [(node.lineno, n) for n in names if n.split(".")[0] == "argparse" or n == "sys.argv"]
    return uses


def argv_violations() -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line}: uses {name}"
            for module, path in FILES.items() if module != "mmlm.cli"
            for line, name in argv_uses(_parse(module))]


def import_graph() -> dict[str, set[str]]:
    """mmlm module -> the mmlm modules its import-time statements import."""
    graph: dict[str, set[str]] = {}
    for module in FILES:
        edges = set()
        for node in _imports(_parse(module), top_level_only=True):
            for target in _targets(module, node):
                known = _known(target) if target.startswith("mmlm") else None
                if known and known != module:
                    edges.add(known)
        graph[module] = edges
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_models_data_and_tasks_respect_the_layers():
    problems = layer_violations()
    assert not problems, "layer rule broken:\n" + "\n".join(problems)


def test_only_the_cli_reads_argv():
    problems = argv_violations()
    assert not problems, "argv parsed outside mmlm/cli.py:\n" + "\n".join(problems)


def test_no_import_cycles_at_module_level():
    cycles = import_cycles(import_graph())
    assert not cycles, "import cycles between mmlm modules:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_no_long_file_without_a_reason():
    long = []
    for module, path in FILES.items():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        docstring = ast.get_docstring(_parse(module)) or ""
        if lines > MAX_LINES and "Longer" not in docstring:
            long.append(f"{path.relative_to(ROOT)}: {lines} lines")
    assert not long, (f"files over {MAX_LINES} lines whose docstring gives no 'Longer ...' reason:\n"
                      + "\n".join(long))


def test_the_checks_see_what_they_check():
    """The rule checkers find what they look for on known code, so a pass above is not vacuous."""
    graph = import_graph()
    assert "mmlm.models.generation" in graph["mmlm.models.vlm"]  # `from mmlm.models import generation`
    assert "mmlm.data.sources" in graph["mmlm.data"]  # relative `from .sources import ...`
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    found = argv_uses(ast.parse("import argparse\nimport sys\nfrom sys import argv\nx = sys.argv[1:]\n"))
    assert [name for _, name in found] == ["argparse", "sys.argv", "sys.argv"]


VLM_ONLY = r"""
import json, sys
import mmlm.models.vlm
from mmlm.models import LanguageConfig, ProjectorConfig, VisionConfig, VisionLanguageModel, VLMConfig
import torch
from PIL import Image

torch.manual_seed(0)
config = VLMConfig(
    vision=VisionConfig(name="resnet10t", features_only_stage=1, image_size=32),
    projector=ProjectorConfig(type="mlp"),
    language=LanguageConfig(config={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                    "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
                                    "max_position_embeddings": 128}, vocab_size=300))
model = VisionLanguageModel.from_config(config, corpus=["a red circle", "a blue square"])
captions = model.caption([Image.new("RGB", (32, 32), "red")], max_new_tokens=3)
assert isinstance(captions[0], str)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "diffusers" or m.startswith("mmlm.data"))))
"""


def test_building_and_captioning_with_the_vlm_never_imports_diffusers_or_the_data_layer():
    done = subprocess.run([sys.executable, "-c", VLM_ONLY], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert not [m for m in loaded if m.startswith("diffusers")], f"importing the VLM loaded diffusers: {loaded}"
    assert not [m for m in loaded if m.startswith("mmlm.data")], f"the VLM imported the data layer: {loaded}"


def test_data_images_names_are_the_shared_decoder():
    import mmlm.data.images
    import mmlm.images

    for name in ("BadImageError", "ImageInfo", "image_info", "load_image", "DEFAULT_MAX_PIXELS"):
        assert getattr(mmlm.data.images, name) is getattr(mmlm.images, name), name
    from mmlm.data import DataError

    assert issubclass(mmlm.images.BadImageError, DataError)


def test_mmlm_train_stays_the_facade_function_after_the_harness_is_imported():
    """The harness package is mmlm.training, so importing it never shadows the documented mmlm.train(...)."""
    code = ("import mmlm, mmlm.training, mmlm.training.trainer, mmlm.api; "
            "assert mmlm.train is mmlm.api.train, mmlm.train; assert mmlm.evaluate is mmlm.api.evaluate")
    subprocess.run([sys.executable, "-c", code], check=True)
