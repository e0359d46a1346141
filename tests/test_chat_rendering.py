"""One rendering in training, caption and classify (mmlm.models.rendering): with an LM's own chat template the
prompt is a user turn and the answer the assistant's reply, exactly as apply_chat_template renders them; with
chat_template: none and with the tokenizers we train, the plain prompt of before."""

import sys

import pytest
import torch
from PIL import Image

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from hub_fixtures import language_config  # noqa: E402

from mmlm.config import load_config  # noqa: E402
from mmlm.models import LanguageConfig, ProjectorConfig, VisionConfig, VisionLanguageModel, VLMConfig  # noqa: E402
from mmlm.models import generation, rendering  # noqa: E402
from mmlm.models.language import IMAGE_TOKEN  # noqa: E402
from mmlm.models.sequence import IGNORE_INDEX  # noqa: E402
from mmlm.tasks import TASKS  # noqa: E402

VISION = {"name": "resnet10t", "features_only_stage": 1, "image_size": 16, "pos_embed_2d": True}
PROJECTOR = {"type": "pixel_shuffle", "reduce_factor": 2}  # 4 image tokens
LABELS = ["red circle", "blue square", "green star"]
IMAGES = [Image.new("RGB", (16, 16), c) for c in ("red", "blue")]
CUSTOM = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
          "{% if add_generation_prompt %}[assistant] {% endif %}")


def qwen2_vlm(seed=0, **kw) -> VisionLanguageModel:
    """A tiny VLM on the offline Qwen2-shaped LM, whose tokenizer has its own ChatML template."""
    torch.manual_seed(seed)
    return VisionLanguageModel.from_config(VLMConfig(
        vision=VisionConfig(**VISION), projector=ProjectorConfig(**PROJECTOR), language=language_config("qwen2"),
        max_length=96, **kw)).eval()


def trained_tokenizer_vlm(**kw) -> VisionLanguageModel:
    torch.manual_seed(0)
    lm = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
          "num_attention_heads": 2, "num_key_value_heads": 2}
    return VisionLanguageModel.from_config(VLMConfig(
        vision=VisionConfig(**VISION), projector=ProjectorConfig(**PROJECTOR),
        language=LanguageConfig(config=lm, vocab_size=300), **kw), corpus=["describe: a red circle"] + LABELS).eval()


def pixels(model, images=IMAGES):
    transform = model.image_transform()
    return torch.stack([transform(im) for im in images])


def template_ids(model, messages, **kw) -> list[int]:
    """apply_chat_template's token ids, each <image> expanded to the model's placeholders."""
    out = model.tokenizer.apply_chat_template(messages, tokenize=True, **kw)
    ids = list(out["input_ids"] if hasattr(out, "keys") else out)
    return [t for i in ids for t in ([i] * model.num_image_tokens if i == model.image_token_id else [i])]


def user(text):
    return {"role": "user", "content": text}


@pytest.fixture(scope="module")
def model():
    return qwen2_vlm()


def test_the_caption_prompt_is_apply_chat_template_s_and_the_caption_stops_at_the_end_of_turn(model):
    assert rendering.caption_template(model) == model.tokenizer.chat_template
    for prompt, content in (("describe:", "<image>\ndescribe:"), ("", "<image>"),
                            ("<image> the picture shows", "<image> the picture shows")):
        expected = template_ids(model, [user(content)], add_generation_prompt=True)
        assert rendering.caption_prompt_ids(model, prompt) == expected, prompt
    im_end = model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert rendering.caption_stop_ids(model) == [im_end]
    # caption() continues exactly that prompt and stops at <|im_end|>, as vlm.chat does
    config = generation.resolve_config(model, max_new_tokens=5, do_sample=False)
    prompt = template_ids(model, [user("<image>\ndescribe:")], add_generation_prompt=True)
    rows = generation.generate_rows(model, [prompt] * 2, pixels(model).to(model.device), config, [im_end])
    assert model.caption(IMAGES, prompt="describe:", max_new_tokens=5) == generation._texts(model, rows)
    assert model.caption(IMAGES[0], prompt="describe:", max_new_tokens=5) == [model.chat(
        IMAGES[0], [user("describe:")], max_new_tokens=5, do_sample=False)]


def test_training_labels_cover_exactly_the_answer_and_its_end_of_turn(model):
    batch = rendering.prepare_captions(model, pixels(model), ["a red circle", "a blue square"],
                                       ["describe:", "what is it?"])
    im_end = model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for row, mask, labels, (prompt, caption) in zip(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                                    [("describe:", "a red circle"), ("what is it?", "a blue square")]):
        messages = [user("<image>\n" + prompt), {"role": "assistant", "content": caption}]
        whole = template_ids(model, messages)
        ids = row[mask.bool()].tolist()
        assert whole[:len(ids)] == ids and ids[-1] == im_end  # the conversation, cut after the reply's <|im_end|>
        start = len(template_ids(model, messages[:1], add_generation_prompt=True))
        answer = model.tokenizer(caption, add_special_tokens=False)["input_ids"] + [im_end]
        trained = [t for t, label in enumerate(labels.tolist()) if label != IGNORE_INDEX]
        assert trained == list(range(start, start + len(answer))) and ids[start:] == answer


def reference_scores(model, pv, template, eos):
    """Mean log-probability of each label's reply tokens (and <|im_end|> when ``eos``) after the prompt rendered by
    apply_chat_template: one forward pass per label, independent of the scoring code."""
    before, after = template.split("{}")
    before = before.rstrip()
    content = before if IMAGE_TOKEN in before else "<image>\n" + before
    prompt = template_ids(model, [user(content)], add_generation_prompt=True)
    im_end = model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = torch.empty(len(pv), len(LABELS))
    for j, label in enumerate(LABELS):
        reply = (label + after).strip()
        answer = model.tokenizer(reply, add_special_tokens=False)["input_ids"] + [im_end]
        whole = template_ids(model, [user(content), {"role": "assistant", "content": reply}])
        assert whole[:len(prompt) + len(answer)] == prompt + answer  # the reply's tokens inside the conversation
        answer = answer if eos else answer[:-1]
        ids = torch.tensor([prompt + answer] * len(pv))
        with torch.no_grad():
            logprobs = model(pv, ids, torch.ones_like(ids)).logits.float().log_softmax(-1)
        positions = torch.arange(len(prompt) - 1, len(prompt) + len(answer) - 1)
        out[:, j] = logprobs[:, positions, answer].mean(1)
    return out


@pytest.mark.parametrize("eos", [True, False])
@pytest.mark.parametrize("template", ["a photo of a {}", "<image> this is a {}."])
def test_classify_scores_the_labels_as_the_reply_to_the_rendered_prompt(model, template, eos):
    pv = pixels(model)
    expected = reference_scores(model, pv, template, eos)
    for method in ("tree", "expand", "naive"):
        scores = model.label_log_likelihoods(pv, LABELS, template, method=method, eos=eos)
        torch.testing.assert_close(scores, expected, atol=1e-4, rtol=0, msg=method)
    probs = model.classify(IMAGES, LABELS, template, eos=eos)
    torch.testing.assert_close(probs, expected.softmax(-1), atol=1e-4, rtol=0)


def test_caption_and_classify_after_training_on_the_rendering():
    """Trained on the chat rendering (as the captioning task trains), caption and classify use it too."""
    model = qwen2_vlm(seed=1)
    pv = pixels(model)
    batch = rendering.prepare_captions(model, pv, LABELS[:2], ["describe:"] * 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(30):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert model.caption(IMAGES, prompt="describe:", max_new_tokens=6) == LABELS[:2]
    assert model.classify(IMAGES, LABELS[:2], "describe: {}").argmax(-1).tolist() == [0, 1]


def tiny_task(task, **model):
    config = {"task": task, "output_dir": "unused", "model": {"vision": VISION, "projector": PROJECTOR, **model},
              "data": {"source": "shapes", "shapes": {"n_train": 4, "n_val": 2, "n_test": 2, "image_size": 16,
                                                      "max_shapes": 1}, "batch_size": 2}}
    return TASKS[task](load_config(config))


@pytest.mark.parametrize("task", ["captioning", "classification"])
def test_the_tasks_train_on_the_rendering_caption_and_classify_use(task):
    t = tiny_task(task, language={"name_or_path": language_config("qwen2").name_or_path}, max_length=96)
    torch.manual_seed(0)
    model = t.build_model()
    train = t.build_datasets(model)["train"]
    batch = t.collate([train[i] for i in range(2)])
    inputs = t.model_inputs(model, batch)
    prompts, targets = t.prompts_and_targets(batch)
    expected = rendering.prepare_captions(model, batch["pixel_values"], targets, prompts)
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(inputs[key], expected[key]), key
    im_end = model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    labels = inputs["labels"][0]
    assert model.tokenizer.decode(labels[labels != IGNORE_INDEX].tolist()) == targets[0].strip() + "<|im_end|>"
    assert labels[labels != IGNORE_INDEX][-1] == im_end


# ----------------------------------------------------------------------------------------- the plain prompt kept
def test_none_and_trained_tokenizers_keep_the_plain_prompt_and_an_explicit_template_renders():
    plain_models = [qwen2_vlm(chat_template="none"), trained_tokenizer_vlm()]
    for model in plain_models:
        assert rendering.caption_template(model) is None
        assert rendering.caption_prompt_ids(model, "describe:") == model.prompt_ids("describe:")
        assert rendering.caption_stop_ids(model) == []
        for eos in (True, False):
            ours = rendering.encode_caption(model, "describe:", " a red circle", eos=eos)
            theirs = model.encode_sample("describe:", " a red circle", eos=eos)
            assert (ours.input_ids, ours.labels) == (theirs.input_ids, theirs.labels)
        pv = pixels(model)
        ours = rendering.prepare_captions(model, pv, ["a red circle", "a blue square"])
        theirs = model.prepare_batch(pv, ["a red circle", "a blue square"])
        assert all(torch.equal(ours[k], theirs[k]) for k in ("input_ids", "attention_mask", "labels"))
    custom = trained_tokenizer_vlm(chat_template=CUSTOM)  # a template given in the config renders captions too
    assert rendering.caption_template(custom) == CUSTOM
    text = custom.tokenizer.apply_chat_template([user("<image>\ndescribe:")], chat_template=CUSTOM, tokenize=False,
                                                add_generation_prompt=True)
    assert text.endswith("[assistant] ") and IMAGE_TOKEN in text
    ids = custom.tokenizer(text, add_special_tokens=False)["input_ids"]
    expanded = [t for i in ids for t in ([i] * custom.num_image_tokens if i == custom.image_token_id else [i])]
    assert rendering.caption_prompt_ids(custom, "describe:") == expanded


def test_explain_and_the_hf_processor_see_the_rendered_caption(model, tmp_path):
    """explain maps the answer's tokens as training renders them; AutoProcessor's prompt is caption's prompt."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import mmlm.hf  # noqa: F401  (registers the Auto classes)

    sample = rendering.encode_caption(model, "describe:", "a red circle", eos=False)
    answer = [i for i, label in zip(sample.input_ids, sample.labels) if label != IGNORE_INDEX]
    item = model.explain(IMAGES[:1], text="a red circle", prompt="describe:")[0]
    assert item.tokens == [model.tokenizer.decode([i]) for i in answer]
    assert [w for w, _ in item.words] == ["a", "red", "circle"] and item.maps["rollout"].shape[0] == len(answer)
    model.save_pretrained(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    inputs = processor(images=IMAGES[:1], text="describe:")
    assert inputs["input_ids"][0].tolist() == rendering.caption_prompt_ids(model, "describe:")
    hf = AutoModelForImageTextToText.from_pretrained(tmp_path)
    out = hf.generate(**inputs, max_new_tokens=6, do_sample=False)
    text = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    assert text == model.caption(IMAGES[:1], prompt="describe:", max_new_tokens=6)[0]
