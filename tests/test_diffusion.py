"""TextToImage on tiny models: config, loss, samplers, guidance, seeds, save/load, latent space, VAE."""

import copy
import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from mmlm.config import ConfigError, from_dict, to_dict
from mmlm.models.diffusion import AutoencoderConfig, DenoiserConfig, TextEncoderConfig, TextToImage, TextToImageConfig

CORPUS = ["a red circle", "a blue square", "a green triangle", "a small red square"]


def tiny_config(**overrides) -> TextToImageConfig:
    base = dict(
        image_size=16,
        space="pixel",
        denoiser=DenoiserConfig(block_out_channels=(8, 16), attention=(False, True), norm_num_groups=4,
                                hidden_size=16, num_layers=1),
        text_encoder=TextEncoderConfig(hidden_size=16, num_layers=1, num_heads=1, max_length=8, vocab_size=300),
        vae=AutoencoderConfig(block_out_channels=(8, 16), norm_num_groups=4, batch_size=8),
    )
    base.update(overrides)
    return TextToImageConfig(**base)


def tiny_model(seed=0, **overrides) -> TextToImage:
    torch.manual_seed(seed)
    model = TextToImage.from_config(tiny_config(**overrides), corpus=CORPUS)
    if model.needs_autoencoder_fit:
        model.fit_autoencoder(random_images(8, seed), steps=2)
    return model


def random_images(n, seed=0, size=16):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def pixels_of(images):
    return torch.stack([torch.from_numpy(np.asarray(im).copy()) for im in images])


# ------------------------------------------------------------------ config
def test_config_round_trips_through_from_dict_and_to_dict():
    config = tiny_config(space="latent", denoiser=DenoiserConfig(kind="transformer"), snr_gamma=None)
    assert from_dict(TextToImageConfig, to_dict(config)) == config
    assert from_dict(TextToImageConfig, to_dict(TextToImageConfig())) == TextToImageConfig()


@pytest.mark.parametrize(
    "data, message",
    [
        ({"space": "voxel"}, "model.space"),
        ({"prediction_type": "sample"}, "prediction_type"),
        ({"scheduler": "euler"}, "model.scheduler"),
        ({"space": "latent", "vae": None}, "model.vae"),
        ({"denoiser": {"attention": [False, False]}}, "cross-attention"),
        ({"denoiser": {"attention": [True]}}, "one flag per level"),
        ({"text_encoder": {"kind": "pretrained"}}, "name_or_path"),
        ({"caption_dropout": 1.5}, "caption_dropout"),
        ({"denoiser": {"num_heads": 0}}, "num_heads"),
        ({"denoiser": {"kind": "transformer", "pooled_text": True}}, "pooled_text"),
        ({"space": "patch", "image_size": 30, "patch_size": 4}, "patch_size"),
    ],
)
def test_bad_config_names_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(TextToImageConfig, data)


# ------------------------------------------------------------------ training
@pytest.mark.parametrize("space, kind", [("pixel", "unet"), ("patch", "unet"), ("latent", "unet"),
                                         ("pixel", "transformer")])
def test_training_steps_reduce_the_loss_on_a_fixed_batch(space, kind):
    model = tiny_model(space=space, denoiser=DenoiserConfig(kind=kind, block_out_channels=(8, 16),
                                                            attention=(False, True), norm_num_groups=4,
                                                            hidden_size=16, num_layers=1))
    images, captions = random_images(4, seed=1), ["a red circle", "a blue square"] * 2
    optimizer = torch.optim.Adam([p for g in model.trainable_groups().values() for p in g.parameters()], lr=3e-3)

    def loss_at_fixed_noise():
        torch.manual_seed(123)
        return model.training_loss(images, captions)

    with torch.no_grad():
        before = loss_at_fixed_noise().item()
    for _ in range(20):
        loss = loss_at_fixed_noise()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = loss_at_fixed_noise().item()
    assert after < 0.8 * before


def test_min_snr_with_huge_gamma_equals_plain_mse_for_epsilon_only():
    images, captions = random_images(4), CORPUS

    def loss(**kw):
        model = tiny_model(**kw).eval()
        torch.manual_seed(5)
        return model.training_loss(images, captions).item()

    plain_epsilon = loss(prediction_type="epsilon", snr_gamma=None)
    assert loss(prediction_type="epsilon", snr_gamma=1e9) == pytest.approx(plain_epsilon)
    assert loss(snr_gamma=1e9) != pytest.approx(loss(snr_gamma=None))  # v: weight SNR / (SNR + 1) != 1
    assert loss(snr_gamma=0.1) < loss(snr_gamma=None)


def test_caption_dropout_only_in_training_mode():
    model = tiny_model(caption_dropout=0.5)
    seen = []
    original = model.text_encoder.forward
    model.text_encoder.forward = lambda captions: seen.extend(captions) or original(captions)
    torch.manual_seed(0)
    model.training_loss(random_images(32), ["a red circle"] * 32)
    assert 5 < seen.count("") < 27
    seen.clear()
    model.eval().training_loss(random_images(32), ["a red circle"] * 32)
    assert "" not in seen


def test_frozen_text_encoder_runs_once_per_unique_caption():
    model = tiny_model(text_encoder=TextEncoderConfig(hidden_size=16, num_layers=1, num_heads=1, max_length=8,
                                                      freeze=True), caption_dropout=0.0)
    calls = []
    original = model.text_encoder._run
    model.text_encoder._run = lambda captions: calls.append(list(captions)) or original(captions)
    for _ in range(3):
        model.training_loss(random_images(4), ["a red circle", "a blue square", "a red circle", "a blue square"])
    assert calls == [["a red circle", "a blue square"]]
    assert "text_encoder" not in model.trainable_groups()
    assert not any(p.requires_grad for p in model.text_encoder.parameters())


def test_scratch_text_encoder_is_trained_with_the_denoiser():
    model = tiny_model()
    assert set(model.trainable_groups()) == {"denoiser", "text_encoder"}
    model.training_loss(random_images(2), CORPUS[:2]).backward()
    assert model.text_encoder.model.get_input_embeddings().weight.grad.abs().sum() > 0


def test_training_loss_rejects_bad_input():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        model.training_loss(random_images(2) * 255, CORPUS[:2])
    with pytest.raises(ValueError, match="2 images but 3 captions"):
        model.training_loss(random_images(2), CORPUS[:3])
    with pytest.raises(ValueError, match="16x16"):
        model.training_loss(random_images(2, size=8), CORPUS[:2])


# ------------------------------------------------------------------ patch space, pooled text
def test_patch_space_is_a_lossless_rearrangement_at_a_lower_resolution():
    model = tiny_model(space="patch", patch_size=4)
    images = random_images(3)
    patches = model.encode_images(images)
    assert patches.shape == (3, 48, 4, 4)
    assert model.denoiser.config.in_channels == 48 and model.denoiser.config.sample_size == 4
    assert torch.equal(model.decode(patches), images)
    # Channel c * 16 + i * 4 + j of patch (y, x) holds pixel (4y + i, 4x + j) of colour channel c.
    assert torch.equal(patches[0, ::16, 0, 0], images[0, :, 0, 0])
    assert torch.equal(patches[1, 2 * 16 + 1 * 4 + 3, 2, 1], images[1, 2, 9, 7])


def test_noise_shift_lowers_the_log_snr_of_every_step_and_survives_save_load(tmp_path):
    def log_snr(model):
        a = model.noise_scheduler.alphas_cumprod.double()
        return torch.log(a / (1 - a))

    plain, shifted = tiny_model(), tiny_model(noise_shift=2.0)
    middle = slice(1, 990)  # away from the clamped ends of the cosine schedule
    torch.testing.assert_close(log_snr(shifted)[middle], log_snr(plain)[middle] - 2 * np.log(2.0), atol=1e-3, rtol=0)
    sampler = shifted.make_sampler("dpm++")
    torch.testing.assert_close(sampler.alphas_cumprod, shifted.noise_scheduler.alphas_cumprod)
    shifted.save_pretrained(tmp_path / "t2i")
    loaded = TextToImage.from_pretrained(tmp_path / "t2i")
    torch.testing.assert_close(loaded.noise_scheduler.alphas_cumprod, shifted.noise_scheduler.alphas_cumprod)
    with pytest.raises(ConfigError, match="noise_shift"):
        tiny_config(noise_shift=0.0)


def test_masked_mean_of_the_text_ignores_padding():
    from mmlm.models.diffusion import pooled_text

    text = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    torch.testing.assert_close(pooled_text(text, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))


def test_pooled_text_conditions_every_block_through_the_timestep_embedding():
    pooled = tiny_model()
    assert pooled.denoiser.class_embedding is not None
    pooled.training_loss(random_images(2), CORPUS[:2]).backward()
    assert pooled.denoiser.class_embedding.linear_1.weight.grad.abs().sum() > 0
    # With the cross-attention output zeroed, the caption still changes the prediction, through the pooled path.
    for name, module in pooled.denoiser.named_modules():
        if name.endswith("attn2.to_out.0"):
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)
    text_a, mask_a = pooled.text_encoder(["a red circle"])
    text_b, mask_b = pooled.text_encoder(["a blue square"])
    sample, t = torch.randn(1, 3, 16, 16), torch.tensor(500)
    with torch.no_grad():
        assert not torch.allclose(pooled.predict(sample, t, text_a, mask_a), pooled.predict(sample, t, text_b, mask_b))
    plain = tiny_model(denoiser=DenoiserConfig(block_out_channels=(8, 16), attention=(False, True),
                                               norm_num_groups=4, pooled_text=False))
    assert plain.denoiser.class_embedding is None


# ------------------------------------------------------------------ sampling
@pytest.mark.parametrize("scheduler", ["ddpm", "ddim", "dpm++"])
@pytest.mark.parametrize("space", ["pixel", "patch", "latent"])
def test_each_scheduler_samples_images_of_the_right_size_and_mode(scheduler, space):
    model = tiny_model(space=space)
    images = model.generate(["a red circle", "a blue square"], num_inference_steps=3, scheduler=scheduler,
                            seed=0, num_images_per_prompt=2, batch_size=3)
    assert len(images) == 4
    assert all(isinstance(im, Image.Image) and im.size == (16, 16) and im.mode == "RGB" for im in images)


@pytest.mark.parametrize("scheduler", ["ddpm", "dpm++"])
def test_same_seed_same_images_whatever_the_batch_size(scheduler):
    model = tiny_model()
    prompts = ["a red circle", "a blue square", "a green triangle"]
    a = model.generate(prompts, num_inference_steps=3, scheduler=scheduler, seed=7, batch_size=3)
    b = model.generate(prompts, num_inference_steps=3, scheduler=scheduler, seed=7, batch_size=1)
    c = model.generate(prompts, num_inference_steps=3, scheduler=scheduler, seed=8, batch_size=3)
    assert torch.equal(pixels_of(a), pixels_of(b))
    assert not torch.equal(pixels_of(a), pixels_of(c))


def test_guidance_scale_one_equals_the_unguided_path():
    model = tiny_model().eval()
    text, mask = model.text_encoder(["a red circle", "a blue square"])
    uncond, uncond_mask = model.text_encoder(["", ""])
    sample, t = torch.randn(2, 3, 16, 16), torch.tensor(500)
    with torch.no_grad():
        guided = model.guided_prediction(sample, t, text, mask, uncond, uncond_mask, guidance_scale=1.0)
        unguided = model.guided_prediction(sample, t, text, mask)
        strong = model.guided_prediction(sample, t, text, mask, uncond, uncond_mask, guidance_scale=4.0)
    torch.testing.assert_close(guided, unguided, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(strong, unguided, atol=1e-3)


def test_negative_prompt_changes_guided_images():
    model = tiny_model()
    plain = model.generate("a red circle", num_inference_steps=3, guidance_scale=3.0, seed=0)
    negative = model.generate("a red circle", num_inference_steps=3, guidance_scale=3.0, seed=0,
                              negative_prompt="a blue square")
    assert not torch.equal(pixels_of(plain), pixels_of(negative))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"scheduler": "euler"}, "scheduler"),
        ({"negative_prompt": ["x", "y"]}, "negative_prompt"),
    ],
)
def test_generate_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model().generate("a red circle", **kwargs)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"guidance_scale": float("nan")}, ValueError),
        ({"guidance_scale": float("inf")}, ValueError),
        ({"guidance_scale": "2"}, TypeError),
        ({"num_inference_steps": 2.5}, TypeError),
        ({"num_inference_steps": True}, TypeError),
    ],
)
def test_generate_rejects_nan_guidance_and_non_integer_steps(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        tiny_model().generate("a red circle", **kwargs)


def test_generate_rejects_an_empty_prompt_list():
    with pytest.raises(ValueError, match="empty"):
        tiny_model().generate([])


# ------------------------------------------------------------------ save / load / state dict
@pytest.mark.parametrize("space, kind", [("latent", "unet"), ("patch", "unet"), ("pixel", "transformer")])
def test_save_load_round_trip_reproduces_images_exactly(tmp_path, space, kind):
    model = tiny_model(space=space, denoiser=DenoiserConfig(kind=kind, block_out_channels=(8, 16),
                                                            attention=(False, True), norm_num_groups=4,
                                                            hidden_size=16, num_layers=1))
    model.save_pretrained(tmp_path / "t2i")
    assert {"config.json", "denoiser", "scheduler", "text_encoder", "tokenizer"} <= {
        p.name for p in (tmp_path / "t2i").iterdir()}
    assert not list((tmp_path / "t2i").rglob("*.bin")) and not list((tmp_path / "t2i").rglob("*.pt"))
    loaded = TextToImage.from_pretrained(tmp_path / "t2i")
    assert loaded.config == model.config
    for scheduler in ("ddim", "dpm++"):
        a = model.generate(CORPUS[:2], num_inference_steps=3, seed=0, scheduler=scheduler)
        b = loaded.generate(CORPUS[:2], num_inference_steps=3, seed=0, scheduler=scheduler)
        assert torch.equal(pixels_of(a), pixels_of(b))


def test_folders_saved_with_the_old_class_key_still_load(tmp_path):
    model = tiny_model(space="patch")
    model.save_pretrained(tmp_path / "t2i")
    config_file = tmp_path / "t2i" / "config.json"
    meta = json.loads(config_file.read_text())
    assert meta["model_class"] == "TextToImage" and "_class_name" not in meta  # the VLM's key
    meta["_class_name"] = meta.pop("model_class")  # how folders were written before
    config_file.write_text(json.dumps(meta))
    loaded = TextToImage.from_pretrained(tmp_path / "t2i")
    a = model.generate(CORPUS[:2], num_inference_steps=3, seed=0)
    b = loaded.generate(CORPUS[:2], num_inference_steps=3, seed=0)
    assert torch.equal(pixels_of(a), pixels_of(b))
    config_file.write_text(json.dumps({**meta, "_class_name": "VisionLanguageModel"}))
    with pytest.raises(ValueError, match="model_class is 'VisionLanguageModel'"):
        TextToImage.from_pretrained(tmp_path / "t2i")


def test_the_diffusion_package_imports_no_data_harness_or_vlm_module():
    code = ("import sys, mmlm.models.diffusion; print(sorted(m for m in sys.modules if m.startswith(("
            "'mmlm.data', 'mmlm.training', 'mmlm.tasks', 'mmlm.api', 'mmlm.models.vlm', 'mmlm.models.language'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_from_pretrained_on_a_wrong_folder_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        TextToImage.from_pretrained(tmp_path)


def test_state_dict_swap_like_ema_changes_outputs_and_clears_the_text_cache():
    frozen_text = TextEncoderConfig(hidden_size=16, num_layers=1, num_heads=1, max_length=8, freeze=True)
    model, other = tiny_model(0, text_encoder=frozen_text), tiny_model(1, text_encoder=frozen_text)
    before = model.generate("a red circle", num_inference_steps=2, seed=0)
    assert model.text_encoder._cache
    backup = copy.deepcopy(model.state_dict())
    model.load_state_dict(other.state_dict())
    assert not model.text_encoder._cache
    swapped = model.generate("a red circle", num_inference_steps=2, seed=0)
    model.load_state_dict(backup)
    restored = model.generate("a red circle", num_inference_steps=2, seed=0)
    assert not torch.equal(pixels_of(before), pixels_of(swapped))
    assert torch.equal(pixels_of(before), pixels_of(restored))


# ------------------------------------------------------------------ images in, latent space
def test_image_transform_is_picklable_and_maps_to_minus_one_one():
    model = tiny_model()
    transform = pickle.loads(pickle.dumps(model.image_transform(train=True)))
    image = Image.new("L", (40, 20), 255)
    pixels = transform(image)
    assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32
    assert pixels.max().item() == 1.0 and pixels.min().item() == 1.0
    assert transform(Image.new("RGB", (16, 16), (0, 0, 0))).min().item() == -1.0


def test_latent_training_needs_a_fitted_autoencoder():
    torch.manual_seed(0)
    model = TextToImage.from_config(tiny_config(space="latent"), corpus=CORPUS)
    assert model.needs_autoencoder_fit
    with pytest.raises(RuntimeError, match="fit_autoencoder"):
        model.training_loss(random_images(2), CORPUS[:2])
    with pytest.raises(ValueError, match="pixel space"):
        tiny_model().fit_autoencoder(random_images(2))


def test_fit_autoencoder_learns_and_sets_the_scale_from_the_data():
    torch.manual_seed(0)
    model = TextToImage.from_config(tiny_config(space="latent"), corpus=CORPUS)
    # Smooth images (blobs) are what a 2x VAE can learn in a few steps.
    images = [Image.new("RGB", (16, 16), (255 * (i % 2), 80, 255 * (i % 3 == 0))) for i in range(16)]
    pixels = torch.stack([model.image_transform()(im) for im in images])
    with torch.no_grad():
        first = torch.nn.functional.mse_loss(model.vae(pixels).sample, pixels).item()
    stats = model.fit_autoencoder(images, steps=40)
    with torch.no_grad():
        recon = model.vae.decode(model.vae.encode(pixels).latent_dist.mode()).sample
        latents = model.encode_images(pixels)
    assert stats["steps"] == 40 and torch.nn.functional.mse_loss(recon, pixels).item() < 0.5 * first
    assert not model.needs_autoencoder_fit
    assert float(model.latent_scale) == pytest.approx(stats["scaling_factor"])
    assert latents.std().item() == pytest.approx(1.0, abs=0.2)  # the scale is 1 / std of the latents
    assert not any(p.requires_grad for p in model.vae.parameters())


def test_pretrained_autoencoder_from_a_local_folder_keeps_its_scaling_factor(tmp_path):
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4,
                        scaling_factor=0.37, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    model = tiny_model(space="latent", vae=AutoencoderConfig(name_or_path=str(tmp_path / "vae"), norm_num_groups=4))
    assert not model.needs_autoencoder_fit and float(model.latent_scale) == pytest.approx(0.37)
    assert model.denoiser.config.sample_size == 8 and model.denoiser.config.in_channels == 4
    images = random_images(2)
    torch.manual_seed(3)
    latents = model.encode_images(images)
    torch.manual_seed(3)
    with torch.no_grad():
        expected = vae.encode(images).latent_dist.sample() * 0.37
    torch.testing.assert_close(latents, expected)  # the folder's VAE, scaled by its own factor
    assert torch.isfinite(model.training_loss(images, CORPUS[:2]))


# ------------------------------------------------------------------ the recipe
def test_the_shapes_recipe_trains_and_evaluates_through_the_harness(tmp_path):
    """configs/shapes_diffusion.yaml as written (model, loss, samplers), shrunk to seconds of data and steps."""
    from pathlib import Path

    from mmlm.api import load, train

    recipe = Path(__file__).resolve().parents[1] / "configs" / "shapes_diffusion.yaml"
    shrink = [f"output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.max_minutes=null", "train.warmup_steps=1",
              "train.num_threads=1", "data.batch_size=4", "data.shapes.n_train=16", "data.shapes.n_val=4",
              "data.shapes.n_test=4", "data.shapes.n_compositional=4", "eval.max_samples=4", "eval.num_examples=1",
              "eval.judge_steps=5", 'eval.samplers=["euler:2", "dpm++:3"]']  # a flow recipe's samplers
    result = train(recipe, shrink)
    assert result["step"] == 2
    assert {"test/fidelity", "test/fidelity/dpm++:3", "test/fid"} <= set(result)
    model = load(tmp_path / "run")
    assert model.config.space == "patch" and model.denoiser.config.class_embed_type == "projection"
    assert model.generate("a small red circle", num_inference_steps=2, seed=0)[0].size == (32, 32)


def test_scale_shift_resnets_take_the_text_embedding_as_scale_and_shift_and_round_trip(tmp_path):
    denoiser = DenoiserConfig(block_out_channels=(8, 16), attention=(False, True), norm_num_groups=4,
                              pooled_text=True, resnet_time_scale_shift="scale_shift")
    model = tiny_model(denoiser=denoiser)
    resnet = model.denoiser.down_blocks[0].resnets[0]
    assert resnet.time_emb_proj.out_features == 2 * resnet.conv1.out_channels  # a scale and a shift per channel
    a = model.generate(["a red circle", "a blue square"], num_inference_steps=3, seed=0)
    other = model.generate(["a blue square", "a blue square"], num_inference_steps=3, seed=0)
    assert not torch.equal(pixels_of(a)[0], pixels_of(other)[0])  # same noise, another prompt: it reaches the pixels
    assert torch.equal(pixels_of(a)[1], pixels_of(other)[1])
    model.save_pretrained(tmp_path / "t2i")
    b = TextToImage.from_pretrained(tmp_path / "t2i").generate(["a red circle", "a blue square"],
                                                               num_inference_steps=3, seed=0)
    assert torch.equal(pixels_of(a), pixels_of(b))
    with pytest.raises(ConfigError, match="resnet_time_scale_shift"):
        DenoiserConfig(resnet_time_scale_shift="film")
