"""Embedded shapes VQA: answers computed from the scene, unambiguous, balanced, deterministic, compositional split."""

from collections import Counter

import numpy as np
import pytest
import torch

from mmlm.config import ShapesConfig
from mmlm.data.shapes import HELD_OUT_PAIRS, make_shapes_record
from mmlm.data.vqa import (
    FAMILIES,
    ShapesVQADataset,
    build_vqa_datasets,
    draw_questions,
    render_answer,
    render_question,
    scene_questions,
)

CFG = ShapesConfig(n_train=8, n_val=4, n_test=4, n_compositional=4, image_size=32)


def shape(kind, colour, position, size="small"):
    return {"kind": kind, "colour": colour, "size": size, "position": position}


# A hand-made scene: red circle left, blue square center, orange circle right, purple star at the top.
SCENE = [shape("circle", "red", "left"), shape("square", "blue", "center"), shape("star", "purple", "top"),
         shape("circle", "orange", "right")]


def qa(data, index):
    """Item ``index`` without its image: {"question", "answer", "family", "language", "shapes"}."""
    q, language, shapes = data.question(index)
    return {"question": render_question(q, language), "answer": render_answer(q, language), "family": q.family,
            "language": language, "shapes": shapes}


def texts(family, scene=SCENE, language="en", **kw):
    return {render_question(q, language): render_answer(q, language) for q in scene_questions(scene, family, **kw)}


def test_colour_only_for_kinds_that_occur_once():
    assert texts("colour") == {"what colour is the square?": "blue", "what colour is the star?": "purple"}
    assert texts("colour", language="zh") == {"正方形是什么颜色？": "蓝色", "星形是什么颜色？": "紫色"}


def test_kind_at_every_occupied_cell():
    assert texts("kind_at") == {"what shape is on the left?": "circle", "what shape is in the center?": "square",
                                "what shape is at the top?": "star", "what shape is on the right?": "circle"}
    assert texts("kind_at", language="zh")["上面是什么形状？"] == "星形"


def test_count_includes_zero_and_the_total():
    assert texts("count") == {"how many shapes are there?": "4", "how many circles are there?": "2",
                              "how many squares are there?": "1", "how many triangles are there?": "0",
                              "how many stars are there?": "1"}
    assert texts("count", language="zh")["有几个圆形？"] == "2"


def test_exists_never_names_a_held_out_pair_outside_the_compositional_split():
    found = texts("exists")
    assert found["is there a red circle?"] == "yes" and found["is there an orange circle?"] == "yes"
    assert found["is there a blue circle?"] == "no"
    assert "is there a red triangle?" not in found  # (red, triangle) is held out
    assert len(found) == 6 * 4 - len(HELD_OUT_PAIRS)
    assert texts("exists", language="zh")["有红色的圆形吗？"] == "有"


def test_relation_skips_ambiguous_sides_and_names():
    found = texts("relation")
    assert "what is to the right of the red circle?" not in found  # blue square and orange circle both lie there
    assert "what is to the left of the orange circle?" not in found
    assert found["what is to the left of the blue square?"] == "red circle"
    assert found["what is to the right of the blue square?"] == "orange circle"
    assert found["what is above the blue square?"] == "purple star"
    assert found["what is below the purple star?"] == "blue square"
    assert len(found) == 4
    # A reference whose colour-kind pair occurs twice cannot be named.
    twins = [shape("circle", "red", "left"), shape("circle", "red", "right"), shape("star", "blue", "center")]
    assert all(q.params[:2] == ("blue", "star") for q in scene_questions(twins, "relation"))
    assert texts("relation", language="zh")["蓝色的正方形左边是什么？"] == "红色的圆形"


def test_answers_are_computed_from_each_scene():
    """Every item's answer agrees with the scene its own canonical caption describes."""
    data = ShapesVQADataset(100, split="test", config=CFG, questions_per_image=3)
    for i in range(len(data)):
        item = qa(data, i)
        shapes = item["shapes"]
        family, answer = item["family"], item["answer"]
        if family == "count":
            kind = item["question"].split()[2].rstrip("s")
            expected = len(shapes) if kind == "shape" else sum(s["kind"] == kind for s in shapes)
            assert answer == str(expected)
        elif family == "kind_at":
            assert answer in {s["kind"] for s in shapes}
        elif family == "colour":
            kind = item["question"].split()[-1].rstrip("?")
            (match,) = [s for s in shapes if s["kind"] == kind]
            assert answer == match["colour"]
        elif family == "exists":
            colour, kind = item["question"].rstrip("?").split()[-2:]
            assert answer == ("yes" if any((s["colour"], s["kind"]) == (colour, kind) for s in shapes) else "no")
        else:
            colour, kind = answer.split()
            assert any((s["colour"], s["kind"]) == (colour, kind) for s in shapes)


def test_items_match_the_sample_dict_style_and_are_deterministic():
    data = ShapesVQADataset(6, split="val", config=CFG, questions_per_image=2, transform=lambda im: torch.zeros(3))
    item = data[3]
    assert {"pixel_values", "prompt", "question", "answer", "answers", "caption", "captions", "family", "language",
            "label", "attributes", "messages", "index", "image_index"} <= set(item)
    assert item["image_index"] == 1 and item["index"] == 3 and item["prompt"] == item["question"]
    assert item["caption"] == item["answer"] and item["captions"] == [item["answer"]]
    assert item["messages"] == [{"role": "user", "content": "<image>\n" + item["question"]},
                                {"role": "assistant", "content": item["answer"]}]
    assert torch.equal(item["pixel_values"], torch.zeros(3))
    assert item["attributes"]["shapes"] == qa(data, 3)["shapes"]  # the cheap scene is the drawn record's
    plain = data.with_transform(None)
    assert plain[3]["question"] == item["question"] and not isinstance(plain[3]["pixel_values"], torch.Tensor)
    assert isinstance(data[3]["pixel_values"], torch.Tensor)
    again = ShapesVQADataset(6, split="val", config=CFG, questions_per_image=2)
    assert [again[i]["question"] for i in range(12)] == [data[i]["question"] for i in range(12)]
    assert again[2]["question"] != again[3]["question"]  # the questions of one image are distinct
    other_seed = ShapesVQADataset(6, split="val", config=CFG, questions_per_image=2, seed=1)
    assert [other_seed[i]["question"] for i in range(12)] != [data[i]["question"] for i in range(12)]
    # The image is the captioning dataset's image of the same (seed, split, index).
    same = make_shapes_record(1, split="val", config=CFG).image
    assert np.array_equal(np.asarray(again[3]["pixel_values"]), np.asarray(same))


def test_families_and_answers_are_balanced():
    data = ShapesVQADataset(300, split="train", config=CFG, questions_per_image=2)
    items = [qa(data, i) for i in range(len(data))]
    families = Counter(item["family"] for item in items)
    assert set(families) == set(FAMILIES)
    assert min(families[f] for f in ("colour", "kind_at", "count", "exists")) > len(items) / 10
    exists = Counter(item["answer"] for item in items if item["family"] == "exists")
    assert abs(exists["yes"] - exists["no"]) < 0.25 * (exists["yes"] + exists["no"])


def test_compositional_split_asks_about_held_out_pairs_and_train_never_names_them():
    held = {f"{c} {k}" for c, k in HELD_OUT_PAIRS}
    train = ShapesVQADataset(200, split="train", config=CFG, questions_per_image=2)
    for i in range(len(train)):
        item = qa(train, i)
        assert not any(pair in item["question"] + " " + item["answer"] for pair in held)
    comp = ShapesVQADataset(100, split="compositional", config=CFG, questions_per_image=2)
    checked = Counter()
    for i in range(len(comp)):
        item = qa(comp, i)
        shapes = item["shapes"]
        if item["family"] == "colour":  # the shape asked about is a held-out pair
            kind = item["question"].split()[-1].rstrip("?")
            assert (item["answer"], kind) in HELD_OUT_PAIRS
        elif item["family"] == "kind_at":
            words = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                     "center": "in the center"}
            (asked,) = [s for s in shapes if words[s["position"]] in item["question"]]
            assert (asked["colour"], asked["kind"]) in HELD_OUT_PAIRS
        else:
            continue
        checked[item["family"]] += 1
    assert checked["colour"] > 5 and checked["kind_at"] > 5
    with pytest.raises(ValueError, match="no question of families"):  # a scene with two circles has no colour one
        ShapesVQADataset(len(comp), split="compositional", config=CFG, families=["colour"]).question(2)


def test_chinese_and_mixed_languages():
    zh = ShapesVQADataset(10, split="test", config=CFG, language="zh")
    assert all(qa(zh, i)["language"] == "zh" and qa(zh, i)["question"].endswith("？") for i in range(10))
    assert zh[0]["language"] == "zh" and zh[0]["question"] == qa(zh, 0)["question"]
    mixed = ShapesVQADataset(40, split="test", config=CFG, language="mixed")
    assert {qa(mixed, i)["language"] for i in range(40)} == {"en", "zh"}


def test_draw_questions_gives_fewer_when_the_scene_has_fewer():
    scene = [shape("circle", "red", "left")]
    got = draw_questions(scene, np.random.default_rng(0), 100, families=["kind_at", "colour"])
    assert len(got) == 2


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="families"):
        ShapesVQADataset(2, config=CFG, families=["colour", "size"])
    with pytest.raises(ValueError, match="language"):
        ShapesVQADataset(2, config=CFG, language="fr")
    with pytest.raises(ValueError, match="questions_per_image"):
        ShapesVQADataset(2, config=CFG, questions_per_image=0)
    with pytest.raises(IndexError):
        ShapesVQADataset(2, config=CFG)[2]


def test_build_vqa_datasets_sizes_every_split():
    splits = build_vqa_datasets(CFG, questions_per_image=3)
    assert {k: len(v) for k, v in splits.items()} == {"train": 24, "val": 12, "test": 12, "compositional": 12}
