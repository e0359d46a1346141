"""Several images per sample: model.max_images, flattened pixel_values with image_counts, collation of mixed
batches, training, and vlm.chat / vlm.answer with two images for one question (tiny models, no downloads)."""

import json

import pytest
import torch
from PIL import Image

from mmlm.config import ConfigError
from mmlm.data.conversations import ConversationDataset, collate_conversations, read_conversations
from mmlm.data.sources import DataError
from mmlm.models import LanguageConfig, ProjectorConfig, VisionConfig, VisionLanguageModel, VLMConfig, chat
from mmlm.models.sequence import IGNORE_INDEX

TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 256}
CORPUS = ["what colour is it?", "what colour is the second?", "and", "red", "blue", "green"]
ONE = "what colour is it?"
TWO = "<image> and <image>: what colour is the second?"
# (images, question, answer): the answer to TWO is the second image's colour, so image order matters
SAMPLES = [(["red"], ONE, "red"), (["red", "blue"], TWO, "blue"), (["blue", "green"], TWO, "green"),
           (["green"], ONE, "green"), (["blue", "red"], TWO, "red"), (["blue"], ONE, "blue")]
IMAGES = {c: Image.new("RGB", (16, 16), c) for c in ("red", "blue", "green")}


def tiny_config(**kw) -> VLMConfig:
    return VLMConfig(vision=VisionConfig(name="resnet10t", features_only_stage=1, image_size=16, pos_embed_2d=True),
                     projector=ProjectorConfig(type="pixel_shuffle", reduce_factor=2),
                     language=LanguageConfig(config=dict(TINY_LLAMA), vocab_size=300), **{"max_images": 2, **kw})


def tiny_model(seed=0, **kw) -> VisionLanguageModel:
    torch.manual_seed(seed)
    return VisionLanguageModel.from_config(tiny_config(**kw), corpus=CORPUS).eval()


def pixels(model, colours):
    transform = model.image_transform()
    return torch.stack([transform(IMAGES[c]) for c in colours])


def conversation(question, answer):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def mixed_batch(model, samples=SAMPLES):
    pv = pixels(model, [c for images, _, _ in samples for c in images])
    return chat.prepare_conversations(model, pv, [conversation(q, a) for _, q, a in samples],
                                      [len(images) for images, _, _ in samples])


# ----------------------------------------------------------------------------------------- config and data
def test_max_images_is_a_checked_config_key_that_counts_in_the_position_budget():
    assert VLMConfig().max_images == 1
    with pytest.raises(ConfigError, match="model.max_images: expected an integer >= 1, got 0"):
        tiny_config(max_images=0)
    model = tiny_model()
    # 256 positions: max_length 64 + 4 image tokens x 48 images = 256 fits; one more image does not
    assert tiny_model(max_images=48).config.max_images == 48
    with pytest.raises(ConfigError, match=r"196 image tokens \+ max_length 64 = 260 positions"):
        tiny_model(max_images=49)
    assert model.num_image_tokens == 4


def test_collation_mixes_one_and_two_image_conversations(tmp_path):
    for colour in IMAGES:
        IMAGES[colour].save(tmp_path / f"{colour}.png")
    rows = [{"image": "red.png", "conversations": [{"from": "human", "value": "<image>\n" + ONE},
                                                   {"from": "gpt", "value": "red"}]},
            {"images": ["red.png", "blue.png"], "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"},
                                             {"type": "text", "text": ": what colour is the second?"}]},
                {"role": "assistant", "content": "blue"}]}]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    conversations = read_conversations(path).conversations
    with pytest.raises(DataError, match=r"chat.jsonl:2: 2 images, more than max_images=1"):
        ConversationDataset(conversations, max_images=1)
    model = tiny_model()
    dataset = ConversationDataset(conversations, model.image_transform(), max_images=model.config.max_images)
    batch = collate_conversations([dataset[0], dataset[1]])
    assert batch["image_counts"] == [1, 2] and batch["pixel_values"].shape == (3, 3, 16, 16)
    torch.testing.assert_close(batch["pixel_values"], pixels(model, ["red", "red", "blue"]))
    single = collate_conversations([dataset[0], dataset[0]])  # the single-image path: stacked, no counts
    assert "image_counts" not in single and single["pixel_values"].shape == (2, 3, 16, 16)
    inputs = chat.prepare_conversations(model, batch["pixel_values"], batch["messages"], batch["image_counts"])
    assert inputs["image_counts"] == [1, 2]
    assert inputs["input_ids"].eq(model.image_token_id).sum(1).tolist() == [4, 8]
    assert torch.isfinite(model(**inputs).loss)


# ----------------------------------------------------------------------------------------- the model
def test_a_mixed_batch_gives_each_sample_what_it_gets_alone():
    model = tiny_model(seed=1)
    batch = mixed_batch(model)
    assert batch["image_counts"] == [1, 2, 2, 1, 2, 1]
    with torch.no_grad():
        out = model(**batch, reduction="sum")
        full = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                     image_counts=batch["image_counts"]).logits
        rows, losses = [], []
        for i, sample in enumerate(SAMPLES):
            alone = mixed_batch(model, [sample])
            assert "image_counts" not in alone or alone["image_counts"] == [2]
            one = model(**alone, reduction="sum")
            rows.append(one.logits)
            losses.append(one.loss)
            length = int(alone["attention_mask"].sum())
            logits = model(alone["pixel_values"], alone["input_ids"], alone["attention_mask"],
                           image_counts=alone.get("image_counts")).logits
            torch.testing.assert_close(full[i, :length], logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits, torch.cat(rows), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, torch.stack(losses).sum(), atol=1e-4, rtol=1e-5)
    # the images fill the markers in order: swapping a sample's two images changes what it sees
    swapped = mixed_batch(model, [(["blue", "red"], TWO, "blue")])
    with torch.no_grad():
        assert not torch.allclose(model(**swapped).logits, model(**mixed_batch(model, SAMPLES[1:2])).logits)


def test_placeholder_and_image_count_mismatches_are_clear_errors():
    model = tiny_model()
    batch = mixed_batch(model, SAMPLES[:2])  # 1 + 2 images
    ids, pv = batch["input_ids"], batch["pixel_values"]
    with pytest.raises(ValueError, match=r"sample 1: 8 '<image>' ids for 1 image\(s\); expected 1 x 4 = 4"):
        model.embed(ids, pv[:2], [1, 1])
    with pytest.raises(ValueError, match=r"image_counts \[1, 1\] add up to 2 images, but pixel_values holds 3"):
        model.embed(ids, pv, [1, 1])
    with pytest.raises(ValueError, match="image_counts: expected one count per sample"):
        model.embed(ids, pv, [3])
    with pytest.raises(ValueError, match="3 images for 2 samples; pass image_counts"):
        model.embed(ids, pv)
    with pytest.raises(ValueError, match="3 '<image>' markers for 2 image"):
        model.chat([IMAGES["red"], IMAGES["blue"]], [{"role": "user", "content": "<image><image><image> hi"}])
    with pytest.raises(ValueError, match="chat: 3 images for one conversation, more than model.max_images=2"):
        model.chat([IMAGES["red"]] * 3, [{"role": "user", "content": ONE}])
    with pytest.raises(ValueError, match="conversation 0: 3 images, more than model.max_images=2"):
        chat.prepare_conversations(model, pixels(model, ["red"] * 3), [conversation(ONE, "red")], [3])
    with pytest.raises(ValueError, match=r"prepare_conversations: 3 images for 2 conversations"):
        chat.prepare_conversations(model, pv, [conversation(ONE, "red")] * 2)
    short = tiny_model(max_length=4)  # the text before the second image is longer than max_length
    with pytest.raises(ValueError, match=r"conversation 0: max_length=4 text tokens end before its image\(s\) \(2\)"):
        chat.prepare_conversations(short, pixels(short, ["red", "blue"]),
                                   [conversation("what colour is the second? <image> and <image>", "blue")], [2])


@pytest.fixture(scope="module")
def trained():
    """A tiny VLM trained on one batch mixing 1- and 2-image questions (the answer to TWO: the second image)."""
    model = tiny_model(seed=2)
    batch = mixed_batch(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(30):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return model, losses


def test_training_on_a_mixed_batch_lowers_the_loss(trained):
    _, losses = trained
    assert losses[-1] < 0.5 * losses[0], losses


def test_two_images_for_one_question_batched_equals_per_sample(trained):
    model, _ = trained
    groups = [[IMAGES[c] for c in images] for images, _, _ in SAMPLES]
    questions = [q for _, q, _ in SAMPLES]
    batched = model.answer([g if len(g) > 1 else g[0] for g in groups], questions, max_new_tokens=4)
    single = [model.answer([g], q, max_new_tokens=4)[0] for g, q in zip(groups, questions)]
    assert batched == single == [a for _, _, a in SAMPLES]  # the second image's colour where there are two
    messages = [{"role": "user", "content": TWO}]
    pair = [IMAGES["green"], IMAGES["red"]]
    assert model.chat(pair, messages, max_new_tokens=4) == "".join(
        model.chat(pair, messages, stream=True, max_new_tokens=4)) == model.answer([pair], TWO, max_new_tokens=4)[0]
    # the markers place the images: without them both go first, as "<image>\n<image>\n" + the question
    unmarked = [{"role": "user", "content": TWO.replace("<image>", "").strip(" :")}]
    rows = chat.encode_prompt(model, unmarked, 2)
    assert rows.count(model.image_token_id) == 8 and chat.with_image_markers(unmarked, 2)[0]["content"].startswith(
        "<image>\n<image>\n")


def test_labels_of_a_two_image_conversation_are_its_answer_only():
    model = tiny_model()
    batch = mixed_batch(model, SAMPLES[1:2])
    labels = batch["labels"][0]
    assert model.tokenizer.decode(labels[labels != IGNORE_INDEX].tolist()) == " blue" + model.tokenizer.eos_token
