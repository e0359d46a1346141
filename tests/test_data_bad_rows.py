"""Bad rows name their image file beside their line (inspect, skip log); the per-sample ``prompt`` column."""

import io
import json

import pytest
from PIL import Image

from mmlm.data import DataError, ImageTextDataset, inspect_manifest, read_records


def png(size=(8, 6), noise=False):
    buffer = io.BytesIO()
    image = Image.effect_noise(size, 64).convert("RGB") if noise else Image.new("RGB", size, (0, 128, 255))
    image.save(buffer, format="PNG")
    return buffer.getvalue()


BAD_FILES = {  # name -> (bytes, reason)
    "zero.png": (b"", "empty file (0 bytes)"),
    "text.jpg": (b"just some text", "not an image"),
    "cut.png": (png((24, 24), noise=True)[:300], "corrupt or truncated"),
    "wide.png": (png((40, 30)), "exceeds max_pixels"),
}


@pytest.fixture
def manifest(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "good.png").write_bytes(png())
    rows = [{"image": "img/good.png", "caption": "fine", "prompt": "What colour is it?"}]
    for name, (data, _) in BAD_FILES.items():
        (tmp_path / "img" / name).write_bytes(data)
        rows.append({"image": f"img/{name}", "caption": "bad"})
    path = tmp_path / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_inspect_names_the_image_file_of_every_bad_image_beside_its_line(manifest):
    report = inspect_manifest(manifest, max_pixels=1000)
    folder = manifest.parent / "img"
    for line, (name, (_, reason)) in enumerate(BAD_FILES.items(), start=2):
        (row,) = [row for row in report.splitlines() if row.strip().startswith(f"manifest.jsonl:{line} ")]
        assert row.strip().startswith(f"manifest.jsonl:{line} ({folder / name}): ") and reason in row


def test_skip_log_names_the_image_file_of_every_skipped_row(manifest):
    (manifest.parent / "img" / "zero.png").unlink()  # a file gone after reading the manifest: skipped too
    dataset = ImageTextDataset(read_records(manifest, check_files=False), on_bad_image="skip", max_pixels=1000)
    assert all(dataset[i]["caption"] == "fine" for i in range(len(dataset)))
    skipped = dict(dataset.skipped)
    folder = manifest.parent / "img"
    reasons = {name: reason for name, (_, reason) in BAD_FILES.items()} | {"zero.png": "file not found"}
    assert skipped == {f"manifest.jsonl:{line} ({folder / name})": skipped[f"manifest.jsonl:{line} ({folder / name})"]
                       for line, name in enumerate(BAD_FILES, start=2)}
    for line, name in enumerate(BAD_FILES, start=2):
        assert reasons[name] in skipped[f"manifest.jsonl:{line} ({folder / name})"]


def test_prompt_column_reaches_the_samples_and_bad_prompts_name_the_row(manifest, tmp_path):
    dataset = ImageTextDataset(read_records(manifest, check_files=False)[:1])
    item = dataset[0]
    assert item["prompt"] == "What colour is it?" and item["caption"] == "fine"
    (tmp_path / "p.jsonl").write_text(json.dumps({"image": "img/good.png", "caption": "x", "prompt": 3}) + "\n")
    with pytest.raises(DataError, match=r"p.jsonl:1: 'prompt' must be a non-empty string"):
        read_records(tmp_path / "p.jsonl")
    (tmp_path / "p.csv").write_text("image,caption,prompt\nimg/good.png,a cat,How many cats?\nimg/good.png,x,\n")
    records = read_records(tmp_path / "p.csv")
    assert [ImageTextDataset(records)[i]["prompt"] for i in range(2)] == ["How many cats?", None]
