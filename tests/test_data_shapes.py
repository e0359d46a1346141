"""The procedural shapes dataset, its caption grammar (en/zh), and the digits records."""

import hashlib
import itertools
import json
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmlm.config import ShapesConfig
from mmlm.data import (
    COLOURS,
    HELD_OUT_PAIRS,
    POSITIONS,
    SHAPE_KINDS,
    SIZES,
    ShapesRecords,
    canonical_caption,
    captions_match,
    digits_records,
    digits_split_indices,
    generate_shapes,
    parse_caption,
    read_records,
    write_dataset,
)
from mmlm.data.images import load_image
from mmlm.data.shapes import caption_paraphrases, make_shapes_record

# sha256 prefixes of (image bytes, captions+attributes JSON) computed by this generator (seed 0, Pillow 13, numpy 2).
EXPECTED = {
    ("train", 0): ("b3c350190d2b492a", "5e280d51efdb3f31"),
    ("train", 5): ("33a69110c98cedfa", "04905f4524d97640"),
    ("train", 123): ("95e0deac52842af0", "57ac1bedb35afa80"),
    ("compositional", 0): ("26e3217119e0c7a3", "af1bf317ffc665bb"),
    ("compositional", 5): ("cb77f9bd7c19b8e8", "b58b5df2ec475835"),
    ("compositional", 123): ("3539b0bc9d6d0da7", "b0b1bf8957122dd7"),
}


def _digests(record):
    image = hashlib.sha256(record.image.tobytes()).hexdigest()[:16]
    meta = hashlib.sha256(json.dumps([record.captions, record.attributes], sort_keys=True).encode()).hexdigest()[:16]
    return image, meta


def test_samples_hash_to_known_constants_and_do_not_depend_on_n():
    for (split, index), expected in EXPECTED.items():
        assert _digests(make_shapes_record(index, split=split)) == expected
    # sample i is the same whether 6 or 124 samples are drawn
    assert _digests(generate_shapes(6)[5]) == EXPECTED[("train", 5)]


def test_generation_is_identical_in_a_fresh_process():
    code = ("import hashlib; from mmlm.data.shapes import make_shapes_record as m; "
            "print(hashlib.sha256(m(5, split='train').image.tobytes()).hexdigest()[:16])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == EXPECTED[("train", 5)][0]


def test_seed_and_split_change_the_samples():
    base = _digests(make_shapes_record(0))
    assert _digests(make_shapes_record(0, seed=1)) != base
    assert _digests(make_shapes_record(0, split="val")) != base


def test_default_images_are_64x64_rgb_and_size_is_configurable():
    assert all(r.image.size == (64, 64) and r.image.mode == "RGB" for r in generate_shapes(4))
    assert generate_shapes(1, config=ShapesConfig(image_size=32))[0].image.size == (32, 32)
    assert generate_shapes(1, config=ShapesConfig(image_size=200))[0].image.size == (200, 200)


def test_vocabulary_sizes_and_distinct_colours():
    assert len(SHAPE_KINDS) >= 4 and len(COLOURS) >= 6 and set(SIZES) == {"small", "large"}
    assert set(POSITIONS) == {"left", "right", "top", "bottom", "center"}
    for a, b in itertools.combinations(COLOURS.values(), 2):
        assert np.linalg.norm(np.subtract(a, b)) >= 80


def test_attributes_labels_and_count_are_consistent():
    for record in generate_shapes(200):
        shapes = record.attributes["shapes"]
        assert 1 <= len(shapes) == record.attributes["count"] <= 3
        assert len({s["position"] for s in shapes}) == len(shapes)  # one shape per position cell
        assert record.label == shapes[0]["kind"] == record.attributes["kind"]
        assert record.attributes["colour"] == shapes[0]["colour"]
        assert shapes[0]["size"] == "large" or all(s["size"] == "small" for s in shapes)  # main = largest
        assert len(record.captions) >= 3 and len(set(record.captions)) == len(record.captions)
        assert record.captions[0] == canonical_caption(shapes)
    counts = {r.attributes["count"] for r in generate_shapes(60, config=ShapesConfig(min_shapes=2, max_shapes=2))}
    assert counts == {2}


def test_shapes_are_drawn_where_the_attributes_say():
    """Each shape's colour dominates its cell: the attributes describe the pixels."""
    for record in generate_shapes(40, config=ShapesConfig(image_size=63)):
        pixels = np.asarray(record.image, dtype=float)
        cells = {"left": (21, 0), "right": (21, 42), "top": (0, 21), "bottom": (42, 21), "center": (21, 21)}
        for shape in record.attributes["shapes"]:
            row, col = cells[shape["position"]]
            cell = pixels[row:row + 21, col:col + 21].reshape(-1, 3)
            distance = np.linalg.norm(cell - COLOURS[shape["colour"]], axis=1)
            assert (distance < 40).sum() >= (8 if shape["size"] == "small" else 40)
        for row, col in [(0, 0), (0, 42), (42, 0), (42, 42)]:  # corner cells hold no shape, not even an edge
            assert pixels[row:row + 21, col:col + 21].min(axis=2).min() > 150


@pytest.mark.parametrize("language", ["en", "zh"])
def test_every_paraphrase_parses_back_to_the_attributes(language):
    config = ShapesConfig(language=language, max_shapes=5)
    for split in ("train", "compositional"):
        for record in generate_shapes(150, split=split, config=config):
            shapes = record.attributes["shapes"]
            for caption in record.captions + caption_paraphrases(shapes, language):
                assert captions_match(caption, record.attributes, language), caption


def test_relational_and_chinese_examples():
    assert parse_caption("a small red circle to the left of a large blue square") == [
        {"kind": "circle", "colour": "red", "size": "small", "position": "left"},
        {"kind": "square", "colour": "blue", "size": "large", "position": "right"}]
    assert parse_caption("A large green star at the top.") == [
        {"kind": "star", "colour": "green", "size": "large", "position": "top"}]
    assert parse_caption("左边一个红色的小圆形", "zh") == [
        {"kind": "circle", "colour": "red", "size": "small", "position": "left"}]
    assert parse_caption("一个红色的小圆形在一个蓝色的大正方形的上面", "zh")[1]["position"] == "bottom"


def test_wrong_or_garbled_captions_do_not_match():
    attributes = generate_shapes(1)[0].attributes
    good = canonical_caption(attributes["shapes"])
    assert captions_match(good, attributes)
    first = attributes["shapes"][0]
    other_colour = next(c for c in COLOURS if c != first["colour"])
    assert not captions_match(good.replace(first["colour"], other_colour, 1), attributes)
    assert not captions_match(good + " and a small red star on the left", attributes)
    for text in ["", "a red circle", "a small red blob on the left", "on the left on the right",
                 "two shapes: a small red circle on the left", 42]:
        assert parse_caption(text) is None
    assert parse_caption("a small red circle on the left", "zh") is None
    with pytest.raises(ValueError, match="language"):
        parse_caption("x", "fr")
    with pytest.raises(TypeError, match="'shapes' list"):
        captions_match(good, {"kind": "circle"})


def test_compositional_pairs_are_held_out_of_other_splits():
    def pairs(records):
        return {(s["colour"], s["kind"]) for r in records for s in r.attributes["shapes"]}

    for split in ("train", "val", "test"):
        assert not pairs(generate_shapes(300, split=split)) & set(HELD_OUT_PAIRS)
    compositional = generate_shapes(100, split="compositional")
    assert all({(s["colour"], s["kind"]) for s in r.attributes["shapes"]} & set(HELD_OUT_PAIRS) for r in compositional)
    assert pairs(compositional) >= set(HELD_OUT_PAIRS)


def test_lazy_records_match_eager_generation():
    lazy = ShapesRecords(10, split="val")
    eager = generate_shapes(10, split="val")
    assert len(lazy) == 10 and _digests(lazy[7]) == _digests(eager[7]) and _digests(lazy[-1]) == _digests(eager[9])
    with pytest.raises(IndexError):
        lazy[10]


POSITION_WORDS = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                  "center": "in the center"}


def test_kind_first_word_orders_change_only_the_canonical_caption_and_parse_back():
    base = generate_shapes(20, split="compositional")
    kind_first = generate_shapes(20, split="compositional", config=ShapesConfig(word_order="kind_colour"))
    for a, b in zip(base, kind_first):
        assert _digests(a)[0] == _digests(b)[0] and a.captions[1:] == b.captions[1:]  # same image, same paraphrases
        assert b.captions[0] != a.captions[0] and captions_match(b.captions[0], b.attributes)
        shape = b.attributes["shapes"][0]
        assert b.captions[0].startswith(f"a {shape['size']} {shape['kind']} in {shape['colour']} ")
    first = kind_first[0].attributes["shapes"][0]
    other = "red" if first["colour"] != "red" else "blue"
    wrong = kind_first[0].captions[0].replace(f"in {first['colour']}", f"in {other}", 1)
    assert wrong != kind_first[0].captions[0] and not captions_match(wrong, kind_first[0].attributes)
    position_first = generate_shapes(20, split="compositional", config=ShapesConfig(word_order="position_kind_colour"))
    for a, b in zip(kind_first, position_first):
        shape = b.attributes["shapes"][0]
        assert b.captions[1:] == a.captions[1:] and captions_match(b.captions[0], b.attributes)
        assert b.captions[0].startswith(f"{POSITION_WORDS[shape['position']]} a {shape['size']} {shape['kind']} in ")
    with pytest.raises(ValueError, match="word_order"):
        generate_shapes(1, config=ShapesConfig(word_order="kind_first"))
    with pytest.raises(ValueError, match="English only"):
        generate_shapes(1, config=ShapesConfig(word_order="position_kind_colour", language="zh"))


def test_chinese_kind_first_captions_name_the_kind_before_the_colour_and_parse_back():
    base = generate_shapes(20, split="compositional", config=ShapesConfig(language="zh"))
    kind_first = generate_shapes(20, split="compositional", config=ShapesConfig(language="zh", word_order="kind_colour"))
    zh = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "星形", "red": "红色", "green": "绿色",
          "blue": "蓝色", "yellow": "黄色", "purple": "紫色", "orange": "橙色", "large": "大", "small": "小"}
    for a, b in zip(base, kind_first):
        assert _digests(a)[0] == _digests(b)[0] and a.captions[1:] == b.captions[1:]
        assert captions_match(b.captions[0], b.attributes, "zh") and captions_match(a.captions[0], a.attributes, "zh")
        shape = b.attributes["shapes"][0]
        assert f"一个{zh[shape['size']]}{zh[shape['kind']]}是{zh[shape['colour']]}的" in b.captions[0].split("，")[0]
        assert b.captions[0].count("，") == len(b.attributes["shapes"]) - 1
    first = kind_first[0].attributes["shapes"][0]
    other = "红色" if first["colour"] != "red" else "蓝色"
    wrong = kind_first[0].captions[0].replace(f"是{zh[first['colour']]}的", f"是{other}的", 1)
    assert wrong != kind_first[0].captions[0] and not captions_match(wrong, kind_first[0].attributes, "zh")


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="split"):
        generate_shapes(1, split="holdout")
    with pytest.raises(ValueError, match="max_shapes"):
        generate_shapes(1, config=ShapesConfig(min_shapes=3, max_shapes=2))
    with pytest.raises(ValueError, match="language"):
        generate_shapes(1, config=ShapesConfig(language="de"))


def test_generation_is_fast():
    start = time.perf_counter()
    generate_shapes(400)
    rate = 400 / (time.perf_counter() - start)
    assert rate > 300, f"{rate:.0f} images/s"  # ~2000/s on one idle core; loose bound for shared CI machines


def test_write_dataset_round_trips_through_the_manifest_reader(tmp_path):
    records = generate_shapes(5, config=ShapesConfig(language="zh"))
    manifest = write_dataset(records, tmp_path / "out")
    back = read_records(manifest)
    assert [r.captions for r in back] == [r.captions for r in records]
    assert [r.label for r in back] == [r.label for r in records]
    assert [r.attributes for r in back] == [r.attributes for r in records]
    assert all(load_image(b.image).tobytes() == r.image.tobytes() for b, r in zip(back, records))
    assert [r.label for r in read_records(manifest, label_field="colour")] == [r.attributes["colour"] for r in records]


def test_digits_splits_are_deterministic_disjoint_and_labelled():
    train, val, test = (digits_records(s) for s in ("train", "val", "test"))
    assert len(train) + len(val) + len(test) == 1797
    sources = [set(r.source for r in part) for part in (train, val, test)]
    assert not (sources[0] & sources[1]) and not (sources[0] & sources[2]) and not (sources[1] & sources[2])
    assert [r.source for r in digits_records("val")] == [r.source for r in val]
    assert {r.label for r in train} == {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"}
    image = test[0].image
    assert image.size == (32, 32) and image.mode == "RGB"
    assert digits_records("test", image_size=64, resample="nearest")[0].image.size == (64, 64)
    assert test[0].label in test[0].captions[0]
    with pytest.raises(ValueError, match="split"):
        digits_records("dev")
    other = digits_records("test", seed=1)
    assert len(other) == len(test) and {r.source for r in other} != sources[2]  # split_seed gives another split
    assert [r.source for r in test] == [f"sklearn-digits:{i}" for i in digits_split_indices("test", 0)]


def test_committed_sample_matches_the_generator():
    """datasets/shapes_sample was written by `write_shapes_cli(out, n=12, seed=0)` (see datasets/README.md)."""
    from pathlib import Path

    manifest = Path(__file__).resolve().parents[1] / "datasets" / "shapes_sample" / "manifest.jsonl"
    sample = read_records(manifest)
    fresh = generate_shapes(12, config=ShapesConfig(seed=0))
    assert [r.captions for r in sample] == [r.captions for r in fresh]
    assert [load_image(r.image).tobytes() for r in sample] == [r.image.tobytes() for r in fresh]


@pytest.mark.slow
def test_a_tiny_cnn_learns_kind_and_colour_of_single_shapes():
    """Learnable but not trivial: ~10-15 s on one CPU core (kind ~0.9, colour ~1.0 after 600 steps)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    config = ShapesConfig(min_shapes=1, max_shapes=1, image_size=32)

    def tensors(split, n):
        records = generate_shapes(n, split=split, config=config)
        x = torch.tensor(np.stack([np.asarray(r.image) for r in records])).permute(0, 3, 1, 2).float() / 255
        kinds = torch.tensor([SHAPE_KINDS.index(r.attributes["kind"]) for r in records])
        colours = torch.tensor([list(COLOURS).index(r.attributes["colour"]) for r in records])
        return x, kinds, colours

    x, kinds, colours = tensors("train", 3000)
    x_val, kinds_val, colours_val = tensors("val", 400)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        nn.Linear(32, len(SHAPE_KINDS) + len(COLOURS)))
    optimizer = torch.optim.Adam(net.parameters(), 3e-3)
    k = len(SHAPE_KINDS)
    for _ in range(600):
        i = torch.randint(0, len(x), (64,))
        out = net(x[i])
        loss = nn.functional.cross_entropy(out[:, :k], kinds[i]) + nn.functional.cross_entropy(out[:, k:], colours[i])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        out = net(x_val)
    kind_accuracy = (out[:, :k].argmax(1) == kinds_val).float().mean().item()
    colour_accuracy = (out[:, k:].argmax(1) == colours_val).float().mean().item()
    assert kind_accuracy > 0.75 and colour_accuracy > 0.95, (kind_accuracy, colour_accuracy)


@given(st.lists(st.tuples(st.sampled_from(SHAPE_KINDS), st.sampled_from(list(COLOURS)), st.sampled_from(SIZES)),
                min_size=1, max_size=5),
       st.permutations(POSITIONS), st.sampled_from(["en", "zh"]), st.randoms(use_true_random=False))
@settings(max_examples=150, deadline=None)
def test_any_shape_list_round_trips_through_every_paraphrase(triples, positions, language, random):
    shapes = [{"kind": k, "colour": c, "size": s, "position": p} for (k, c, s), p in zip(triples, positions)]
    order = list(range(len(shapes)))
    random.shuffle(order)
    for caption in [canonical_caption(shapes, language)] + caption_paraphrases(shapes, language, order):
        assert captions_match(caption, {"shapes": shapes}, language), caption
