"""The VLM as a transformers model: Auto classes load mmlm folders (today's and older ones) and caption like mmlm."""

import json

import pytest
import torch

import mmlm.hf  # noqa: F401  (registers the Auto classes)
from mmlm.hf import MmlmProcessor, MmlmVLMForConditionalGeneration
from mmlm.models import VisionLanguageModel
from hf_helpers import VIT, images, tiny_vlm
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

CNN = {"name": "resnet10t", "features_only_stage": 1, "image_size": 32, "pos_embed_2d": True, "resize": "squash"}
PROMPTS = ["", "look:", "<image> what is it?"]


def hf_captions(model, processor, prompt, max_new_tokens=8):
    inputs = processor(images=images(), text=prompt)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("vision", [VIT, CNN], ids=["vit", "cnn_pos_embed"])
def test_auto_classes_caption_like_mmlm(tmp_path, vision):
    vlm = tiny_vlm(vision=vision)
    vlm.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["model_type"] == "mmlm_vlm" and meta["architectures"] == ["MmlmVLMForConditionalGeneration"]
    assert type(AutoConfig.from_pretrained(tmp_path)).__name__ == "MmlmVLMConfig"
    model = AutoModelForImageTextToText.from_pretrained(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(model, MmlmVLMForConditionalGeneration) and isinstance(processor, MmlmProcessor)
    for prompt in PROMPTS:
        assert processor(images=images()[:1], text=prompt)["input_ids"][0].tolist() == vlm.prompt_ids(prompt)
        assert hf_captions(model, processor, prompt) == vlm.caption(images(), prompt=prompt, max_new_tokens=8)
    torch.testing.assert_close(processor(images=images())["pixel_values"], vlm.pixel_values(images()))


def test_one_prompt_per_image_left_padded_like_mmlm(tmp_path):
    vlm = tiny_vlm()
    vlm.save_pretrained(tmp_path)
    model, processor = AutoModelForImageTextToText.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)
    prompts = ["", "look:", "a long prompt with words", "<image> what?"]
    inputs = processor(images=images(), text=prompts)
    assert (inputs["attention_mask"][:, -1] == 1).all() and (inputs["attention_mask"][:, 0] == 0).any()
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    got = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert got == vlm.caption(images(), prompt=prompts, max_new_tokens=8)


def test_forward_logits_and_loss_match_mmlm(tmp_path):
    vlm = tiny_vlm()
    vlm.save_pretrained(tmp_path)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path)
    batch = vlm.prepare_batch(vlm.pixel_values(images()), ["a red circle", "a blue square", "a green triangle",
                                                            "a star"])
    inputs = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")}
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, vlm(**inputs).logits)
        torch.testing.assert_close(model(**batch).loss, vlm(**batch).loss)


def test_a_folder_saved_before_the_transformers_keys_still_loads_both_ways(tmp_path):
    vlm = tiny_vlm(vision=CNN, prompt="look:")
    vlm.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    old = {"model_class": meta["model_class"], "config": meta["config"]}  # the format before this round
    (tmp_path / "config.json").write_text(json.dumps(old))
    (tmp_path / "README.md").unlink()
    expected = vlm.caption(images(), max_new_tokens=8)
    assert VisionLanguageModel.from_pretrained(tmp_path).caption(images(), max_new_tokens=8) == expected
    model = MmlmVLMForConditionalGeneration.from_pretrained(tmp_path)
    processor = MmlmProcessor.from_pretrained(tmp_path)  # data config and token count probed from the tower
    assert processor.num_image_tokens == vlm.num_image_tokens
    assert hf_captions(model, processor, "look:") == expected
    assert hf_captions(model, processor, None) == expected  # text=None: the model's own prompt, as caption()


def test_save_pretrained_of_the_wrapper_writes_the_mmlm_folder(tmp_path):
    """push_to_hub uploads what save_pretrained writes (the upload itself is huggingface_hub's code)."""
    vlm = tiny_vlm()
    wrapped = MmlmVLMForConditionalGeneration.from_vlm(vlm)
    assert callable(wrapped.push_to_hub)
    wrapped.save_pretrained(tmp_path / "hub", safe_serialization=True)
    files = {p.name for p in (tmp_path / "hub").iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json", "language"} <= files
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "hub")
    processor = AutoProcessor.from_pretrained(tmp_path / "hub")
    assert hf_captions(again, processor, "") == vlm.caption(images(), max_new_tokens=8)


def test_the_wrapper_cannot_be_built_without_weights():
    from mmlm.hf import MmlmVLMConfig

    with pytest.raises(ValueError, match="from_pretrained"):
        MmlmVLMForConditionalGeneration(MmlmVLMConfig())
