"""Relevance maps (mmlm.models.explain), the pointing game (mmlm.eval.pointing) and `mmlm explain`."""

import json

import pytest
import torch

from mmlm.cli import main
from mmlm.config import ShapesConfig
from mmlm.data.shapes import CELLS, COLOURS, canonical_caption, generate_shapes
from mmlm.eval.pointing import box_fraction, named_words, peak_in_box, pointing_game, score_maps, shape_box
from mmlm.models.explain import Explanation, explain, overlay, to_patch_relevance
from mmlm.models.language import LanguageConfig
from mmlm.models.projector import ProjectorConfig
from mmlm.models.vision import VisionConfig
from mmlm.models.vlm import VisionLanguageModel, VLMConfig

ONE_SHAPE = ShapesConfig(min_shapes=1, max_shapes=1, image_size=64)
CNN = VisionConfig(name="resnet10t", features_only_stage=2, image_size=64, pos_embed_2d=True)  # 8x8 tokens
VIT = VisionConfig(name="vit_tiny_patch16_224", image_size=32,
                   kwargs={"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2})  # 4x4 tokens


def tiny_vlm(vision=CNN, projector="mlp", corpus=None, **projector_kwargs) -> VisionLanguageModel:
    corpus = corpus or [canonical_caption(r.attributes["shapes"]) for r in generate_shapes(64, config=ONE_SHAPE)]
    config = VLMConfig(vision=vision, projector=ProjectorConfig(type=projector, **projector_kwargs),
                       language=LanguageConfig(vocab_size=400, config={
                           "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                           "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 128,
                           "tie_word_embeddings": True}), max_length=24)
    torch.manual_seed(0)
    return VisionLanguageModel.from_config(config, corpus).eval()


# ---------------------------------------------------------------------------- pointing-game arithmetic


def test_peak_in_box_and_box_fraction_on_hand_made_maps():
    m = torch.zeros(10, 20)
    m[3, 15] = 1.0  # row 3, column 15
    assert peak_in_box(m, (15, 3, 16, 4))  # (x0, y0, x1, y1), end-exclusive
    assert not peak_in_box(m, (0, 0, 15, 10))  # x1 = 15 excludes column 15
    assert not peak_in_box(m, (10, 4, 20, 10))  # rows 4.. only
    assert box_fraction((0, 0, 10, 5), (10, 20)) == 0.25
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        peak_in_box(torch.zeros(1, 4, 4), (0, 0, 1, 1))


def test_named_words_finds_colour_then_kind_once():
    words = "a small red circle on the left and a large blue square at the top".split()
    assert named_words(words, {"colour": "red", "kind": "circle"}) == [2, 3]
    assert named_words(words, {"colour": "blue", "kind": "square"}) == [10, 11]
    assert named_words(words, {"colour": "red", "kind": "square"}) is None  # not named
    twice = "a red circle and a red circle".split()
    assert named_words(twice, {"colour": "red", "kind": "circle"}) is None  # ambiguous


def test_score_maps_counts_hits_misses_unnamed_and_chance():
    words = "a red circle and a blue star".split()
    shapes = [{"colour": "red", "kind": "circle"}, {"colour": "blue", "kind": "star"},
              {"colour": "green", "kind": "square"}]
    boxes = [(0, 0, 5, 5), (5, 5, 10, 10), (0, 5, 5, 10)]
    maps = {i: torch.zeros(10, 10) for i in range(len(words))}
    maps[1][2, 2] = 1.0  # "red" peaks in the first box
    maps[2][2, 2] = 0.5
    maps[5][1, 8] = 1.0  # "blue" peaks outside the second box
    hits, scored, unnamed, chance = score_maps(lambda i: maps[i], words, shapes, boxes, (10, 10))
    assert (hits, scored, unnamed) == (1, 2, 1)
    assert chance == pytest.approx(0.25 + 0.25)


def test_shape_box_is_tight_around_the_shape_and_inside_its_cell():
    record = generate_shapes(1, split="test", config=ONE_SHAPE)[0]
    shape = record.attributes["shapes"][0]
    x0, y0, x1, y1 = shape_box(record.image, shape)
    col, row = CELLS[shape["position"]]
    assert col * 64 / 3 - 1 <= x0 < x1 <= (col + 1) * 64 / 3 + 1
    assert row * 64 / 3 - 1 <= y0 < y1 <= (row + 1) * 64 / 3 + 1
    pixels = torch.tensor(list(record.image.getdata()), dtype=torch.float32).reshape(64, 64, 3)
    centre = pixels[(y0 + y1) // 2, (x0 + x1) // 2]
    assert (centre - torch.tensor(COLOURS[shape["colour"]], dtype=torch.float32)).norm() < 60
    assert 0.005 < box_fraction((x0, y0, x1, y1), (64, 64)) < 1 / 9


# ---------------------------------------------------------------------------- maps from every projector and tower


@pytest.mark.parametrize("vision,projector", [(CNN, "linear"), (CNN, "pixel_shuffle"), (CNN, "perceiver"),
                                              (VIT, "mlp")])
def test_explain_gives_one_map_per_token_at_image_resolution(vision, projector):
    model = tiny_vlm(vision, projector, **({"num_latents": 8, "num_layers": 2} if projector == "perceiver" else {}))
    attn_before = model.language_model.config._attn_implementation
    record = generate_shapes(1, split="test", config=ONE_SHAPE)[0]
    text = canonical_caption(record.attributes["shapes"])
    result = explain(model, [record.image], text=text)[0]
    assert model.language_model.config._attn_implementation == attn_before  # eager only for the call
    assert result.caption == text and [w for w, _ in result.words] == text.split()
    n_tokens = len(model.tokenizer(text, add_special_tokens=False)["input_ids"])
    for method in ("rollout", "gradient", "saliency"):
        maps = result.maps[method]
        assert maps.shape == (n_tokens, 64, 64) and torch.isfinite(maps).all()
        peaks = maps.amax((1, 2))  # each map scaled to max 1; a gradient map may be all 0 (no positive part)
        assert maps.min() >= 0 and (torch.isclose(peaks, torch.ones(n_tokens)) | (peaks == 0)).all()
        assert method != "rollout" or (peaks == 1).all()
    assert result.word_map(2).shape == (64, 64)
    assert [result.words[i][0] for i in result.content_words()] == [w for w in text.split()
                                                                    if w not in ("a", "on", "the", "at", "in")]
    assert model.explain([record.image], text=text)[0].caption == text  # the VisionLanguageModel method


def test_saliency_maps_are_finer_than_the_lm_tokens_and_need_no_trainable_weights():
    model = tiny_vlm(CNN, "pixel_shuffle", reduce_factor=2)  # 4x4 LM tokens of 16 px each
    for parameter in model.parameters():
        parameter.requires_grad_(False)  # a frozen model: the gradients come from the pixels' graph
    record = generate_shapes(1, split="test", config=ONE_SHAPE)[0]
    result = explain(model, [record.image], text=canonical_caption(record.attributes["shapes"]))[0]
    saliency = result.maps["saliency"]
    assert (saliency.amax((1, 2)) == 1).all()  # every token's map has a peak (scaled to 1)
    # the reference: d log p(token) / d pixels through the model's own forward, |.| summed over channels,
    # a 9x9 box mean (1/8 of 64 px, zeros beyond the border): pixel resolution, not the 16 px blocks of the LM's image tokens
    text = canonical_caption(record.attributes["shapes"])
    batch = model.prepare_batch(model.pixel_values([record.image]), [text])
    pixels = batch.pop("pixel_values").requires_grad_(True)
    positions = (batch.pop("labels")[0] != -100).nonzero().flatten()
    with torch.enable_grad():
        logits = model(pixels, **batch).logits[0].log_softmax(-1)
        for k in (0, len(saliency) - 1):  # the first and the last caption token (the batch adds an EOS)
            t = positions[k]
            grad, = torch.autograd.grad(logits[t - 1, batch["input_ids"][0, t]], pixels, retain_graph=True)
            expected = torch.nn.functional.avg_pool2d(grad[0].abs().sum(0)[None, None], 9, 1, 4)[0, 0]
            torch.testing.assert_close(saliency[k], expected / expected.max(), atol=1e-4, rtol=1e-3)


def test_pixel_shuffle_maps_spread_each_token_over_its_block_of_patches():
    model = tiny_vlm(CNN, "pixel_shuffle", reduce_factor=2)  # 8x8 patches -> 4x4 tokens
    relevance = torch.zeros(1, 16)
    relevance[0, 4 * 1 + 2] = 1.0  # token row 1, column 2
    grid = to_patch_relevance(model, relevance, [])
    assert grid.shape == (1, 8, 8)
    assert set(map(tuple, grid[0].nonzero().tolist())) == {(2, 4), (2, 5), (3, 4), (3, 5)}


def test_perceiver_maps_follow_the_cross_attention_to_the_patches():
    model = tiny_vlm(CNN, "perceiver", num_latents=2, num_layers=1)
    mix = torch.zeros(1, 2, 64)
    mix[0, 0, 10] = 1.0  # latent 0 looked at patch 10 only
    mix[0, 1, 63] = 1.0
    grid = to_patch_relevance(model, torch.tensor([[1.0, 0.0]]), [mix])
    assert grid.shape == (1, 8, 8) and grid[0].nonzero().tolist() == [[1, 2]]


def test_overlay_has_one_panel_per_content_word():
    words = [("a", [0]), ("red", [1]), ("circle", [2])]
    maps = torch.rand(3, 64, 64)
    item = Explanation(caption="a red circle", tokens=["a", " red", " circle"], words=words,
                       maps={"rollout": maps, "gradient": maps})
    strip = overlay(generate_shapes(1, config=ONE_SHAPE)[0].image, item, panel=32)
    assert strip.size == (32 * 3, 32 + 16)
    with pytest.raises(ValueError, match="method"):
        item.word_map(1, "saliency")


def test_cli_explain_writes_overlays_and_json(tmp_path):
    model = tiny_vlm()
    model.save_pretrained(tmp_path / "model")
    record = generate_shapes(1, split="test", config=ONE_SHAPE)[0]
    record.image.save(tmp_path / "scene.png")
    out = tmp_path / "explained"
    text = canonical_caption(record.attributes["shapes"])
    assert main(["explain", str(tmp_path / "model"), str(tmp_path / "scene.png"), "--out", str(out),
                 "--text", text, "--prompt", "", "--method", "gradient"]) == 0
    rows = json.loads((out / "explanations.json").read_text())
    assert rows[0]["caption"] == text and rows[0]["overlays"] == [str(out / "scene_gradient.png")]
    assert (out / "scene_gradient.png").is_file() and not (out / "scene_rollout.png").exists()
    assert main(["explain", str(tmp_path / "model"), str(tmp_path / "scene.png"), "--out", str(out)]) == 0
    assert all((out / f"scene_{m}.png").is_file() for m in ("rollout", "gradient", "saliency"))  # all by default


# ---------------------------------------------------------------------------- a trained captioner looks at the shape


@pytest.mark.slow
def test_trained_captioner_maps_peak_on_the_one_shape():
    """150 steps on single-shape scenes (loss ~0.25); measured 9/16 rollout hits at 200 steps vs 5% chance."""
    records = generate_shapes(512, split="train", config=ONE_SHAPE)
    captions = [canonical_caption(r.attributes["shapes"]) for r in records]
    model = tiny_vlm(corpus=captions).train()
    transform = model.image_transform()
    pixels = torch.stack([transform(r.image) for r in records])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        index = torch.randint(0, len(records), (32,), generator=generator)
        loss = model(**model.prepare_batch(pixels[index], [captions[i] for i in index])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    result = pointing_game(model, generate_shapes(16, split="test", config=ONE_SHAPE), "rollout")
    assert result.total == 16 and result.unnamed == 0
    assert result.hit_rate >= 0.35 and result.hit_rate > 4 * result.chance_rate, result
