"""The conformance matrix: real timm towers x Hub-shaped LMs (tests/hub_fixtures.py), tiny and random.

Cells: every vision case with the SentencePiece Llama, every LM kind behind the SigLIP-style tower,
and a few crosses. In every cell: the loss falls on a fixed batch, batched captions equal per-sample
ones, tree / expand label scoring equals naive scoring, save -> load gives identical outputs. Per LM
kind: the scored and trained label tokens are exactly the label's tokens inside the whole sentence,
and the label-position logits equal the LM's own.
"""

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from hub_fixtures import LM_KINDS, VISION_CASES, language_config, vision_config
from mmlm.config import ConfigError
from mmlm.models import ProjectorConfig, VisionLanguageModel, VLMConfig
from mmlm.models.scoring import encode_labels, split_template
from mmlm.models.sequence import IGNORE_INDEX, count_label_tokens

CROSSES = [("vit_reg", "qwen2"), ("convnext", "gpt2"), ("resnet_stage", "gemma"), ("vit_avg", "llama_untied")]
CELLS = ([(v, "llama_sp") for v in VISION_CASES] + [("siglip", k) for k in LM_KINDS if k != "llama_sp"] + CROSSES)
SLOW = {("vit_reg_gap", "llama_sp"), ("resnet_stage", "llama_sp"), ("vit_avg", "llama_untied"), ("resnet_stage", "gemma"), ("convnext", "gpt2")}
MATRIX = [pytest.param(v, k, id=f"{v}-{k}", marks=[pytest.mark.slow] if (v, k) in SLOW else [])
          for v, k in CELLS]
CAPTIONS = ["a small red circle on the left", "a big blue square at the top", "a green triangle on the right"]
LABELS = ["red circle", "blue square", "red", "big blue circle"]


def shape_image(colour: str, width: int = 80, height: int = 56) -> Image.Image:
    """A non-square image with one shape (the towers pad or squash it to their size)."""
    image = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(image).ellipse((8, 8, 40, 40), fill=colour)
    return image


IMAGES = [shape_image(c) for c in ("red", "blue", "green")]


def build(vision: str, kind: str, size: str = "override", seed: int = 0, **config) -> VisionLanguageModel:
    torch.manual_seed(seed)
    cfg = VLMConfig(vision=vision_config(vision, size), projector=ProjectorConfig(type="mlp"),
                    language=language_config(kind), **{"prompt": "describe:", "max_length": 24, **config})
    return VisionLanguageModel.from_config(cfg).eval()


def pixels(model, images=IMAGES) -> torch.Tensor:
    transform = model.image_transform()
    return torch.stack([transform(im) for im in images])


# ----------------------------------------------------------------------------------------- every cell
@pytest.mark.parametrize("vision, kind", MATRIX)
def test_loss_falls_on_a_fixed_batch(vision, kind):
    model = build(vision, kind)
    batch = model.prepare_batch(pixels(model), CAPTIONS)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("vision, kind", MATRIX)
def test_batched_captions_equal_per_sample(vision, kind):
    model = build(vision, kind, seed=1)
    prompts = ["", "describe:", "<image> the picture shows"]  # different lengths: left padding
    batched = model.caption(IMAGES, prompt=prompts, max_new_tokens=6, batch_size=3)
    single = [model.caption(im, prompt=p, max_new_tokens=6)[0] for im, p in zip(IMAGES, prompts)]
    assert batched == single


@pytest.mark.parametrize("vision, kind", MATRIX)
def test_tree_and_expand_scoring_equal_naive(vision, kind):
    model = build(vision, kind, seed=2)
    pv = pixels(model)
    for template, methods in (("a photo of a {}", ("tree", "expand")), ("<image> this is a {}.", ("tree",))):
        naive = model.label_log_likelihoods(pv, LABELS, template, method="naive")
        for method in methods:
            shared = model.label_log_likelihoods(pv, LABELS, template, method=method)
            torch.testing.assert_close(shared, naive, atol=1e-4, rtol=0, msg=f"{method} {template!r}")
    classify = model.classify(IMAGES, LABELS)
    naive = model.label_log_likelihoods(pv, LABELS, "a photo of a {}", method="naive").softmax(-1)
    torch.testing.assert_close(classify, naive, atol=1e-4, rtol=0)


@pytest.mark.parametrize("vision, kind", MATRIX)
def test_save_then_load_gives_identical_outputs(vision, kind, tmp_path):
    model = build(vision, kind, seed=3)
    batch = model.prepare_batch(pixels(model), CAPTIONS)
    model.save_pretrained(tmp_path / "m")
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).loss, loaded(**batch).loss)
        inputs = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")}
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)
    assert loaded.caption(IMAGES, max_new_tokens=5) == model.caption(IMAGES, max_new_tokens=5)
    assert torch.equal(loaded.classify(IMAGES, LABELS), model.classify(IMAGES, LABELS))


# ----------------------------------------------------------------------------------------- per LM kind
def _text_ids(model, ids: list[int]) -> list[int]:
    """Token ids without the start token and the image placeholders."""
    return [t for t in ids[1:] if t != model.image_token_id]


@pytest.mark.parametrize("kind", LM_KINDS)
def test_scored_and_trained_label_tokens_are_the_label_tokens_inside_the_whole_sentence(kind):
    model = build("siglip", kind, chat_template="none")  # the plain layout (chat rendering: test_chat_rendering.py)
    tokenizer = model.tokenizer
    for template in ("a photo of a {}", "{}", "<image> this is a {}.", "look: {} here"):
        prompt, answers = split_template(template, LABELS)
        groups = encode_labels(model, prompt, answers, eos=True)
        assert len(groups) == 1, "one shared prompt prefix for space-separated labels"
        (prefix, members), = groups.items()
        for (j, answer_ids), label in zip(sorted(members), LABELS):
            sentence = template.format(label)
            whole = tokenizer(sentence, add_special_tokens=False)["input_ids"]
            whole = [t for t in whole if t != model.image_token_id]
            assert _text_ids(model, list(prefix) + answer_ids) == whole + [model.eos_token_id], sentence
            first = tokenizer.convert_ids_to_tokens(answer_ids[:1])[0]
            assert first not in ("▁", "Ġ"), (sentence, first)  # no stray space token before the label
            assert tokenizer.decode(answer_ids[:-1]).strip() == (label + template.split("{}")[1]).strip()
            # training sees the same tokens: prepare_batch labels exactly the answer (+ EOS)
            batch = model.prepare_batch(pixels(model, IMAGES[:1]), [answers[j]], [prompt])
            labels = batch["labels"][0]
            assert labels[labels != IGNORE_INDEX].tolist() == answer_ids


@pytest.mark.parametrize("kind", LM_KINDS)
def test_a_caption_after_a_prompt_is_tokenised_as_in_the_sentence(kind):
    model = build("siglip", kind)
    batch = model.prepare_batch(pixels(model, IMAGES[:1]), ["a red circle"], ["describe:"])
    ids = batch["input_ids"][0].tolist()
    whole = model.tokenizer("describe: a red circle", add_special_tokens=False)["input_ids"]
    assert _text_ids(model, ids) == whole + [model.eos_token_id]
    labels = batch["labels"][0]
    assert model.tokenizer.decode(labels[labels != IGNORE_INDEX].tolist(), skip_special_tokens=True).strip() \
        == "a red circle"


@pytest.mark.parametrize("kind", LM_KINDS)
def test_label_position_logits_and_loss_equal_the_lm_s_own(kind):
    model = build("siglip", kind, seed=4)
    batch = model.prepare_batch(pixels(model), CAPTIONS[:2] + ["a star"])  # padded rows
    with torch.no_grad():
        out = model(**batch)
        full = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"]).logits.float()
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    assert out.logits.shape == (int(keep.sum()), full.shape[-1]) and int(out.num_label_tokens) == keep.sum()
    torch.testing.assert_close(out.logits, full[:, :-1][keep], atol=1e-5, rtol=1e-5)
    expected = F.cross_entropy(full[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)


def test_summed_micro_batch_losses_over_all_label_tokens_equal_the_whole_batch():
    """Gradient accumulation: sum / num_items_in_batch over micro-batches weighs every token as one batch does."""
    model = build("siglip", "qwen2", seed=5).train()
    pv = pixels(model)
    captions = ["a red circle", "a big blue square at the top on the left", "a star"]  # unequal lengths
    whole = model.prepare_batch(pv, captions)
    model(**whole).loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    parts = [model.prepare_batch(pv[:1], captions[:1]), model.prepare_batch(pv[1:], captions[1:])]
    total = sum(count_label_tokens(p["labels"]) for p in parts)
    assert total == count_label_tokens(whole["labels"])
    for part in parts:
        model(**part, num_items_in_batch=total).loss.backward()
    for name, grad in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-5, rtol=1e-4)
    summed = model(**whole, reduction="sum")
    torch.testing.assert_close(summed.loss / summed.num_label_tokens, model(**whole).loss)
    with pytest.raises(ValueError, match="reduction"):
        model(**whole, reduction="none")


# ----------------------------------------------------------------------------------------- bad configurations
def test_too_many_image_tokens_for_the_lm_s_positions_is_a_config_error():
    """Pitfall 2: a ViT-B/16 at 224 px (196 tokens) + 64 text tokens into GPT-2's 128 positions."""
    with pytest.raises(ConfigError, match=r"196 image tokens \+ max_length 64 = 260 positions.*n_positions is 128"):
        build("vit_cls", "gpt2", size="pretrained", max_length=64)
    with pytest.raises(ConfigError, match=r"16 image tokens \+ max_length 120 .* lower model.max_length to <= 112"):
        build("vit_cls", "gpt2", max_length=120)  # 16 tokens at 64 px + 120 > 128
    assert build("vit_cls", "gpt2", max_length=112).num_image_tokens == 16  # exactly full: fine


@pytest.mark.slow
@pytest.mark.parametrize("vision", ["vit_cls", "siglip"])
def test_the_towers_pretrained_size_trains_and_captions(vision):
    model = build(vision, "qwen2", size="pretrained")
    assert model.num_image_tokens == 196
    batch = model.prepare_batch(pixels(model, IMAGES[:2]), CAPTIONS[:2])
    model.train()
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    model.eval()
    assert len(model.caption(IMAGES[:2], max_new_tokens=2)) == 2
