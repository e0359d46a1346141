"""Generation options (mmlm.models.generation): pass-through to transformers, the LM's generation_config as the
default, and the parity that decides where the own loop may replace generate()."""

import pytest
import torch
from PIL import Image
from transformers import GenerationConfig

from mmlm.models import LanguageConfig, ProjectorConfig, VisionConfig, VisionLanguageModel, VLMConfig
from mmlm.models import generation
from mmlm.models.language import tokens_to_tensor

CORPUS = ["a red circle", "a blue square", "a green triangle", "a small red square", "a big blue circle"]
TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 256}
TINY_GPT2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 2, "n_positions": 256}
IMAGES = [Image.new("RGB", (32, 32), c) for c in ("red", "blue", "green")]
PROMPTS = ["", "a", "describe the picture:"]  # different lengths: left padding


def tiny_model(lm=TINY_LLAMA, seed=0):
    torch.manual_seed(seed)
    config = VLMConfig(vision=VisionConfig(name="resnet10t", features_only_stage=1, image_size=32, pos_embed_2d=True),
                       projector=ProjectorConfig(type="mlp"), language=LanguageConfig(config=dict(lm), vocab_size=300))
    return VisionLanguageModel.from_config(config, corpus=CORPUS).eval()


def inputs(model):
    ids, mask = tokens_to_tensor([model.prompt_ids(p) for p in PROMPTS], model.pad_token_id, left=True)
    with torch.no_grad():
        return model.embed(ids, model.pixel_values(IMAGES)), mask


def reference(model, embeds, mask, **options):
    """transformers' generate() itself, new tokens cut at EOS."""
    with torch.inference_mode():
        out = model.language_model.generate(inputs_embeds=embeds, attention_mask=mask, eos_token_id=model.eos_token_id,
                                            pad_token_id=model.pad_token_id, **options).tolist()
    return generation.strip_eos(out, model.eos_token_id)


# Settings uses_fast_loop lets the own loop run: each must give generate()'s tokens (sampling: under one seed).
FAST = [dict(do_sample=False), dict(do_sample=True), dict(do_sample=True, temperature=0.7),
        dict(do_sample=True, top_k=5), dict(do_sample=True, temperature=1.3, top_k=0, top_p=0.8),
        dict(do_sample=False, temperature=0.5, top_k=3)]


@pytest.mark.parametrize("lm", [TINY_LLAMA, TINY_GPT2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("options", FAST, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_own_loop_equals_generate_where_it_is_used(lm, options):
    model = tiny_model(lm, seed=1)
    embeds, mask = inputs(model)
    config = generation.resolve_config(model, max_new_tokens=10, **options)
    assert generation.uses_fast_loop(config)
    torch.manual_seed(7)
    ours = generation.decode(model, embeds, mask, 10, config.do_sample, generation.effective(config, "temperature"),
                             generation.effective(config, "top_p"), top_k=generation.effective(config, "top_k"))
    torch.manual_seed(7)
    assert ours == reference(model, embeds, mask, max_new_tokens=10, **options)


@pytest.mark.parametrize("options", [dict(repetition_penalty=1.5), dict(min_new_tokens=6), dict(num_beams=2),
                                     dict(no_repeat_ngram_size=2), dict(do_sample=True, min_p=0.1),
                                     dict(stop_strings=["e"]), dict(num_return_sequences=2, do_sample=True)],
                         ids=lambda o: next(iter(o)))
def test_other_options_go_through_generate(options):
    model = tiny_model(seed=1)
    embeds, mask = inputs(model)
    config = generation.resolve_config(model, max_new_tokens=8, **options)
    assert not generation.uses_fast_loop(config)
    torch.manual_seed(3)
    ours = generation.generate(model, [model.prompt_ids(p) for p in PROMPTS], model.pixel_values(IMAGES),
                               max_new_tokens=8, **options)
    torch.manual_seed(3)
    extra = {"tokenizer": model.tokenizer} if "stop_strings" in options else {}
    expected = model.tokenizer.batch_decode(reference(model, embeds, mask, max_new_tokens=8, **options, **extra),
                                            skip_special_tokens=True)
    assert ours == [t[1:] if t.startswith(" ") else t for t in expected]
    assert len(ours) == len(PROMPTS) * options.get("num_return_sequences", 1)


def test_options_change_the_output_and_unknown_ones_are_refused():
    model = tiny_model(seed=1)
    greedy = model.caption(IMAGES, prompt=PROMPTS, max_new_tokens=8)
    assert model.caption(IMAGES, prompt=PROMPTS, max_new_tokens=8, repetition_penalty=3.0) != greedy
    long = model.caption(IMAGES, prompt=PROMPTS, max_new_tokens=8, min_new_tokens=8)
    assert all(len(model.tokenizer(c)["input_ids"]) >= 6 for c in long)
    stopped = model.caption(IMAGES, prompt=PROMPTS, max_new_tokens=8, stop_strings=[" "], do_sample=False)
    assert all(" " not in c.strip() for c in stopped)
    given = GenerationConfig(repetition_penalty=3.0)  # replaces the LM's own config as the base
    assert model.caption(IMAGES, prompt=PROMPTS, max_new_tokens=8, generation_config=given) == model.caption(
        IMAGES, prompt=PROMPTS, max_new_tokens=8, repetition_penalty=3.0)
    with pytest.raises(TypeError, match="unknown generation option.*topk"):
        model.caption(IMAGES, topk=3)


def test_the_lm_generation_config_is_the_default_in_every_path():
    model = tiny_model(seed=1)
    greedy = model.caption(IMAGES, prompt=PROMPTS, max_new_tokens=8)
    model.language_model.generation_config.repetition_penalty = 3.0  # as Qwen2.5-Instruct ships 1.05
    config = generation.resolve_config(model, max_new_tokens=8)
    assert config.repetition_penalty == 3.0 and not generation.uses_fast_loop(config)
    penalised = model.caption(IMAGES, prompt=PROMPTS, max_new_tokens=8)
    assert penalised != greedy
    assert penalised == model.caption(IMAGES, prompt=PROMPTS, max_new_tokens=8, repetition_penalty=3.0)
    assert model.caption(IMAGES, prompt=PROMPTS, max_new_tokens=8, repetition_penalty=1.0) == greedy
