"""Representation alignment (model.align, REPA): the loss term, what it trains, its errors, and that it leaves
sampling and the saved model alone."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmlm.config import ConfigError, from_dict
from mmlm.models.diffusion import DenoiserConfig, TextEncoderConfig, TextToImage, TextToImageConfig
from mmlm.models.diffusion.config import AlignConfig

CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a small red square"]
TOWER = {"name": "resnet10t", "features_only_stage": 1, "image_size": 64}  # stride 4: a 16x16 grid, 64 wide


def aligned_model(seed=0, **align) -> TextToImage:
    torch.manual_seed(seed)
    config = TextToImageConfig(
        image_size=16, space="pixel", objective="flow",
        denoiser=DenoiserConfig(block_out_channels=(8, 16), attention=(False, True), norm_num_groups=4),
        text_encoder=TextEncoderConfig(hidden_size=16, num_layers=1, num_heads=1, max_length=8, vocab_size=300),
        align=AlignConfig(**{"vision": TOWER, **align}),
    )
    return TextToImage.from_config(config, corpus=CAPTIONS)


def batch(seed=0):
    return torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def generators(seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(4)]


def test_the_loss_adds_weight_times_one_minus_cosine_of_the_projected_mid_block_against_the_encoder():
    model = aligned_model(weight=0.7)
    pixels = batch()
    aligned = model.training_loss(pixels, CAPTIONS, generators())

    features = []
    hook = model.denoiser.mid_block.register_forward_hook(lambda m, a, out: features.append(out))
    alignment, model.alignment = model.alignment, None
    plain = model.training_loss(pixels, CAPTIONS, generators())  # the same draws, no alignment
    hook.remove()
    # By hand: the tower sees the clean images at its 64x64 in ImageNet normalisation; its 16x16 grid is pooled
    # to the mid block's 8x8 (the UNet halves 16x16 once) and compared token by token with the MLP's output.
    images = F.interpolate((pixels + 1) / 2, size=(64, 64), mode="bicubic", align_corners=False).clamp(0, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        grid = alignment.encoder((images - mean) / std).transpose(1, 2).reshape(4, 64, 16, 16)
    targets = F.adaptive_avg_pool2d(grid, (8, 8)).flatten(2).transpose(1, 2)
    feature = features[0]
    assert feature.shape == (4, 16, 8, 8)
    projected = alignment.projector(feature.flatten(2).transpose(1, 2))
    expected = 0.7 * (1 - F.cosine_similarity(projected, targets, dim=-1)).mean()
    assert torch.allclose(aligned - plain, expected, atol=1e-5)


def test_alignment_trains_the_projector_and_the_denoiser_below_the_layer_only():
    model = aligned_model()
    assert "align" in model.trainable_groups()
    encoder_weights = [p.clone() for p in model.alignment.encoder.parameters()]
    optimizer = torch.optim.Adam([p for g in model.trainable_groups().values() for p in g.parameters()], lr=3e-3)
    pixels = batch()

    def alignment_term():
        targets = model.alignment.targets(pixels)
        with model.alignment.capture():
            model._denoising_loss(pixels, CAPTIONS, generators())
        return model.alignment.loss(targets)

    first = alignment_term()
    first.backward()
    assert model.denoiser.down_blocks[0].resnets[0].conv1.weight.grad.abs().sum() > 0  # below the mid block
    assert model.denoiser.conv_out.weight.grad is None  # above it: the term does not reach
    optimizer.zero_grad()
    for _ in range(30):
        loss = model.training_loss(pixels, CAPTIONS, generators())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        assert alignment_term() < 0.5 * first.detach()
    assert all(torch.equal(a, b) for a, b in zip(encoder_weights, model.alignment.encoder.parameters()))


def test_sampling_never_runs_the_encoder_and_the_saved_model_leaves_the_alignment_out(tmp_path):
    model = aligned_model()
    calls = []
    model.alignment.encoder.register_forward_hook(lambda *args: calls.append(1))
    images = model.generate("a red circle", num_inference_steps=3, seed=1, output_type="pt")
    assert not calls
    model.save_pretrained(tmp_path / "t2i")
    saved = (tmp_path / "t2i" / "denoiser" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert b"projector" not in saved and b"encoder.backbone" not in saved
    loaded = TextToImage.from_pretrained(tmp_path / "t2i")
    assert loaded.alignment is None
    again = loaded.generate("a red circle", num_inference_steps=3, seed=1, output_type="pt")
    assert np.array_equal(images.numpy(), again.numpy())


def test_a_vlm_folder_lends_its_vision_tower(tmp_path):
    from hf_helpers import tiny_vlm

    vlm = tiny_vlm()
    vlm.save_pretrained(tmp_path / "run" / "model")  # a run folder, as the demo's captioner leaves it
    model = aligned_model(vision=None, encoder=str(tmp_path / "run"))
    assert model.alignment.encoder.config == vlm.vision.config
    for ours, theirs in zip(model.alignment.encoder.state_dict().values(), vlm.vision.state_dict().values()):
        assert torch.equal(ours, theirs)
    assert torch.isfinite(model.training_loss(batch(), CAPTIONS)).all()


@pytest.mark.parametrize("align, message", [
    ({}, r"model.align: set encoder \(a VLM folder\) or vision"),
    ({"encoder": "x", "vision": {"name": "resnet10t"}}, "exactly one"),
    ({"vision": {"name": "resnet10t"}, "weight": 0}, "model.align.weight"),
])
def test_a_bad_align_config_names_the_key(align, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(TextToImageConfig, {"align": align}, where="model")


def test_a_layer_the_denoiser_lacks_or_a_folder_without_a_vlm_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="model.align.layer.*no submodule 'middle'.*mid_block"):
        aligned_model(layer="middle")
    with pytest.raises(ConfigError, match="model.align.encoder.*holds no saved VLM"):
        aligned_model(vision=None, encoder=str(tmp_path))


def test_the_target_cache_encodes_each_image_once_and_gives_the_encoders_tokens():
    model = aligned_model(cache_size=6)
    seen = []
    model.alignment.encoder.register_forward_hook(lambda module, args, out: seen.append(len(args[0])))
    pixels = batch()
    fresh = model.alignment._encode(pixels)
    seen.clear()
    first = model.alignment.targets(pixels)
    again = model.alignment.targets(pixels.flip(0))  # the same images in another order: all from the cache
    assert seen == [4]
    assert torch.allclose(first, fresh, atol=1e-2, rtol=1e-2)  # kept in fp16
    assert torch.equal(again, first.flip(0))
    mixed = torch.cat([pixels[:1], batch(seed=1)[:3]])
    assert torch.equal(model.alignment.targets(mixed)[0], first[0])  # 3 new: 7 > 6, the cache starts over
    assert seen == [4, 4] and len(model.alignment._cache) == 4


@pytest.mark.parametrize("kind, layer", [("sd", "mid_block"), ("pixart", "transformer_blocks.0")])
def test_a_pretrained_pipelines_denoiser_aligns_too(tmp_path, kind, layer):
    """Fine-tuning SD (a UNet map) or PixArt (a grid of transformer tokens) with REPA, as users would with a
    pretrained timm tower in place of this random one."""
    from diffusers_fixtures import tiny_pixart_pipeline, tiny_sd_pipeline

    folder = (tiny_sd_pipeline if kind == "sd" else tiny_pixart_pipeline)(tmp_path / kind)
    model = TextToImage.from_config(TextToImageConfig(
        pipeline=str(folder), align=AlignConfig(vision=TOWER, layer=layer)))
    size = model.config.image_size
    pixels = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    loss = model.training_loss(pixels, CAPTIONS[:2])
    loss.backward()
    assert torch.isfinite(loss) and model.alignment.projector[0].weight.grad.abs().sum() > 0


def test_until_samples_stops_the_alignment_and_its_count_survives_a_state_dict_round_trip():
    model = aligned_model(until_samples=8)
    calls = []
    model.alignment.encoder.register_forward_hook(lambda *args: calls.append(1))
    pixels = batch()
    plain = []
    for _ in range(3):  # 4, 8, 12 samples: the third batch is past the 8
        loss = model.training_loss(pixels, CAPTIONS, generators())
        loss.backward()
        plain.append(loss.detach())
    assert len(calls) == 2 and int(model.alignment.samples_seen) == 12
    assert model.alignment.projector[0].weight.grad is not None  # DDP: still a (zero) gradient on the third step
    alignment, model.alignment = model.alignment, None
    assert torch.allclose(plain[2], model.training_loss(pixels, CAPTIONS, generators()))  # the diffusion loss alone
    model.alignment = alignment
    fresh = aligned_model(until_samples=8)
    fresh.load_state_dict(model.state_dict())
    assert int(fresh.alignment.samples_seen) == 12
    with torch.no_grad():  # evaluation does not count
        fresh.training_loss(pixels, CAPTIONS, generators())
    assert int(fresh.alignment.samples_seen) == 12
