"""Fine-tuning a PixArt-style diffusers pipeline (PixArtTransformer2DModel + T5 + AutoencoderKL, built offline)
through mmlm's harness, full and LoRA, and handing back a PixArtAlphaPipeline folder that loads without mmlm."""

import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from diffusers_fixtures import tiny_pixart_pipeline  # noqa: E402
from test_diffusers_pipeline import (  # noqa: E402, F401  (manifest: a fixture)
    GUIDANCE, PROMPT, SEED, STEPS, diffusers_image, fixed_loss, manifest, mmlm_image, run_config)

from mmlm.config import ConfigError  # noqa: E402
from mmlm.models.diffusion import TextToImage, TextToImageConfig  # noqa: E402
from mmlm.models.diffusion.config import LoraConfig  # noqa: E402

T5_TARGETS = ("q", "k", "v", "o")  # T5's attention projections


@pytest.fixture(scope="module")
def pixart_folder(tmp_path_factory):
    return tiny_pixart_pipeline(tmp_path_factory.mktemp("pipe") / "tiny-pixart")


# Run by diffusers_image (the SD test's helper): argv folder, lora, out, prompt, steps, guidance, seed.
PIXART_ONLY = textwrap.dedent("""
    import sys
    sys.modules["mmlm"] = None  # any import of mmlm now fails
    try:
        import mmlm  # noqa: F401
        raise SystemExit("mmlm is importable")
    except ImportError:
        pass
    from pathlib import Path
    import torch
    from diffusers import DiffusionPipeline
    folder, lora, out, prompt, steps, guidance, seed = sys.argv[1:8]
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe).__name__ == "PixArtAlphaPipeline", type(pipe)

    def image():  # resolution binning knows PixArt's 256/512/1024 sizes only, not this tiny one's 16
        return pipe(prompt, num_inference_steps=int(steps), guidance_scale=float(guidance), output_type="pt",
                    use_resolution_binning=False, clean_caption=False,
                    generator=torch.Generator().manual_seed(int(seed))).images

    result = {"base": image(), "refusals": []}
    if lora == "lora":
        for load in (lambda: pipe.load_lora_weights(folder), lambda: pipe.transformer.load_lora_adapter(folder)):
            try:
                load()
                result["refusals"].append(None)
            except AttributeError as error:
                result["refusals"].append(str(error))
        from peft import PeftModel  # PixArt's own LoRA guide: the adapter in peft's format, merged in

        pipe.transformer = PeftModel.from_pretrained(pipe.transformer, Path(folder) / "transformer_lora").merge_and_unload()
        if (Path(folder) / "text_encoder_lora").is_dir():
            pipe.text_encoder = PeftModel.from_pretrained(pipe.text_encoder,
                                                          Path(folder) / "text_encoder_lora").merge_and_unload()
        result["lora"] = image()
    torch.save(result, out)
""")


# ------------------------------------------------------------------ loading a PixArt pipeline
def test_a_pixart_folder_gives_its_parts_and_pixart_conventions(pixart_folder):
    model = TextToImage.from_config(TextToImageConfig(pipeline=str(pixart_folder)))
    config = model.config
    assert (config.space, config.image_size, config.prediction_type, config.beta_schedule) == \
        ("latent", 16, "epsilon", "linear")
    assert config.denoiser.kind == "transformer" and type(model.denoiser).__name__ == "PixArtTransformer2DModel"
    assert type(model.text_encoder.model).__name__ == "T5EncoderModel" and model.text_encoder.frozen
    assert float(model.latent_scale) == 0.5
    # As PixArtAlphaPipeline: 120 T5 tokens, the mask used (not every padded position), prompts lower-cased.
    te = model.text_encoder
    assert te.config.max_length == 120 and not te.config.attend_padding and te.lowercase
    _, mask = te(["a red square"])
    assert 1 < int(mask.sum()) < 120


def test_mmlm_samples_as_pixart_alpha_pipeline_does(pixart_folder):
    """Same seed, steps, guidance and sampler: the same image (T5 mask, lower-casing, learned-sigma half)."""
    from diffusers import PixArtAlphaPipeline

    model = TextToImage.from_config(TextToImageConfig(pipeline=str(pixart_folder)))
    pipe = PixArtAlphaPipeline.from_pretrained(pixart_folder)
    pipe.scheduler = model.make_sampler("dpm++")
    prompt = "  A Red SQUARE"
    expected = pipe(prompt, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="pt",
                    use_resolution_binning=False, clean_caption=False,
                    generator=torch.Generator().manual_seed(SEED)).images
    ours = model.generate(prompt, num_inference_steps=STEPS, guidance_scale=GUIDANCE, seed=SEED, output_type="pt")
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
    assert model.denoiser.config.out_channels == 8  # learned sigma: mmlm samples with the first 4 channels


def test_the_micro_conditions_of_1024px_models_reach_the_denoiser(pixart_folder):
    """PixArt-1024 style (use_additional_conditions): the square image's size and aspect 1, as the pipeline."""
    from diffusers import PixArtTransformer2DModel

    model = TextToImage.from_config(TextToImageConfig(pipeline=str(pixart_folder)))
    torch.manual_seed(0)
    model.denoiser = PixArtTransformer2DModel.from_config({**model.denoiser.config, "use_additional_conditions": True})
    sample, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    text, mask = model.text_encoder(["a red square", "a blue circle"])

    def direct(size):
        cond = {"resolution": torch.tensor([[size, size]] * 2, dtype=torch.float32), "aspect_ratio": torch.ones(2, 1)}
        out = model.denoiser(sample, timestep=t, encoder_hidden_states=text, encoder_attention_mask=mask,
                             added_cond_kwargs=cond).sample
        return out[:, :4]

    with torch.no_grad():
        ours = model.predict(sample, t, text, mask)
        torch.testing.assert_close(ours, direct(16))
        assert (ours - direct(32)).abs().max() > 1e-4  # the resolution matters, so 16 is checked
        assert torch.isfinite(model.training_loss(torch.rand(2, 3, 16, 16) * 2 - 1, ["a red square"] * 2))


@pytest.mark.parametrize("kwargs, message", [
    ({"caption_channels": 48}, "caption_channels is 48 but the text encoder's hidden size is 32"),
    ({"latent_channels": 3}, "takes 4 input channels but the VAE's latents have 3"),
])
def test_pixart_parts_that_do_not_fit_are_named_with_both_numbers(tmp_path, kwargs, message):
    folder = tiny_pixart_pipeline(tmp_path / "misfit", **kwargs)
    with pytest.raises(ConfigError, match=message):
        TextToImage.from_config(TextToImageConfig(pipeline=str(folder)))


@pytest.mark.parametrize("part", ["transformer", "text_encoder", "scheduler"])
def test_a_pixart_folder_missing_a_part_is_a_config_error_naming_it(pixart_folder, tmp_path, part):
    broken = tmp_path / "broken"
    shutil.copytree(pixart_folder, broken)
    shutil.rmtree(broken / part)
    with pytest.raises(ConfigError, match=rf"{broken / part} not found \(the pipeline's {part}\)"):
        TextToImage.from_config(TextToImageConfig(pipeline=str(broken)))


def test_lora_targets_the_t5_lacks_are_a_config_error_naming_its_layers(pixart_folder):
    config = TextToImageConfig(pipeline=str(pixart_folder), lora=LoraConfig(rank=2, text_encoder=True))
    with pytest.raises(ConfigError, match=r"model.lora.text_encoder_target_modules: none of \['q_proj', 'k_proj', "
                                          r"'v_proj', 'out_proj'\] is a layer of T5EncoderModel; its linear layers "
                                          r"are named \['k', 'o', 'q', 'v', 'wi_0', 'wi_1', 'wo'\]"):
        TextToImage.from_config(config)


# ------------------------------------------------------------------ fine-tuning through the harness
@pytest.mark.slow
def test_full_fine_tune_hands_back_a_pixart_alpha_pipeline(pixart_folder, manifest, tmp_path):
    from mmlm.api import load, train

    config = run_config(tmp_path, pixart_folder, manifest, lr=3e-3)
    before = fixed_loss(TextToImage.from_config(config.model), manifest)
    result = train(config)
    model = load(tmp_path / "run")
    assert result["step"] == 16 and fixed_loss(model, manifest) < 0.9 * before  # at fixed noise and timesteps
    folder = tmp_path / "run" / "model"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "PixArtAlphaPipeline"
    assert index["transformer"] == ["diffusers", "PixArtTransformer2DModel"]
    assert index["text_encoder"] == ["transformers", "T5EncoderModel"] and not (folder / "unet").exists()
    expected = mmlm_image(model)
    torch.testing.assert_close(diffusers_image(tmp_path, folder, script=PIXART_ONLY)["base"], expected,
                               atol=1e-4, rtol=0)
    untrained = mmlm_image(TextToImage.from_config(config.model))
    assert (untrained - expected).abs().max() > 1e-3  # fine-tuning changed the images


@pytest.mark.slow
def test_lora_fine_tune_saves_peft_adapters_since_diffusers_has_no_pixart_lora_loader(pixart_folder, manifest,
                                                                                         tmp_path):
    from mmlm.api import load, train

    lora = {"rank": 4, "text_encoder": True, "text_encoder_target_modules": list(T5_TARGETS)}
    config = run_config(tmp_path, pixart_folder, manifest, lr=3e-2, lora=lora)
    model = TextToImage.from_config(config.model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in trainable)
    assert {n.split(".")[0] for n in trainable} == {"denoiser", "text_encoder"}
    before = fixed_loss(model, manifest)
    train(config)
    folder = tmp_path / "run" / "model"
    assert not (folder / "pytorch_lora_weights.safetensors").exists()  # diffusers' LoRA format has no PixArt reader
    for part in ("transformer_lora", "text_encoder_lora"):
        assert {p.name for p in (folder / part).iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    tuned = load(tmp_path / "run")
    assert fixed_loss(tuned, manifest) < 0.97 * before
    expected = mmlm_image(tuned)
    base = mmlm_image(TextToImage.from_config(TextToImageConfig(pipeline=str(pixart_folder))))
    assert (expected - base).abs().max() > 1e-3  # the adapters change the output ...
    # ... and without mmlm: the folder holds the untouched base weights; the peft adapters change them the same way.
    result = diffusers_image(tmp_path, folder, lora=True, script=PIXART_ONLY)
    torch.testing.assert_close(result["base"], base, atol=1e-4, rtol=0)
    torch.testing.assert_close(result["lora"], expected, atol=1e-4, rtol=0)
    # diffusers 0.42 has no LoRA loader for PixArt, which is why the adapters are in peft's format:
    assert result["refusals"] == ["'PixArtAlphaPipeline' object has no attribute 'load_lora_weights'",
                                  "'PixArtTransformer2DModel' object has no attribute 'load_lora_adapter'"]
