"""Bad input, property-based: every manifest reader and the config loader end in a parsed result or a
clear DataError / ConfigError that names the source (and the row); no other exception escapes.

Also: API misuse on tiny models gets a ValueError / TypeError that names the argument.

The example budget is fixed and derandomized, so CI time is bounded and failures reproduce.
"""

from __future__ import annotations

import csv
import io
import json
import re
import tarfile
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mmlm.config import ConfigError, RunConfig, apply_overrides, load_config, parse_override
from mmlm.data import DataError, Record, read_records, scan_records

EXAMPLES = 150
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Text that stresses decoders: every Unicode category (lone surrogates included), RTL marks,
# combining characters, NUL, line separators that str.splitlines honours but JSON does not.
ODD_TEXT = st.text(st.characters(codec=None), max_size=40) | st.sampled_from(
    ["", " ", "\x00", "\u2028", "\u0085", "\ufeff", "\u202e evil", "e\u0301", "😀" * 3, "\ud800", "猫が二匹", "\r\n"])
JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | ODD_TEXT
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(ODD_TEXT, inner, max_size=3), max_leaves=8)
ROW_KEYS = st.sampled_from(["image", "caption", "captions", "label", "attributes", "colour"]) | ODD_TEXT
IMAGE_VALUES = st.sampled_from(["a.png", "sub/b.jpg", "../outside.png", "/etc/passwd", "http://x/y.png", ""]) \
    | JSON_VALUES
HUGE = "word " * 20_000


def row_strategy():
    """Manifest rows: usually close to valid, with wrong types, missing and extra keys mixed in."""
    plausible = st.fixed_dictionaries(
        {"image": IMAGE_VALUES},
        optional={"caption": ODD_TEXT | JSON_VALUES | st.just(HUGE), "captions": st.lists(ODD_TEXT, max_size=3)
                  | JSON_VALUES, "label": JSON_VALUES, "attributes": JSON_VALUES})
    return plausible | st.dictionaries(ROW_KEYS, JSON_VALUES, max_size=5) | JSON_VALUES


def check_outcome(read, source_name: str) -> list[Record] | DataError:
    """``read()`` must return valid Records or raise a DataError naming ``source_name``."""
    try:
        records = read()
    except DataError as err:
        assert source_name in str(err), f"error does not name the source: {err}"
        return err
    for record in records:
        assert isinstance(record, Record)
        assert isinstance(record.captions, list) and all(isinstance(c, str) for c in record.captions)
        for caption in record.captions:
            caption.encode("utf-8")  # no lone surrogates: every caption can reach a tokenizer and a JSON file
        assert record.label is None or isinstance(record.label, str)
        assert record.source, "a record must say where it came from"
    return records


def check_row_named(err: DataError, name: str) -> None:
    """Row errors name the line/row/key right after the file name."""
    assert re.search(re.escape(name) + r"(:\d+|:annotations\[\d+\]|:images\[\d+\]|:\S)", str(err)) \
        or re.search(re.escape(name) + r"\b", str(err)), str(err)


def check_inside(records: list[Record], root: Path) -> None:
    for record in records:
        assert Path(record.image).resolve().is_relative_to(root.resolve()), record.image


# ----------------------------------------------------------------------------- JSONL


@SETTINGS
@given(st.binary(max_size=300))
@example(b"\xff\xfe{}")
@example(b'{"image": "a.png", "caption": "\\ud800"}\n')
@example(b'{"image": "a.png", "caption": "x"}\n\x00\n')
def test_jsonl_arbitrary_bytes(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "manifest.jsonl"
        path.write_bytes(data)
        outcome = check_outcome(lambda: read_records(path, check_files=False), "manifest.jsonl")
        if not isinstance(outcome, DataError):
            check_inside(outcome, Path(tmp))


@SETTINGS
@given(st.lists(row_strategy(), max_size=4), st.booleans())
@example([{"image": "a.png", "caption": HUGE}], False)
@example([{"image": "a.png", "caption": ""}], False)
@example([{"image": "a.png", "captions": [], "label": 3}], False)
@example([{"image": "a.png", "caption": "x", "attributes": {"colour": ["red"]}}], False)
def test_jsonl_rows(rows, ascii_only):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "manifest.jsonl"
        lines = [json.dumps(r, ensure_ascii=ascii_only) for r in rows]
        path.write_bytes("\n".join(lines).encode("utf-8", errors="surrogatepass"))
        outcome = check_outcome(lambda: read_records(path, check_files=False, label_field="colour"),
                                "manifest.jsonl")
        if isinstance(outcome, DataError):
            check_row_named(outcome, "manifest.jsonl")
        else:
            check_inside(outcome, Path(tmp))
        # the lenient scan used by `mmlm data inspect` reports every row instead of stopping
        try:
            items = list(scan_records(path, check_files=False))
        except DataError as err:  # a whole-file problem (not UTF-8) stops the scan too
            assert "manifest.jsonl" in str(err)
        else:
            assert all(isinstance(i, (Record, DataError)) for i in items)


# ----------------------------------------------------------------------------- CSV


@SETTINGS
@given(st.binary(max_size=300))
@example(b"image,caption\n\"a.png,unterminated\n")
@example(b"image,caption\na.png,x,extra\n")
@example(b"image,captions\na.png,[1,2]\n")
def test_csv_arbitrary_bytes(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.csv"
        path.write_bytes(data)
        check_outcome(lambda: read_records(path, check_files=False), "data.csv")


CELLS = ODD_TEXT | st.sampled_from(["a.png", "../x.png", "[\"a\", \"b\"]", "[1]", "{}", HUGE])


@SETTINGS
@given(st.lists(st.sampled_from(["image", "caption", "captions", "label"]) | ODD_TEXT, min_size=1, max_size=4),
       st.lists(st.lists(CELLS, max_size=5), max_size=4))
def test_csv_rows(header, rows):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.csv"
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(header)
        writer.writerows(rows)
        path.write_bytes(buffer.getvalue().encode("utf-8", errors="surrogatepass"))
        outcome = check_outcome(lambda: read_records(path, check_files=False), "data.csv")
        if not isinstance(outcome, DataError):
            check_inside(outcome, Path(tmp))


# ----------------------------------------------------------------------------- COCO JSON


COCO_IDS = st.integers(0, 3) | st.sampled_from([None, "1", [1], {"a": 1}, 1.0, True])


@SETTINGS
@given(st.lists(st.fixed_dictionaries({"id": COCO_IDS}, optional={"file_name": IMAGE_VALUES, "label": JSON_VALUES})
                | JSON_VALUES, max_size=4),
       st.lists(st.fixed_dictionaries({"image_id": COCO_IDS}, optional={"caption": ODD_TEXT | JSON_VALUES})
                | JSON_VALUES, max_size=4),
       st.booleans())
@example([{"id": [1], "file_name": "a.png"}], [{"image_id": [1], "caption": "x"}], False)
@example([{"id": 1, "file_name": "a.png"}], [{"image_id": {"a": 1}, "caption": "x"}], False)
def test_coco_structures(images, annotations, wrap_in_list):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "captions.json"
        data = {"images": images, "annotations": annotations}
        path.write_text(json.dumps([data] if wrap_in_list else data), encoding="utf-8", errors="surrogatepass")
        outcome = check_outcome(lambda: read_records(path, check_files=False), "captions.json")
        if not isinstance(outcome, DataError):
            check_inside(outcome, Path(tmp))


@SETTINGS
@given(st.binary(max_size=200))
def test_coco_arbitrary_bytes(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "captions.json"
        path.write_bytes(data)
        check_outcome(lambda: read_records(path, check_files=False), "captions.json")


# ----------------------------------------------------------------------------- webdataset shards


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


MEMBER_NAMES = st.builds(lambda key, ext: f"{key}.{ext}", st.sampled_from(["s0", "s1", "d/s2", ".hidden", "s 3"]),
                         st.sampled_from(["png", "jpg", "txt", "json", "cls", "caption", "weird.ext", "PNG"]))
MEMBER_DATA = st.binary(max_size=40) | JSON_VALUES.map(
    lambda v: json.dumps(v).encode("utf-8", errors="surrogatepass")) | ODD_TEXT.map(
    lambda t: t.encode("utf-8", errors="surrogatepass"))


@SETTINGS
@given(st.lists(st.tuples(MEMBER_NAMES, MEMBER_DATA), max_size=5), st.integers(0, 2000),
       st.sampled_from(["plain", "gzip-header", "truncate"]))
def test_webdataset_shards(members, cut, damage):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard-000.tar"
        data = tar_bytes(members)
        if damage == "truncate":
            data = data[: min(cut, len(data))]
        elif damage == "gzip-header":
            data = b"\x1f\x8b\x08\x00" + data[:cut]  # gzip magic, then garbage: a corrupt compressed shard
        path.write_bytes(data)
        check_outcome(lambda: read_records(path), "shard-000.tar")


@SETTINGS
@given(st.binary(max_size=300))
@example(b"BZh91AY&SY" + b"\x00" * 40)
@example(b"\xfd7zXZ\x00" + b"\x00" * 40)
def test_webdataset_arbitrary_bytes(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard-000.tar"
        path.write_bytes(data)
        check_outcome(lambda: read_records(path), "shard-000.tar")


# ----------------------------------------------------------------------------- the config loader


SECTION_KEYS = {
    "": ["task", "output_dir", "seed", "data", "model", "train", "eval"],
    "data": ["source", "format", "batch_size", "num_workers", "on_bad_image", "val_fraction", "shapes",
             "allow_absolute_paths", "max_image_pixels", "caption_choice"],
    "train": ["lr", "max_steps", "betas", "module_lr", "grad_accum_steps", "schedule", "mixed_precision", "ema_decay"],
    "eval": ["splits", "labels", "templates", "samplers", "max_samples"],
    "model": ["vision", "projector", "language", "max_length", "denoiser", "text_encoder", "image_size", "space",
              "guidance_scale", "num_inference_steps"],
}
CONFIG_VALUES = JSON_VALUES | st.sampled_from(["3e-4", "1e", ".5", "-0", "yes", "null", [0.9, 0.99], {"a": 1}])


@st.composite
def config_dicts(draw):
    data: dict = {}
    for section in ("", "data", "train", "eval", "model"):
        keys = draw(st.lists(st.sampled_from(SECTION_KEYS[section]) | ODD_TEXT, max_size=3))
        target = data if section == "" else data.setdefault(section, {})
        if not isinstance(target, dict):  # the top level set this section to a scalar: keep it that way
            continue
        for key in keys:
            target[key] = draw(CONFIG_VALUES)
    if draw(st.booleans()):
        data["task"] = draw(st.sampled_from(["captioning", "classification", "diffusion", "captionning", ""]))
    if draw(st.booleans()) and isinstance(data.get("model"), dict):
        sub = draw(st.sampled_from(["vision", "language", "projector", "denoiser", "text_encoder", "vae"]))
        data["model"][sub] = draw(st.dictionaries(
            st.sampled_from(["name", "num_heads", "hidden_size", "num_layers", "block_out_channels", "vocab_size",
                             "config", "type", "lora_rank", "kind", "norm_num_groups", "attention"]) | ODD_TEXT,
            CONFIG_VALUES | st.integers(-2, 2), max_size=3))
    return data


def check_config(load, name: str) -> RunConfig | ConfigError:
    try:
        cfg = load()
    except ConfigError as err:
        assert name in str(err) or not name, f"error does not name the source: {err}"
        return err
    assert isinstance(cfg, RunConfig)
    return cfg


@SETTINGS
@given(config_dicts())
@example({"task": "diffusion", "model": {"denoiser": {"num_heads": 0, "hidden_size": 16}}})
@example({"train": {"betas": [0.9]}})
@example({"data": {"batch_size": 0}})
def test_config_dicts(data):
    outcome = check_config(lambda: load_config(data), "")
    if isinstance(outcome, ConfigError):
        assert re.search(r"'?[\w.\[\]]+'?", str(outcome))


@SETTINGS
@given(st.binary(max_size=300) | config_dicts().map(lambda d: yaml.safe_dump(d, allow_unicode=True).encode(
    "utf-8", errors="surrogatepass")))
@example(b"a: 2024-01-01\n")
@example(b"data: !!set {a, b}\n")
@example(b"seed: !!binary aGVsbG8=\n")
@example(b"train:\n  max_steps: 1\n  lr: .inf\n")
@example(b"- 1\n- 2\n")
@example(b"&a [*a]")
def test_config_yaml_bytes(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_bytes(data)
        check_config(lambda: load_config(path), "recipe.yaml")


@SETTINGS
@given(st.lists(ODD_TEXT | st.builds(lambda k, v: f"{k}={v}", st.sampled_from(
    ["train.lr", "data.batch_size", "data", "train.lr.x", "model.language.config", "a..b", "=", "seed"]),
    ODD_TEXT | st.sampled_from(["[1, 2", "{a: 1}", "2024-01-01", "!!binary aGk=", "3e-4", "null"])), max_size=3))
def test_config_overrides(overrides):
    try:
        for text in overrides:
            parse_override(text)
    except ConfigError as err:
        assert "override" in str(err)
        return
    check_config(lambda: load_config({"train": {"max_steps": 1}}, overrides), "")


def test_apply_overrides_keeps_yaml_only_values():
    """Dates and binary values from YAML do not crash the override step (they fail typed validation instead)."""
    data = apply_overrides({"output_dir": yaml.safe_load("2024-01-01")}, ["seed=3"])
    assert data["seed"] == 3
    with pytest.raises(ConfigError, match="output_dir"):
        load_config({"output_dir": yaml.safe_load("2024-01-01")}, ["seed=3"])


# ----------------------------------------------------------------------------- API misuse on tiny models


@pytest.fixture(scope="module")
def tiny_vlm():
    import torch

    from mmlm.models import LanguageConfig, ProjectorConfig, VisionConfig, VisionLanguageModel, VLMConfig

    torch.manual_seed(0)
    config = VLMConfig(vision=VisionConfig(name="resnet10t", features_only_stage=1, image_size=32),
                       projector=ProjectorConfig(type="mlp"),
                       language=LanguageConfig(config={"model_type": "llama", "hidden_size": 32,
                                                       "intermediate_size": 64, "num_hidden_layers": 1,
                                                       "num_attention_heads": 2, "num_key_value_heads": 2,
                                                       "max_position_embeddings": 128}, vocab_size=300))
    return VisionLanguageModel.from_config(config, corpus=["a red circle", "a blue square"]).eval()


@pytest.fixture(scope="module")
def tiny_t2i():
    import torch

    from mmlm.models.diffusion import DenoiserConfig, TextToImage, TextToImageConfig
    from mmlm.models.diffusion import TextEncoderConfig

    torch.manual_seed(0)
    config = TextToImageConfig(image_size=16, space="pixel",
                               denoiser=DenoiserConfig(block_out_channels=(8, 16), attention=(False, True),
                                                       norm_num_groups=4, hidden_size=16, num_layers=1),
                               text_encoder=TextEncoderConfig(hidden_size=16, num_layers=1, num_heads=1,
                                                              max_length=8, vocab_size=300))
    return TextToImage.from_config(config, corpus=["a red circle", "a blue square"])


def red_image():
    from PIL import Image

    return Image.new("RGB", (32, 32), "red")


@pytest.mark.parametrize("call, error, message", [
    (lambda m: m.caption([]), ValueError, "images"),
    (lambda m: m.classify([], ["a", "b"]), ValueError, "images"),
    (lambda m: m.classify(red_image(), []), ValueError, "labels"),
    (lambda m: m.classify(red_image(), ["red", "red"]), ValueError, "duplicate"),
    (lambda m: m.classify(red_image(), "red"), TypeError, "labels"),
    (lambda m: m.classify(red_image(), ["red", ""]), ValueError, r"labels\[1\]"),
    (lambda m: m.classify(red_image(), ["red", "blue"], prompt="a photo"), ValueError, r"\{\}"),
    (lambda m: m.classify(red_image(), ["red", "blue"], prompt="{} or {}"), ValueError, r"\{\}"),
    (lambda m: m.caption([red_image(), 42]), TypeError, "int"),
    (lambda m: m.caption("no/such/image.png"), ValueError, "image.png"),
    (lambda m: m.caption(red_image(), max_new_tokens=0), ValueError, "max_new_tokens"),
    (lambda m: m.caption([red_image()] * 2, prompt=["a", "b", "c"]), ValueError, "prompt"),
], ids=["caption-empty", "classify-empty", "labels-empty", "labels-duplicate", "labels-str", "labels-blank",
        "prompt-no-slot", "prompt-two-slots", "image-int", "image-missing", "zero-tokens", "prompt-count"])
def test_vlm_misuse(tiny_vlm, call, error, message):
    with pytest.raises(error, match=message):
        call(tiny_vlm)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"prompts": []}, ValueError, "prompts"),
    ({"prompts": ["a red circle"], "guidance_scale": -1.0}, ValueError, "guidance_scale"),
    ({"prompts": ["a red circle"], "num_inference_steps": 0}, ValueError, "num_inference_steps"),
    ({"prompts": ["a red circle"], "scheduler": "nope"}, ValueError, "scheduler"),
    ({"prompts": [3]}, TypeError, "prompts"),
    ({"prompts": ["a", "b"], "negative_prompt": ["x", "y", "z"]}, ValueError, "negative_prompt"),
    ({"prompts": ["a"], "batch_size": 0}, ValueError, "batch_size"),
], ids=["empty", "negative-guidance", "zero-steps", "bad-scheduler", "prompt-int", "negatives-count", "batch-0"])
def test_text_to_image_misuse(tiny_t2i, kwargs, error, message):
    with pytest.raises(error, match=message):
        tiny_t2i.generate(**kwargs)
