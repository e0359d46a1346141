"""Nasty images, written by the tests themselves, through the decoder and through a real (tiny) captioning run.

Under ``data.on_bad_image: skip`` training completes, reports exactly which images were skipped and why
(``skipped.jsonl`` in the run folder, the result dict, a printed count) and trains on every good image;
under the default policy the run stops with one clear error naming a bad file.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmlm.data import BadImageError, DataError, load_image

TINY_LM = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 128}


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int = 40_000) -> bytes:
    """A valid PNG header announcing side x side pixels (1.6 G) with almost no data: decoding it would need
    gigabytes, so it must be refused from the header."""
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale
    rows = zlib.compress(b"\x00" * (1 + side // 8) * 4)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", rows) + png_chunk(b"IEND", b"")


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def gradient(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return encoded(gradient(40, 20, 7), "JPEG", exif=exif)


def palette_with_transparency() -> bytes:
    image = Image.new("P", (16, 16), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.paste(1, (4, 4, 12, 12))
    return encoded(image, "PNG", transparency=0)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ("red", "green", "blue")]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


# name -> (bytes, size after decoding, or None for a bad file)
GOOD = {
    **{f"plain_{i}.png": (encoded(gradient(24, 24, i), "PNG"), (24, 24)) for i in range(6)},
    "one_pixel.png": (encoded(Image.new("RGB", (1, 1), "red"), "PNG"), (1, 1)),
    "very_wide.png": (encoded(gradient(400, 2, 1), "PNG"), (400, 2)),
    "very_tall.png": (encoded(gradient(2, 400, 2), "PNG"), (2, 400)),
    "sixteen_bit.png": (encoded(Image.fromarray(np.arange(256, dtype=np.uint16).reshape(16, 16) * 257), "PNG"),
                        (16, 16)),
    "cmyk.jpg": (encoded(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"), (16, 16)),
    "palette_transparent.png": (palette_with_transparency(), (16, 16)),
    "animated.gif": (animated_gif(), (16, 16)),
    "exif_rotated.jpg": (exif_rotated_jpeg(), (20, 40)),
}
BAD = {
    "zero_bytes.png": (b"", "empty file"),
    "truncated.png": (encoded(gradient(64, 64, 3), "PNG")[:300], "truncated"),
    "truncated.jpg": (encoded(gradient(64, 64, 4), "JPEG")[:400], "truncated"),
    "text_renamed.jpg": (b"this is a text file, not a JPEG\n" * 4, "not an image"),
    "bomb.png": (bomb_png(), "decompression bomb"),
}
MISSING = "missing.png"  # named in the manifest, never written


def write_corpus(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, (data, _) in {**GOOD, **BAD}.items():
        (folder / name).write_bytes(data)


@pytest.fixture
def corpus(tmp_path):
    write_corpus(tmp_path / "images")
    return tmp_path / "images"


@pytest.mark.parametrize("name", sorted(GOOD))
def test_good_but_unusual_images_decode_to_rgb(corpus, name):
    image = load_image(corpus / name)
    assert image.mode == "RGB" and image.size == GOOD[name][1]


@pytest.mark.parametrize("name", sorted(BAD) + [MISSING])
def test_bad_images_raise_a_bad_image_error_naming_the_file(corpus, name):
    with pytest.raises(BadImageError) as info:
        load_image(corpus / name)
    assert name in str(info.value) and info.value.path == str(corpus / name)
    expected = BAD[name][1] if name in BAD else "file not found"
    assert expected in info.value.reason.lower()


def test_exif_rotation_is_applied(corpus):
    assert load_image(corpus / "exif_rotated.jpg").size == (20, 40)  # stored 40x20, displayed upright
    assert np.asarray(load_image(corpus / "palette_transparent.png"))[0, 0].tolist() == [255, 255, 255]


# ----------------------------------------------------------------------------- a real training run


def write_manifests(root: Path, names: list[str]) -> tuple[Path, Path]:
    rows = [{"image": f"images/{name}", "caption": f"picture {i}"} for i, name in enumerate(names)]
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    val = root / "val.jsonl"
    val.write_text("".join(json.dumps(r) + "\n" for r in rows if r["image"].endswith("plain_0.png")),
                   encoding="utf-8")
    return train, val


def tiny_run(root: Path, train: Path, val: Path, **data) -> dict:
    return {
        "task": "captioning", "output_dir": str(root / "run"),
        "data": {"source": str(train), "val_source": str(val), "batch_size": 5, "eval_batch_size": 4, **data},
        "model": {"vision": {"name": "resnet10t", "features_only_stage": 1, "image_size": 32},
                  "projector": {"type": "mlp"}, "language": {"config": TINY_LM, "vocab_size": 300}},
        "train": {"epochs": 1, "warmup_steps": 0, "log_every": 1},
        "eval": {"splits": [], "num_examples": 1},
    }


def interleaved_names() -> list[str]:
    """Good and bad files mixed: 14 good, 5 bad + 1 missing = 20 rows, 4 batches of 5."""
    bad = sorted(BAD) + [MISSING]
    good = sorted(GOOD)
    names = []
    for i, name in enumerate(good):
        names.append(name)
        if i % 2 == 1 and bad:
            names.append(bad.pop())
    return names + bad


def test_skip_policy_trains_on_every_good_image_and_reports_the_bad_ones(tmp_path, corpus, monkeypatch, capsys):
    from mmlm import api
    from mmlm.tasks.captioning import VisionLanguageTask

    names = interleaved_names()
    assert len(names) == 20
    train, val = write_manifests(tmp_path, names)
    seen: list[int] = []
    collate = VisionLanguageTask.collate

    def counting_collate(self, samples):
        seen.extend(s["index"] for s in samples)
        return collate(self, samples)

    monkeypatch.setattr(VisionLanguageTask, "collate", counting_collate)
    result = api.train(tiny_run(tmp_path, train, val, on_bad_image="skip"))

    good_rows = {i for i, n in enumerate(names) if n in GOOD}
    assert result["step"] == 4 and result["samples_seen"] == 20 == len(seen)
    assert set(seen) == good_rows  # every good image was trained on; a bad row was replaced by a good one
    bad_rows = {f"train.jsonl:{i + 1}": n for i, n in enumerate(names) if n not in GOOD}
    skipped = [json.loads(line) for line in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    row_of = {s["source"]: s["source"].split(" (", 1)[0] for s in skipped}  # "train.jsonl:12 (/.../x.jpg)"
    assert sorted(row_of.values()) == sorted(bad_rows)
    for s in skipped:  # each bad row names its image file beside its line
        assert s["source"] == f"{row_of[s['source']]} ({tmp_path / 'images' / bad_rows[row_of[s['source']]]})"
    reasons = {bad_rows[row_of[s["source"]]]: s["reason"] for s in skipped}
    for name, reason in reasons.items():
        assert (BAD[name][1] if name in BAD else "file not found") in reason.lower()
    assert all(s["split"] == "train" for s in skipped)
    assert result["skipped_images"] == 6
    assert "skipped 6 bad images" in capsys.readouterr().out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_default_policy_stops_at_the_first_bad_image_naming_it(tmp_path, corpus, num_workers):
    from mmlm import api

    names = [n for n in interleaved_names() if n != MISSING]
    train, val = write_manifests(tmp_path, names)
    with pytest.raises(DataError) as info:
        api.train(tiny_run(tmp_path, train, val, num_workers=num_workers))
    message = str(info.value)
    named = [n for n in BAD if str(corpus / n) in message]
    assert len(named) == 1, message  # one file, the one that stopped the run
    assert BAD[named[0]][1] in message.lower() and "train.jsonl:" in message
    assert not (tmp_path / "run" / "model").exists()


def test_default_policy_names_a_missing_file_before_training(tmp_path, corpus):
    from mmlm import api

    train, val = write_manifests(tmp_path, sorted(GOOD) + [MISSING])
    with pytest.raises(DataError, match=rf"train\.jsonl:{len(GOOD) + 1}: image file not found: .*{MISSING}"):
        api.train(tiny_run(tmp_path, train, val))
