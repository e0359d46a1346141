"""The three text-encoder options: scratch, pretrained transformers model, a causal LM's hidden states.

Each must really condition the denoiser: a tiny pixel model trained for a few dozen steps on
"red" -> red images and "blue" -> blue images must generate the colour its prompt names.
"""

import numpy as np
import pytest
import torch
import transformers

from mmlm.config import ConfigError
from mmlm.models.diffusion import DenoiserConfig, TextToImage, TextToImageConfig
from mmlm.models.diffusion.text_encoder import SCRATCH_TOKENIZER, TextEncoder, TextEncoderConfig
from mmlm.models.tokenizer import train_bpe_tokenizer

CORPUS = ["red", "blue", "a red circle", "a blue square"]
COLOURS = {"red": (1.0, -1.0, -1.0), "blue": (-1.0, -1.0, 1.0)}


def tiny_clip(tokenizer, hidden=32):
    return transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=1, max_position_embeddings=8, projection_dim=hidden, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))


def tiny_llama(tokenizer, hidden=16):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))


def pixel_config(text_encoder: TextEncoderConfig) -> TextToImageConfig:
    return TextToImageConfig(
        image_size=8, space="pixel", vae=None, text_encoder=text_encoder, caption_dropout=0.1, snr_gamma=None,
        denoiser=DenoiserConfig(block_out_channels=(16, 32), attention=(False, True), norm_num_groups=8),
    )


def colour_batch(n):
    names = ["red", "blue"] * (n // 2)
    pixels = torch.stack([torch.tensor(COLOURS[c]).view(3, 1, 1).expand(3, 8, 8) for c in names])
    return (pixels + 0.05 * torch.randn_like(pixels)).clamp(-1, 1), names


def assert_conditions_the_denoiser(model: TextToImage, steps=50):
    """Different captions give different outputs, and training makes the prompt decide the colour."""
    text_a, mask_a = model.text_encoder(["red"])
    text_b, mask_b = model.text_encoder(["blue"])
    sample, t = torch.randn(1, 3, 8, 8), torch.tensor(700)
    with torch.no_grad():
        assert not torch.allclose(model.predict(sample, t, text_a, mask_a), model.predict(sample, t, text_b, mask_b))
    params = [p for group in model.trainable_groups().values() for p in group.parameters()]
    optimizer = torch.optim.AdamW(params, lr=2e-3)
    for _ in range(steps):
        loss = model.training_loss(*colour_batch(16))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    images = model.generate(["red", "blue"] * 2, num_inference_steps=10, scheduler="ddim", guidance_scale=2.0, seed=0)
    means = [torch.from_numpy(np.asarray(im, dtype=np.float32)).mean((0, 1)) for im in images]
    for prompt, (r, _, b) in zip(["red", "blue"] * 2, means):
        assert (r > b + 60) if prompt == "red" else (b > r + 60), (prompt, r.item(), b.item())


def test_tokenizer_wraps_captions_and_round_trips(tmp_path):
    tokenizer = train_bpe_tokenizer(CORPUS * 5, 300, **SCRATCH_TOKENIZER)
    ids = tokenizer("a red circle")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a red circle"
    assert tokenizer("")["input_ids"] == [tokenizer.bos_token_id, tokenizer.eos_token_id]
    tokenizer.save_pretrained(tmp_path)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path)("a red circle")["input_ids"] == ids


def test_text_encoder_pads_to_fixed_length_with_a_mask():
    encoder = TextEncoder.from_config(TextEncoderConfig(hidden_size=16, num_layers=1, num_heads=1, max_length=6),
                                      corpus=CORPUS)
    hidden, mask = encoder(["red", "a red circle and a blue square and more", ""])
    assert hidden.shape == (3, 6, 16) and mask.shape == (3, 6)
    assert mask.sum(1).tolist()[1] == 6 and mask.sum(1).tolist()[2] == 2  # truncated; <bos><eos>


def test_scratch_text_encoder_conditions_the_denoiser():
    torch.manual_seed(0)
    config = pixel_config(TextEncoderConfig(hidden_size=32, num_layers=1, num_heads=1, max_length=6))
    assert_conditions_the_denoiser(TextToImage.from_config(config, corpus=CORPUS))


def test_pretrained_text_encoder_from_a_local_folder_conditions_the_denoiser(tmp_path):
    torch.manual_seed(0)
    tokenizer = train_bpe_tokenizer(CORPUS, 300, **SCRATCH_TOKENIZER)
    tiny_clip(tokenizer).save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    config = pixel_config(TextEncoderConfig(kind="pretrained", name_or_path=str(tmp_path / "clip"), max_length=6))
    model = TextToImage.from_config(config)
    assert isinstance(model.text_encoder.model, transformers.CLIPTextModel)
    assert model.text_encoder.frozen and "text_encoder" not in model.trainable_groups()
    assert_conditions_the_denoiser(model)


def test_language_model_hidden_states_condition_the_denoiser_and_share_the_lm(tmp_path):
    torch.manual_seed(0)
    tokenizer = train_bpe_tokenizer(CORPUS, 300, **SCRATCH_TOKENIZER)
    language_model = tiny_llama(tokenizer)
    lm_config = TextEncoderConfig(kind="lm", max_length=6)
    text_encoder = TextEncoder.from_language_model(language_model, tokenizer, lm_config)
    config = pixel_config(text_encoder.config)
    model = TextToImage.from_config(config, text_encoder=text_encoder)
    assert model.text_encoder.model is language_model  # one LM both captions and conditions
    assert all(p.requires_grad for p in language_model.parameters())  # its owner may still train it
    assert "text_encoder" not in model.trainable_groups()
    before = {k: v.clone() for k, v in language_model.state_dict().items()}
    assert_conditions_the_denoiser(model)
    assert all(torch.equal(before[k], v) for k, v in language_model.state_dict().items())  # frozen here

    model.save_pretrained(tmp_path / "t2i")
    loaded = TextToImage.from_pretrained(tmp_path / "t2i")
    assert isinstance(loaded.text_encoder.model, transformers.LlamaForCausalLM)
    a = model.generate("red", num_inference_steps=3, seed=1)[0]
    b = loaded.generate("red", num_inference_steps=3, seed=1)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_language_model_from_a_local_folder_by_config(tmp_path):
    tokenizer = train_bpe_tokenizer(CORPUS, 300, **SCRATCH_TOKENIZER)
    tiny_llama(tokenizer).save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    encoder = TextEncoder.from_config(TextEncoderConfig(kind="lm", name_or_path=str(tmp_path / "lm"), max_length=6,
                                                        hidden_layer=-2))
    hidden, mask = encoder(["red", "blue"])
    assert hidden.shape == (2, 6, 16) and not hidden.requires_grad and encoder.frozen


def test_hidden_layer_0_reads_the_lm_input_embeddings(tmp_path):
    tokenizer = train_bpe_tokenizer(CORPUS, 300, **SCRATCH_TOKENIZER)
    lm = tiny_llama(tokenizer)
    encoder = TextEncoder.from_language_model(lm, tokenizer, TextEncoderConfig(kind="lm", max_length=6,
                                                                              hidden_layer=0))
    hidden, mask = encoder(["a red circle"])
    ids, _ = encoder.tokenize(["a red circle"])
    torch.testing.assert_close(hidden, lm.get_input_embeddings()(ids), rtol=0, atol=0)
    last, _ = TextEncoder.from_language_model(lm, tokenizer, TextEncoderConfig(kind="lm", max_length=6))(
        ["a red circle"])
    assert not torch.allclose(hidden, last)  # -1 is the last layer's output, not the embeddings


@pytest.mark.parametrize("layer", [2, -3])
def test_a_hidden_layer_the_lm_does_not_have_is_a_clear_error(layer):
    tokenizer = train_bpe_tokenizer(CORPUS, 300, **SCRATCH_TOKENIZER)
    with pytest.raises(ConfigError, match=rf"text_encoder.hidden_layer: the LM has 1 layer,.*got {layer}"):
        TextEncoder.from_language_model(tiny_llama(tokenizer), tokenizer,
                                        TextEncoderConfig(kind="lm", hidden_layer=layer))


def test_lm_kind_without_a_model_or_path_is_a_clear_error():
    with pytest.raises(ValueError, match="name_or_path"):
        TextEncoder.from_config(TextEncoderConfig(kind="lm"))


@pytest.mark.parametrize("trust", [False, True])
def test_pretrained_loads_pass_trust_remote_code_from_the_config(tmp_path, monkeypatch, trust):
    tokenizer = train_bpe_tokenizer(CORPUS, 300, **SCRATCH_TOKENIZER)
    tiny_clip(tokenizer).save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    seen = []
    for cls in (transformers.AutoTokenizer, transformers.AutoConfig, transformers.CLIPTextModel):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            seen.append((klass.__name__, kwargs.get("trust_remote_code")))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    config = TextEncoderConfig(kind="pretrained", name_or_path=str(tmp_path / "clip"), max_length=6,
                               trust_remote_code=trust)
    assert TextEncoderConfig(kind="pretrained", name_or_path="x").trust_remote_code is False  # the default
    TextEncoder.from_config(config)
    assert {name for name, _ in seen} >= {"AutoTokenizer", "AutoConfig", "CLIPTextModel"}
    assert all(flag is trust for _, flag in seen), seen



def test_lm_kind_reads_a_saved_captioner_folder_and_trains_beside_its_frozen_lm(tmp_path):
    from hf_helpers import tiny_vlm

    vlm = tiny_vlm()
    vlm.save_pretrained(tmp_path / "run" / "model")  # a run folder, as the demo's captioner leaves it
    encoder = TextEncoder.from_config(TextEncoderConfig(kind="lm", name_or_path=str(tmp_path / "run"), max_length=8))
    assert encoder.frozen and isinstance(encoder.model, transformers.LlamaForCausalLM)
    ids, mask = encoder.tokenize(["a red circle"])
    expected = vlm.language_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    hidden, _ = encoder(["a red circle"])
    assert torch.allclose(hidden, expected, atol=1e-6)  # the captioner's own LM and tokenizer, not a fresh one

    model = TextToImage.from_config(pixel_config(encoder.config))
    assert "text_encoder" not in model.trainable_groups()
    assert_conditions_the_denoiser(model)
    model.save_pretrained(tmp_path / "t2i")
    loaded = TextToImage.from_pretrained(tmp_path / "t2i")
    a = model.generate("red", num_inference_steps=3, seed=1)[0]
    b = loaded.generate("red", num_inference_steps=3, seed=1)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
