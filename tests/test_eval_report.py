"""metrics.json, report.md / report.html, image grids and loss curves."""

import base64
import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from mmlm.eval.plots import image_grid, plot_loss_curve, to_pil
from mmlm.eval.report import ReportWriter, flatten_metrics, table_rows, to_jsonable, write_metrics

# ------------------------------------------------------------------------------------------ metrics.json


def test_write_metrics_is_json_safe_and_nested(tmp_path):
    metrics = {
        "val": {"bleu_4": np.float32(0.25), "cider": 1.5, "steps": np.int64(3)},
        "confusion_matrix": np.array([[1, 2], [3, 4]]),
        "loss": torch.tensor(0.5),
        "nan": float("nan"),
        "inf": np.float64("inf"),
        "run": tmp_path,
        "labels": ("a", "b"),
    }
    path = write_metrics(metrics, tmp_path / "out" / "metrics.json")
    data = json.loads(path.read_text(encoding="utf-8"))  # strict JSON: no NaN tokens
    assert data["val"] == {"bleu_4": 0.25, "cider": 1.5, "steps": 3}
    assert data["confusion_matrix"] == [[1, 2], [3, 4]]
    assert data["loss"] == 0.5 and data["nan"] is None and data["inf"] is None
    assert data["run"] == str(tmp_path) and data["labels"] == ["a", "b"]
    assert "NaN" not in path.read_text() and not list(path.parent.glob(".*tmp"))
    with pytest.raises(TypeError, match="expected a mapping"):
        write_metrics([1, 2], tmp_path / "bad.json")


def test_to_jsonable_and_flatten():
    assert to_jsonable({1: np.bool_(True)}) == {"1": True}
    nested = {"val": {"acc": 0.5, "per_class": {"a": {"f1": 1.0}}}, "cm": np.zeros((3, 3)), "few": [1, 2]}
    flat = flatten_metrics(nested)
    assert flat == {"val/acc": 0.5, "val/per_class/a/f1": 1.0, "cm": "array of shape (3, 3)", "few": [1, 2]}


def test_table_rows_shapes():
    assert table_rows({"acc": 0.91234, "n": 10}) == (["metric", "value"], [["acc", "0.9123"], ["n", "10"]])
    cols, rows = table_rows({"cat": {"precision": 1.0, "support": 2}, "dog": {"precision": 0.5, "support": 1}})
    assert cols == ["", "precision", "support"] and rows == [["cat", "1.0000", "2"], ["dog", "0.5000", "1"]]
    cols, rows = table_rows([{"step": 1, "loss": 2.0}, {"step": 2, "acc": 0.5}])
    assert cols == ["step", "loss", "acc"] and rows[1] == ["2", "", "0.5000"]
    with pytest.raises(ValueError, match="needs `columns`"):
        table_rows([[1, 2]])
    with pytest.raises(ValueError, match="row 0: 1 cells but 2 columns"):
        table_rows([[1]], columns=["a", "b"])


# ------------------------------------------------------------------------------------------------ plots


def test_image_grid_with_captions_including_chinese(tmp_path):
    images = [
        Image.new("RGB", (16, 16), "red"),
        np.zeros((16, 16, 3), np.uint8),
        torch.ones(3, 16, 16) * 0.5,
        np.ones((20, 10), np.float32),  # grayscale, not square
        Image.new("RGBA", (64, 64), (0, 0, 255, 128)),
    ]
    captions = ["a small red circle", "", "左边一个红色的小圆形", "a very long caption " * 10, "x\ny"]
    grid = image_grid(images, captions, ncols=3, path=tmp_path / "g" / "grid.png", cell_size=64)
    assert (tmp_path / "g" / "grid.png").is_file()
    assert grid.size[0] == 3 * (64 + 4) + 4 and grid.size[1] > 2 * 64
    assert grid.getpixel((4 + 32, 4 + 32)) == (255, 0, 0)  # first cell upscaled (nearest), red
    # caption text is drawn in the band under the first image
    band = np.asarray(grid)[4 + 64 : 4 + 64 + 14, 4 : 4 + 64]
    assert (band < 128).any()
    assert image_grid(images[:2]).size[1] == 128 + 8  # no captions: no text band
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        image_grid(images[:2], ["one"])
    with pytest.raises(ValueError, match="at least one image"):
        image_grid([])


def test_to_pil_errors():
    with pytest.raises(TypeError, match="PIL image, numpy array or torch tensor"):
        to_pil("not an image")
    with pytest.raises(ValueError, match="channels"):
        to_pil(np.zeros((4, 4, 5)))


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_plot_loss_curve(tmp_path):
    rows = [{"step": s, "loss": 2.0 * math.exp(-s / 20), "lr": 1e-3} for s in range(1, 60)]
    rows.insert(30, {"step": 30, "val/loss": 0.9, "val/bleu_4": 0.3})
    path = plot_loss_curve(_write_jsonl(tmp_path / "metrics.jsonl", rows), tmp_path / "loss.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 400
    (tmp_path / "bad.jsonl").write_text('{"step": 1, "loss": 1}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        plot_loss_curve(tmp_path / "bad.jsonl", tmp_path / "x.png")
    with pytest.raises(ValueError, match="no rows with a numeric 'step'"):
        plot_loss_curve(_write_jsonl(tmp_path / "noloss.jsonl", [{"step": 1, "acc": 1}]), tmp_path / "x.png")
    with pytest.raises(FileNotFoundError, match="metrics file not found"):
        plot_loss_curve(tmp_path / "missing.jsonl", tmp_path / "x.png")


# ----------------------------------------------------------------------------------------------- report


def test_report_writes_markdown_and_self_contained_html(tmp_path):
    jsonl = _write_jsonl(tmp_path / "metrics.jsonl", [{"step": s, "loss": 1.0 / s} for s in range(1, 30)])
    report = ReportWriter(tmp_path / "run", "Shapes | captioner")
    report.section("Metrics").text("Scores on the test split <b>not bold</b>.")
    report.metrics({"test": {"bleu_4": 0.4123, "cider": 1.23456}, "cm": np.eye(2)})
    report.section("Per class", level=3).table({"circle": {"precision": 1.0, "support": 3}, "a|b": {"precision": 0.5}})
    grid_path = report.image_grid([Image.new("RGB", (8, 8), "blue")] * 3, ["one", "two", "三"], caption="Samples")
    cm_path = report.confusion_matrix(np.array([[2, 1], [0, 3]]), ["circle", "square"])
    curve_path = report.loss_curve(jsonl)
    again = report.image(Image.new("RGB", (4, 4)), caption="", name="samples")  # name clash -> samples_2
    paths = report.write()

    md = paths["markdown"].read_text(encoding="utf-8")
    assert md.startswith("# Shapes | captioner\n")
    assert "## Metrics" in md and "### Per class" in md
    assert "| test/bleu_4 | 0.4123 |" in md and "| test/cider | 1.2346 |" in md
    assert "| cm | array of shape (2, 2) |" in md
    assert "| a\\|b | 0.5000 |  |" in md  # pipes in cells escaped, missing cells empty
    for path in (grid_path, cm_path, curve_path, again):
        assert path.is_file() and path.parent == tmp_path / "run" / "images"
        assert f"](images/{path.name})" in md
    assert again.name == "samples_2.png"
    assert "*Samples*" in md

    page = paths["html"].read_text(encoding="utf-8")
    assert page.count("<table>") == 2 and "<td>test/bleu_4</td><td>0.4123</td>" in page
    assert "&lt;b&gt;not bold&lt;/b&gt;" in page and "<title>Shapes | captioner</title>" in page
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(embedded) == 4 and "images/" not in page  # self-contained
    assert base64.b64decode(embedded[1]) == cm_path.read_bytes()
