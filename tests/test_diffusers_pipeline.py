"""Fine-tuning a pretrained diffusers pipeline (tiny Stable-Diffusion-style, built offline) through mmlm's harness,
and handing back a diffusers pipeline folder that loads without mmlm."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from diffusers_fixtures import tiny_sd_pipeline  # noqa: E402

from mmlm.config import ConfigError, load_config  # noqa: E402
from mmlm.models.diffusion import TextToImage, TextToImageConfig  # noqa: E402
from mmlm.models.diffusion.config import LoraConfig  # noqa: E402

PROMPT, STEPS, GUIDANCE, SEED = "a red square", 4, 3.0, 7
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 20)}


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return tiny_sd_pipeline(tmp_path_factory.mktemp("pipe") / "tiny-sd")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """Eight images of other sizes than the pipeline's 16x16 (so resize + crop run), with captions."""
    folder = tmp_path_factory.mktemp("data")
    rows = []
    for i in range(8):
        colour = list(COLOURS)[i % 4]
        image = Image.new("RGB", (24 + 2 * i, 20), (240, 240, 240))
        image.paste(COLOURS[colour], (4, 4, 16, 16))
        image.save(folder / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": f"a {colour} square"})
    path = folder / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def run_config(tmp_path, sd_folder, manifest, lr=5e-3, **model):
    return load_config({
        "task": "diffusion", "output_dir": str(tmp_path / "run"),
        "data": {"source": str(manifest), "val_source": str(manifest), "batch_size": 4, "caption_choice": "first"},
        "model": {"pipeline": str(sd_folder), "crop": "center", "caption_dropout": 0.0, "snr_gamma": 5.0,
                  "noise_offset": 0.05, **model},
        "train": {"max_steps": 16, "warmup_steps": 0, "lr": lr, "schedule": "constant", "log_every": 4,
                  "weight_decay": 0.0, "ema_decay": None, "max_grad_norm": 1.0, "eval_every": 8},
        "eval": {"splits": [], "prompts": [PROMPT], "samplers": ["dpm++:2"], "num_examples": 1},
    })


def fixed_loss(model, manifest) -> float:
    """The diffusion loss on the manifest's images at fixed noise and timesteps (same seeds every call)."""
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    transform = model.image_transform()
    pixels = torch.stack([transform(Image.open(manifest.parent / r["image"]).convert("RGB")) for r in rows])
    model.eval()
    losses = []
    with torch.no_grad():
        for seed in range(6):
            torch.manual_seed(seed)
            losses.append(model.training_loss(pixels, [r["caption"] for r in rows]).item())
    return sum(losses) / len(losses)


DIFFUSERS_ONLY = textwrap.dedent("""
    import sys
    sys.modules["mmlm"] = None  # any import of mmlm now fails
    try:
        import mmlm  # noqa: F401
        raise SystemExit("mmlm is importable")
    except ImportError:
        pass
    import torch
    from diffusers import StableDiffusionPipeline
    folder, lora, out, prompt, steps, guidance, seed = sys.argv[1:8]
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    if lora == "lora":
        pipe.load_lora_weights(folder)
    images = pipe(prompt, num_inference_steps=int(steps), guidance_scale=float(guidance), output_type="pt",
                  generator=torch.Generator().manual_seed(int(seed))).images
    torch.save(images, out)
""")


def diffusers_image(tmp_path, folder, lora=False, script=DIFFUSERS_ONLY) -> torch.Tensor:
    """The image StableDiffusionPipeline makes from ``folder`` in a process where ``import mmlm`` fails (or what
    ``script``, taking the same arguments, saves)."""
    out = tmp_path / "image.pt"
    subprocess.run([sys.executable, "-c", script, str(folder), "lora" if lora else "-", str(out), PROMPT, str(STEPS),
                    str(GUIDANCE), str(SEED)], check=True, capture_output=True, text=True, timeout=600)
    return torch.load(out)


def mmlm_image(model) -> torch.Tensor:
    return model.generate(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, seed=SEED, output_type="pt")


# ------------------------------------------------------------------ loading a pipeline
def test_a_pipeline_folder_gives_its_parts_resolution_scaling_and_schedule(sd_folder):
    model = TextToImage.from_config(TextToImageConfig(pipeline=str(sd_folder)))
    config = model.config
    assert (config.space, config.image_size, config.prediction_type) == ("latent", 16, "epsilon")
    assert config.beta_schedule == "scaled_linear" and model.noise_scheduler.config.beta_end == 0.012
    assert float(model.latent_scale) == 0.5 and not model.needs_autoencoder_fit  # the VAE's own scaling_factor
    assert model.text_encoder.config.max_length == 12  # the pipeline tokenizer's model_max_length
    assert type(model.denoiser).__name__ == "UNet2DConditionModel" and model.text_encoder.frozen
    overridden = TextToImage.from_config(TextToImageConfig(pipeline=str(sd_folder), prediction_type="v_prediction"))
    assert overridden.noise_scheduler.config.prediction_type == "v_prediction"


def test_a_folder_missing_a_part_names_it(sd_folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sd_folder, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(FileNotFoundError, match=r"vae.*not found"):
        TextToImage.from_config(TextToImageConfig(pipeline=str(broken)))
    (broken / "model_index.json").unlink()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        TextToImage.from_config(TextToImageConfig(pipeline=str(broken)))


@pytest.mark.parametrize("kwargs, message", [
    ({"text_width": 48}, "cross_attention_dim is 32 but the text encoder's hidden size is 48"),
    ({"latent_channels": 3}, "takes 4 input channels but the VAE's latents have 3"),
])
def test_parts_that_do_not_fit_are_named_with_both_numbers(tmp_path, kwargs, message):
    folder = tiny_sd_pipeline(tmp_path / "misfit", **kwargs)
    with pytest.raises(ConfigError, match=message):
        TextToImage.from_config(TextToImageConfig(pipeline=str(folder)))


def test_centre_and_random_crops_keep_the_aspect_ratio_at_the_pipeline_resolution(sd_folder):
    model = TextToImage.from_config(TextToImageConfig(pipeline=str(sd_folder), crop="random"))
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    centre = model.image_transform(train=False)(image)
    assert centre.shape == (3, 16, 16)
    assert centre[:, :, 0].mean() > 0.9 and centre[:, :, -1].mean() < -0.9  # 32x16 centre-cropped: half and half
    crops = {tuple(model.image_transform(train=True)(image)[0, 0, ::5].tolist()) for _ in range(8)}
    assert len(crops) > 1  # random crops move


# ------------------------------------------------------------------ fine-tuning through the harness
def test_full_fine_tune_through_mmlm_train_hands_back_a_diffusers_pipeline(sd_folder, manifest, tmp_path):
    from mmlm.api import load, train

    config = run_config(tmp_path, sd_folder, manifest)
    before = fixed_loss(TextToImage.from_config(config.model), manifest)
    result = train(config)
    run = tmp_path / "run"
    model = load(run)
    assert fixed_loss(model, manifest) < 0.9 * before  # the loss fell at fixed noise and timesteps
    grids = sorted(p.parent.name for p in run.glob("eval/*/val_generated.png"))
    assert len(grids) == 2, grids  # the validation prompt, sampled at each evaluation (steps 8 and 16)
    folder = run / "model"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    for part in ("unet", "text_encoder", "tokenizer", "vae", "scheduler"):
        assert (folder / part).is_dir(), part
    expected = mmlm_image(model)
    torch.testing.assert_close(diffusers_image(tmp_path, folder), expected, atol=1e-4, rtol=0)
    untrained = mmlm_image(TextToImage.from_config(config.model))
    assert (untrained - expected).abs().max() > 1e-3  # fine-tuning changed the images
    assert result["step"] == 16


def test_lora_fine_tune_saves_weights_load_lora_weights_takes(sd_folder, manifest, tmp_path):
    from mmlm.api import load, train

    config = run_config(tmp_path, sd_folder, manifest, lr=3e-2, lora={"rank": 4})  # LoRA takes a higher LR
    model = TextToImage.from_config(config.model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and n.startswith("denoiser.") for n in trainable)
    before = fixed_loss(model, manifest)
    train(config)
    folder = tmp_path / "run" / "model"
    assert (folder / "pytorch_lora_weights.safetensors").is_file()
    tuned = load(tmp_path / "run")
    assert fixed_loss(tuned, manifest) < 0.97 * before
    expected = mmlm_image(tuned)
    base = mmlm_image(TextToImage.from_config(TextToImageConfig(pipeline=str(sd_folder))))
    assert (expected - base).abs().max() > 1e-3  # the adapter changes the output ...
    # ... and without mmlm: the folder holds the untouched base weights; load_lora_weights changes them the same way
    torch.testing.assert_close(diffusers_image(tmp_path, folder), base, atol=1e-4, rtol=0)
    torch.testing.assert_close(diffusers_image(tmp_path, folder, lora=True), expected, atol=1e-4, rtol=0)


def test_text_encoder_lora_trains_only_adapters_and_round_trips(sd_folder, tmp_path):
    config = TextToImageConfig(pipeline=str(sd_folder), lora=LoraConfig(rank=2, alpha=4, text_encoder=True))
    torch.manual_seed(0)
    model = TextToImage.from_config(config)
    assert not model.text_encoder.frozen and "text_encoder" in model.trainable_groups()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith("text_encoder.") for n in trainable) and all("lora_" in n for n in trainable)
    with torch.no_grad():  # non-zero adapters, so the round trip is checked on weights that matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "saved")
    loaded = TextToImage.from_pretrained(tmp_path / "saved")
    torch.testing.assert_close(mmlm_image(loaded), mmlm_image(model), atol=1e-5, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients(sd_folder):
    model = TextToImage.from_config(TextToImageConfig(pipeline=str(sd_folder)))
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1

    def grads():
        model.zero_grad()
        torch.manual_seed(0)
        model.train()
        model.training_loss(pixels, ["a red square", "a blue square"]).backward()
        return torch.cat([p.grad.flatten() for p in model.denoiser.parameters() if p.grad is not None])

    plain = grads()
    model.enable_gradient_checkpointing()
    assert model.denoiser.is_gradient_checkpointing
    torch.testing.assert_close(grads(), plain, atol=1e-6, rtol=1e-5)


def test_the_recipe_points_at_a_folder_the_user_names(sd_folder):
    recipe = Path(__file__).resolve().parents[1] / "configs" / "finetune_sd_lora.yaml"
    config = load_config(recipe, [f"model.pipeline={sd_folder}"])
    assert config.model.lora is not None and config.model.pipeline == str(sd_folder)


SCRATCH_PIPELINE = textwrap.dedent("""
    import sys
    sys.modules["mmlm"] = None
    import torch
    from diffusers import DiffusionPipeline
    folder, out = sys.argv[1:3]
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert type(pipe).__name__ == "MmlmTextToImagePipeline"
    images = pipe(["a red circle", "a blue square"], num_inference_steps=3, guidance_scale=2.5, output_type="pt",
                  generator=[torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]).images
    torch.save(images, out)
""")


@pytest.mark.parametrize("space", ["patch", "latent"])
def test_a_from_scratch_generator_is_a_diffusers_pipeline_too(tmp_path, space):
    """Own text encoder, patch or latent space, pooled text: the saved folder samples the same without mmlm."""
    from test_diffusion import tiny_model

    from mmlm.models.diffusion import DenoiserConfig

    model = tiny_model(space=space, denoiser=DenoiserConfig(block_out_channels=(8, 16), attention=(False, True),
                                                            norm_num_groups=4, pooled_text=True))
    model.save_pretrained(tmp_path / "gen")
    assert json.loads((tmp_path / "gen" / "model_index.json").read_text())["_class_name"][1] == \
        "MmlmTextToImagePipeline"
    expected = model.generate(["a red circle", "a blue square"], num_inference_steps=3, guidance_scale=2.5, seed=5,
                              output_type="pt")
    subprocess.run([sys.executable, "-c", SCRATCH_PIPELINE, str(tmp_path / "gen"), str(tmp_path / "out.pt")],
                   check=True, capture_output=True, text=True, timeout=600)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, atol=1e-4, rtol=0)
    reloaded = TextToImage.from_pretrained(tmp_path / "gen")  # and mmlm's own loader still reads it
    torch.testing.assert_close(reloaded.generate(["a red circle", "a blue square"], num_inference_steps=3,
                                                 guidance_scale=2.5, seed=5, output_type="pt"), expected)
