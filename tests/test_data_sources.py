"""Readers (JSONL, CSV, COCO, ImageFolder, webdataset shards, HF datasets), datasets, splits and inspection."""

import io
import json
import tarfile

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mmlm.config import DataConfig, ShapesConfig
from mmlm.data.images import load_image
from mmlm.data import (
    BadImageError,
    DataError,
    ImageTextDataset,
    Record,
    StreamingImageTextDataset,
    build_datasets,
    collate_image_text,
    detect_format,
    inspect_manifest,
    iter_records,
    read_records,
    summarize,
    write_shapes_cli,
)


def to_tensor(image):
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image.height, image.width, 3)


def png_bytes(colour=(255, 0, 0), size=(8, 6)):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def truncated_png():
    """A PNG whose header is fine but whose pixel data stops half way."""
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


@pytest.fixture
def folder(tmp_path):
    """A manifest folder with three images, one of them corrupt."""
    (tmp_path / "img").mkdir()
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0)]):
        (tmp_path / "img" / f"{i}.png").write_bytes(png_bytes(colour))
    (tmp_path / "img" / "bad.png").write_bytes(truncated_png())
    return tmp_path


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_jsonl_manifest_with_caption_captions_label_and_extras(folder):
    path = write_jsonl(folder / "data.jsonl", [
        {"image": "img/0.png", "caption": "a red thing", "label": "red", "split_hint": 3},
        "",
        {"image": "img/1.png", "captions": ["green", "a green thing"]},
        {"image": "img/0.png", "label": 7},
    ])
    records = read_records(path)
    assert [r.captions for r in records] == [["a red thing"], ["green", "a green thing"], []]
    assert [r.label for r in records] == ["red", None, "7"]
    assert records[0].attributes == {"split_hint": 3}
    assert records[0].image == (folder / "img" / "0.png").resolve() and records[1].source == "data.jsonl:3"
    assert detect_format(path) == "jsonl"
    write_jsonl(folder / "manifest.jsonl", [{"image": "img/0.png", "caption": "x"}])
    assert detect_format(folder) == "jsonl" and len(read_records(folder)) == 1


@pytest.mark.parametrize("line, message", [
    ('{"image": "img/0.png", "caption": "ok"', "data.jsonl:2: invalid JSON"),
    ('["img/0.png", "x"]', "data.jsonl:2: expected a JSON object"),
    ('{"caption": "no image"}', "data.jsonl:2: missing key 'image'"),
    ('{"image": "img/0.png"}', "data.jsonl:2: missing key 'caption' or 'captions'"),
    ('{"image": "img/0.png", "caption": 5}', "data.jsonl:2: 'caption' must be a string"),
    ('{"image": "img/0.png", "captions": "one"}', "data.jsonl:2: 'captions' must be a list of strings"),
    ('{"image": 3, "caption": "x"}', "data.jsonl:2: 'image' must be a non-empty string"),
    ('{"image": "img/nope.png", "caption": "x"}', "data.jsonl:2: image file not found"),
    ('{"image": "../../outside.txt", "caption": "x"}', "data.jsonl:2: image path '../../outside.txt' escapes"),
    ('{"image": "/etc/hostname", "caption": "x"}', "data.jsonl:2: absolute image path"),
    ('{"image": "https://x.org/a.png", "caption": "x"}', "data.jsonl:2: image 'https://x.org/a.png' is a URL"),
])
def test_jsonl_errors_name_file_line_and_problem(folder, line, message):
    path = write_jsonl(folder / "data.jsonl", [{"image": "img/0.png", "caption": "ok"}, line])
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace("?", r"\?").replace(".", r"\.")):
        read_records(path)


def test_non_utf8_bytes_name_the_line(folder):
    path = folder / "data.jsonl"
    path.write_bytes(b'{"image": "img/0.png", "caption": "ok"}\n{"image": "img/0.png", "caption": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"data\.jsonl:2: not UTF-8"):
        read_records(path)


def test_escaping_and_absolute_paths_only_with_permission(tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes(png_bytes())
    (tmp_path / "sub").mkdir()
    path = write_jsonl(tmp_path / "sub" / "m.jsonl", [{"image": "../outside.png", "caption": "up"},
                                                      {"image": str(outside), "caption": "abs"}])
    with pytest.raises(DataError, match="escapes"):
        read_records(path)
    records = read_records(path, allow_absolute_paths=True)
    assert [r.image for r in records] == [outside.resolve(), outside]


def test_missing_files_can_be_deferred_to_decoding(folder):
    path = write_jsonl(folder / "m.jsonl", [{"image": "img/gone.png", "caption": "x"}])
    (record,) = read_records(path, check_files=False)
    with pytest.raises(BadImageError, match="gone.png: file not found"):
        ImageTextDataset([record])[0]


def test_csv_manifest(folder):
    path = folder / "data.csv"
    path.write_text('image,caption,label\nimg/0.png,"a red, square thing",red\nimg/1.png,green,\n', encoding="utf-8")
    records = read_records(path)
    assert [(r.captions, r.label) for r in records] == [(["a red, square thing"], "red"), (["green"], None)]
    (folder / "multi.csv").write_text('image,captions\nimg/0.png,"[""a"", ""b""]"\n', encoding="utf-8")
    assert read_records(folder / "multi.csv")[0].captions == ["a", "b"]
    (folder / "tabs.tsv").write_text("image\tcaption\nimg/1.png\tgreen, with a comma\n", encoding="utf-8")
    assert read_records(folder / "tabs.tsv")[0].captions == ["green, with a comma"]
    (folder / "bad.csv").write_text("file,caption\nimg/0.png,x\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.csv:1: CSV header must have an 'image' column"):
        read_records(folder / "bad.csv")
    (folder / "missing.csv").write_text("image,caption\nimg/0.png,x\nimg/none.png,y\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"missing\.csv:3: image file not found"):
        read_records(folder / "missing.csv")


def test_coco_captions(folder):
    coco = {"images": [{"id": 10, "file_name": "img/0.png"}, {"id": 11, "file_name": "img/1.png"}],
            "annotations": [{"image_id": 10, "caption": "first"}, {"image_id": 11, "caption": "other"},
                            {"image_id": 10, "caption": "second"}]}
    path = folder / "captions.json"
    path.write_text(json.dumps(coco))
    records = read_records(path)
    assert detect_format(path) == "coco"
    assert [r.captions for r in records] == [["first", "second"], ["other"]]
    assert records[0].attributes == {"id": 10} and records[1].source == "captions.json:images[1]"
    coco["annotations"].append({"image_id": 99, "caption": "orphan"})
    path.write_text(json.dumps(coco))
    with pytest.raises(DataError, match=r"annotations\[3\]: image_id 99 is not in 'images'"):
        read_records(path)
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="needs lists 'images' and 'annotations'"):
        read_records(path)


def test_imagefolder(tmp_path):
    for label in ("cat", "dog"):
        (tmp_path / "pets" / label).mkdir(parents=True)
        (tmp_path / "pets" / label / "a.png").write_bytes(png_bytes())
    (tmp_path / "pets" / "dog" / "notes.txt").write_text("ignored")
    records = read_records(tmp_path / "pets")
    assert detect_format(tmp_path / "pets") == "imagefolder"
    assert [(r.label, r.captions, r.source) for r in records] == [("cat", [], "pets/cat/a.png"),
                                                                 ("dog", [], "pets/dog/a.png")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        read_records(tmp_path / "empty", format="imagefolder")


def write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def shards(tmp_path):
    for s in range(3):
        samples = [(f"s{s}_{i}", {"png": png_bytes((40 * i, 0, 0)), "txt": f"shard {s} item {i}".encode()})
                   for i in range(4)]
        samples[1] = (f"s{s}_1", {"png": truncated_png(), "json": json.dumps({"caption": "broken"}).encode()})
        meta = json.dumps({"captions": ["a", "b"], "label": "x"}).encode()
        samples[2] = (f"s{s}_2", {"png": png_bytes(), "json": meta})
        write_shard(tmp_path / f"shard-{s:04d}.tar", samples)
    return tmp_path


def test_webdataset_shards_by_brace_and_glob(shards):
    pattern = str(shards / "shard-{0000..0002}.tar")
    assert detect_format(pattern) == "webdataset"
    records = read_records(pattern)
    assert len(records) == 12 and records[0].source == "shard-0000.tar:s0_0"
    assert records[0].captions == ["shard 0 item 0"] and isinstance(records[0].image, bytes)
    assert records[2].captions == ["a", "b"] and records[2].label == "x"
    assert [r.source for r in iter_records(str(shards / "shard-*.tar"))] == [r.source for r in records]
    with pytest.raises(DataError, match="no webdataset shards"):
        read_records(str(shards / "none-*.tar"))


def test_streaming_dataset_shards_across_workers_and_skips_bad_samples(shards):
    dataset = StreamingImageTextDataset(str(shards / "shard-{0000..0002}.tar"), to_tensor, on_bad_image="skip")
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_image_text)
    captions = [c for batch in loader for c in batch["caption"]]
    assert sorted(captions) == sorted([f"shard {s} item {i}" for s in range(3) for i in (0, 3)] + ["a"] * 3)
    assert sorted(source for source, _ in dataset.skipped) == [f"shard-{s:04d}.tar:s{s}_1" for s in range(3)]
    strict = StreamingImageTextDataset(str(shards / "shard-0000.tar"), on_bad_image="error")
    with pytest.raises(BadImageError, match=r"shard-0000\.tar:s0_1: corrupt or truncated"):
        list(strict)


def test_truncated_shard_is_an_error_or_a_skip(shards):
    noisy = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(noisy, format="PNG")
    data = write_shard(shards / "whole.tar", [(f"k{i}", {"png": noisy.getvalue()}) for i in range(3)]).read_bytes()
    (shards / "cut.tar").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.tar: unreadable or truncated"):
        list(StreamingImageTextDataset(str(shards / "cut.tar")))
    lenient = StreamingImageTextDataset(str(shards / "cut.tar"), on_bad_image="skip")
    assert [item["index"] for item in lenient] and "after key 'k0'" in lenient.skipped[0][1]


def test_hugging_face_datasets_on_disk_and_in_memory(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["cat", "dog"])})
    images = [Image.new("RGB", (5, 4), (255, 0, 0)), Image.new("RGB", (5, 4), (0, 0, 255))]
    dataset = datasets.Dataset.from_dict({"image": images, "text": ["a cat", "a dog"], "label": [0, 1]},
                                         features=features)
    records = read_records(dataset)
    assert [(r.captions, r.label) for r in records] == [(["a cat"], "cat"), (["a dog"], "dog")]
    dataset.save_to_disk(str(tmp_path / "hf"))
    assert detect_format(tmp_path / "hf") == "hf"
    from_disk = read_records(tmp_path / "hf")
    assert from_disk[1].label == "dog"
    assert ImageTextDataset(from_disk)[1]["pixel_values"].getpixel((0, 0)) == (0, 0, 255)
    datasets.DatasetDict({"train": dataset}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="DatasetDict with splits"):
        read_records(tmp_path / "dd")
    with pytest.raises(DataError, match="no image column"):
        read_records(datasets.Dataset.from_dict({"text": ["x"]}))


def test_image_text_dataset_items_and_epoch_caption_choice():
    image = Image.new("RGB", (4, 4))
    records = [Record(image, [f"c{i}-{k}" for k in range(4)], label="l", attributes={"n": i}) for i in range(30)]
    dataset = ImageTextDataset(records, to_tensor)
    item = dataset[3]
    assert set(item) == {"pixel_values", "caption", "captions", "prompt", "label", "attributes", "index"}
    assert item["caption"] == "c3-0" and item["index"] == 3 and item["pixel_values"].shape == (4, 4, 3)
    dataset.set_epoch(1)
    epoch1 = [dataset[i]["caption"] for i in range(30)]
    assert epoch1 == [dataset[i]["caption"] for i in range(30)]  # deterministic per (index, epoch)
    dataset.set_epoch(2)
    epoch2 = [dataset[i]["caption"] for i in range(30)]
    assert epoch1 != epoch2 and len({c.split("-")[1] for c in epoch1}) > 1
    assert ImageTextDataset([Record(image, [])])[0]["caption"] == ""
    with pytest.raises(ValueError, match="on_bad_image"):
        ImageTextDataset(records, on_bad_image="ignore")


def test_skip_policy_substitutes_and_records_across_workers(folder):
    names = ["0.png", "bad.png", "1.png", "missing.png", "0.png", "bad.png"]
    records = [Record(folder / "img" / n, [n], source=f"m:{i}") for i, n in enumerate(names)]
    with pytest.raises(BadImageError, match=r"bad\.png: corrupt or truncated .*record m:1"):
        ImageTextDataset(records)[1]
    dataset = ImageTextDataset(records, to_tensor, on_bad_image="skip")
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_image_text)
    batches = list(loader)
    assert [c for b in batches for c in b["caption"]] == ["0.png", "1.png", "1.png", "0.png", "0.png", "0.png"]
    assert batches[0]["index"] == [0, 2] and batches[0]["pixel_values"].shape == (2, 6, 8, 3)
    skipped = {source.split(" ")[0]: reason for source, reason in dataset.skipped}
    assert sorted(skipped) == ["m:1", "m:3", "m:5"] and skipped["m:3"] == "file not found"
    assert skipped["m:1"].startswith("corrupt or truncated") and skipped["m:5"].startswith("corrupt or truncated")
    assert dict(dataset.skipped)[f"m:3 ({folder / 'img' / 'missing.png'})"] == "file not found"  # the file, named
    all_bad = ImageTextDataset(records[1:2], on_bad_image="skip")
    with pytest.raises(DataError, match="every one of the 1 images is bad"):
        all_bad[0]


def test_build_datasets_for_shapes_digits_and_manifests(folder):
    shapes = DataConfig(source="shapes", label_field="colour",
                        shapes=ShapesConfig(n_train=5, n_val=2, n_test=3, n_compositional=2))
    built = build_datasets(shapes, to_tensor, None)
    assert {k: len(v) for k, v in built.items()} == {"train": 5, "val": 2, "test": 3, "compositional": 2}
    item = built["test"][0]
    assert item["label"] == item["attributes"]["colour"] and item["pixel_values"] is not None
    assert built["val"][0]["pixel_values"].size == (64, 64)  # eval transform None -> PIL image
    digits = build_datasets(DataConfig(source="digits"), None, None)
    assert set(digits) == {"train", "val", "test"} and digits["val"][0]["label"] in {"zero", "one", "two", "three",
        "four", "five", "six", "seven", "eight", "nine"}

    rows = [{"image": f"img/{i % 2}.png", "caption": f"row {i}"} for i in range(20)]
    manifest = write_jsonl(folder / "m.jsonl", rows)
    config = DataConfig(source=str(manifest), val_fraction=0.2)
    split = build_datasets(config, None, None)
    assert len(split["train"]) == 16 and len(split["val"]) == 4 and "test" not in split
    again = build_datasets(config, None, None)
    assert [r.source for r in again["val"].records] == [r.source for r in split["val"].records]
    with_sources = build_datasets(DataConfig(source=str(manifest), val_source=str(manifest),
                                             test_source=str(manifest)), None, None)
    assert [len(with_sources[k]) for k in ("train", "val", "test")] == [20, 20, 20]


def test_build_datasets_for_shards(shards):
    config = DataConfig(source=str(shards / "shard-*.tar"), on_bad_image="skip", val_fraction=0.3)
    built = build_datasets(config, None, None)
    train = {item["index"] for item in built["train"]}
    val = {item["index"] for item in built["val"]}
    assert train and val and not train & val and len(train | val) == 9  # 12 samples, 3 with corrupt images


def test_summarize_and_inspect_report_every_bad_row(folder):
    write_jsonl(folder / "m.jsonl", [
        {"image": "img/0.png", "caption": "one two three", "label": "a"},
        "{not json",
        {"image": "img/bad.png", "caption": "x"},
        {"image": "img/none.png", "caption": "x"},
        {"image": "img/1.png", "captions": ["a b", "c"], "label": "b"},
    ])
    report = inspect_manifest(folder / "m.jsonl")
    assert "records: 3" in report and "8x6" in report and "RGB" in report
    assert "bad rows: 3" in report
    assert "m.jsonl:2: invalid JSON" in report and "m.jsonl:4: image file not found" in report
    assert f"m.jsonl:3 ({folder / 'img' / 'bad.png'}): corrupt or truncated" in report
    summary = summarize([Record(folder / "img" / "0.png", ["one two three"], label="a")])
    assert summary["records"] == 1 and summary["caption_length"]["max"] == 3 and summary["labels"] == {"a": 1}


def test_write_shapes_cli_writes_a_readable_manifest(tmp_path):
    text = write_shapes_cli(tmp_path / "out", n=6, seed=3, image_size=32)
    assert "wrote 6 train images" in text and "32x32" in text and "bad rows: 0" in text
    records = read_records(tmp_path / "out" / "manifest.jsonl")
    assert len(records) == 6 and load_image(records[0].image).size == (32, 32)
