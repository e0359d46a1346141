"""Vision towers users bring (timm names, tiny widths, random init): gradients, norms, sizes, resize, freezing."""

import copy
import os
import pickle

import pytest
import torch
from PIL import Image, ImageDraw
from torch import nn

from hub_fixtures import OVERRIDE_SIZE, VISION_CASES, vision_config
from mmlm.config import ConfigError
from mmlm.models.freezing import freeze
from mmlm.models.vision import VisionConfig, VisionEncoder
from mmlm.safety import UnsafeFileError

MATRIX = [(case, size) for case in VISION_CASES for size in ("pretrained", "override")]


@pytest.fixture(scope="module")
def encoders():
    """Each (case, size) encoder built once for this module."""
    built: dict = {}

    def get(case: str, size: str) -> VisionEncoder:
        if (case, size) not in built:
            torch.manual_seed(0)
            built[case, size] = VisionEncoder(vision_config(case, size, pos_embed_2d=True))
        return built[case, size]

    return get


@pytest.mark.parametrize("case,size", MATRIX)
def test_every_trainable_parameter_gets_a_finite_gradient(encoders, case, size):
    """What DDP needs (no "Expected to have finished reduction"): one backward reaches every trainable tensor."""
    encoder = copy.deepcopy(encoders(case, size)).train()
    assert encoder.unused_parameters == []  # unused heads are removed, not merely frozen by the probe
    trainable = {n: p for n, p in encoder.named_parameters() if p.requires_grad}
    assert any(n.startswith("backbone.") for n in trainable)
    tokens = encoder(torch.randn(2, *encoder.data_config["input_size"]))
    assert tokens.shape == (2, encoder.num_tokens, encoder.dim)
    tokens.square().mean().backward()
    missing = [n for n, p in trainable.items() if p.grad is None]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in trainable.values())


@pytest.mark.parametrize("case,size", MATRIX)
def test_image_size_is_the_pretrained_cfg_one_or_the_override(encoders, case, size):
    encoder = encoders(case, size)
    height, width = encoder.data_config["input_size"][1:]
    assert height == width
    if size == "override":
        assert height == vision_config(case, size).image_size and height <= OVERRIDE_SIZE
    else:
        assert height == encoder.backbone.pretrained_cfg["input_size"][1]


@pytest.mark.parametrize("case,norm", [("vit_avg", "fc_norm"), ("vit_reg_gap", "fc_norm"), ("convnext", "head.norm")])
def test_head_norm_is_applied_to_the_tokens(encoders, case, norm):
    """timm keeps these models' final norm in the head; the tokens must still come out normalised."""
    encoder = encoders(case, "override")
    assert encoder.final_norm_name == norm
    with torch.no_grad():
        encoder.pos_embed.zero_()  # look at the backbone's tokens only
        tokens = copy.deepcopy(encoder).eval()(torch.randn(2, *encoder.data_config["input_size"]) * 3)
    # LayerNorm at init (weight 1, bias 0): every token has mean 0 and unit variance over channels
    torch.testing.assert_close(tokens.mean(-1), torch.zeros(tokens.shape[:2]), atol=1e-4, rtol=0)
    torch.testing.assert_close(tokens.var(-1, unbiased=False), torch.ones(tokens.shape[:2]), atol=1e-2, rtol=0)


def test_unused_heads_are_removed(encoders):
    siglip = encoders("siglip", "override").backbone
    assert siglip.attn_pool is None
    for case in VISION_CASES:
        names = [n for n, _ in encoders(case, "override").named_parameters()]
        assert not any(n.startswith(("backbone.attn_pool.", "backbone.head.fc.")) or n == "backbone.head.weight"
                       for n in names), case


def test_register_and_class_tokens_are_dropped_unless_kept(encoders):
    encoder = encoders("vit_reg", "override")
    grid = (encoder.data_config["input_size"][1] // 14) ** 2
    assert encoder.num_prefix_tokens == 5 and encoder.num_tokens == grid
    kept = VisionEncoder(vision_config("vit_reg", "override", keep_prefix_tokens=True))
    assert kept.num_tokens == grid + 5


VITS = ["vit_cls", "vit_avg", "siglip", "vit_reg", "vit_reg_gap"]


@pytest.mark.parametrize("case", VITS)
@pytest.mark.parametrize("select", [{"feature_layer": -2}, {"feature_layer": -1, "keep_prefix_tokens": True}])
def test_intermediate_layers_train_every_kept_parameter(case, select):
    """LLaVA's layer -2 (and prefix tokens kept): later blocks and heads pruned, the rest all get gradients."""
    encoder = VisionEncoder(vision_config(case, "override", **select)).train()
    grid = (encoder.data_config["input_size"][1] // encoder.backbone.patch_embed.patch_size[0]) ** 2
    assert encoder.num_tokens == grid + (encoder.num_prefix_tokens if select.get("keep_prefix_tokens") else 0)
    encoder(torch.randn(2, *encoder.data_config["input_size"])).square().mean().backward()
    assert [n for n, p in encoder.named_parameters() if p.requires_grad and p.grad is None] == []
    assert encoder.unused_parameters == []


def test_an_unused_parameter_the_probe_finds_is_frozen():
    """A timm model with a parameter outside the token path (here: one added by hand) trains under DDP."""
    encoder = VisionEncoder(VisionConfig(name="resnet10t", image_size=32))
    assert encoder.unused_parameters == []

    class WithExtra(VisionEncoder):
        def _probe(self):
            self.backbone.register_parameter("extra", nn.Parameter(torch.zeros(3)))
            return super()._probe()

    extra = WithExtra(VisionConfig(name="resnet10t", image_size=32))
    assert extra.unused_parameters == ["extra"] and not extra.backbone.extra.requires_grad


# ----------------------------------------------------------------------------------------- aspect ratio
def red_bar_image() -> Image.Image:
    """200x100, white, a red bar along the left edge (10 px wide)."""
    image = Image.new("RGB", (200, 100), "white")
    ImageDraw.Draw(image).rectangle([0, 0, 9, 99], fill=(255, 0, 0))
    return image


def red_pixels(pixels: torch.Tensor, encoder: VisionEncoder) -> torch.Tensor:
    mean = torch.tensor(encoder.data_config["mean"]).view(3, 1, 1)
    std = torch.tensor(encoder.data_config["std"]).view(3, 1, 1)
    rgb = pixels * std + mean
    return (rgb[0] > 0.8) & (rgb[1] < 0.2) & (rgb[2] < 0.2)


@pytest.mark.parametrize("resize,bar_kept", [("squash", True), ("pad", True), ("crop", False)])
def test_a_non_square_image_keeps_its_edges_with_squash_and_pad(resize, bar_kept):
    encoder = VisionEncoder(VisionConfig(name="resnet10t", image_size=64, resize=resize))
    pixels = encoder.image_transform()(red_bar_image())
    assert pixels.shape == (3, 64, 64)
    red = red_pixels(pixels, encoder)
    assert bool(red[:, :4].any()) == bar_kept  # the bar sits in the leftmost columns
    if resize == "squash":
        assert red[:, :2].all()  # stretched over the full height
    if resize == "pad":
        # aspect kept: 200x100 -> 64x32, padded top and bottom with the mean colour (normalised to 0)
        assert red[16:48, :2].all() and not red[:14].any() and not red[50:].any()
        torch.testing.assert_close(pixels[:, :14], torch.zeros(3, 14, 64), atol=0.03, rtol=0)


@pytest.mark.parametrize("resize", ["squash", "pad"])
def test_the_random_crop_augmentation_starts_from_the_whole_image(resize):
    encoder = VisionEncoder(VisionConfig(name="resnet10t", image_size=64, resize=resize, augment="crop"))
    transform = encoder.image_transform(train=True)
    torch.manual_seed(0)
    views = [transform(red_bar_image()) for _ in range(8)]
    assert all(v.shape == (3, 64, 64) for v in views)
    assert sum(bool(red_pixels(v, encoder).any()) for v in views) >= 4  # resize="crop": 0 of 8 keep the bar


def test_pad_is_the_default_and_square_images_are_unchanged_by_the_mode():
    assert VisionConfig().resize == "pad"
    square = Image.new("RGB", (80, 80), "white")
    ImageDraw.Draw(square).rectangle([0, 0, 9, 79], fill=(255, 0, 0))
    out = [VisionEncoder(VisionConfig(name="resnet10t", image_size=64, resize=mode)).image_transform()(square)
           for mode in ("squash", "pad", "crop")]
    torch.testing.assert_close(out[0], out[1])
    torch.testing.assert_close(out[0], out[2])


def test_an_unknown_resize_mode_names_the_key_and_the_choices():
    with pytest.raises(ConfigError, match=r"vision\.resize: expected one of squash, pad, crop, got 'fit'"):
        VisionConfig(resize="fit")


# ----------------------------------------------------------------------------------------- freezing
def batchnorm_state(module: nn.Module) -> list[torch.Tensor]:
    return [b.clone() for n, b in module.named_buffers() if "running" in n]


def test_a_frozen_backbone_stays_in_eval_mode_after_train():
    encoder = VisionEncoder(VisionConfig(name="resnet10t", image_size=32, freeze=True, pos_embed_2d=True))
    assert encoder.frozen
    parent = nn.ModuleDict({"vision": encoder, "head": nn.Linear(2, 2)}).train()
    assert parent.training and encoder.training and parent["head"].training
    assert not any(m.training for m in encoder.backbone.modules())
    assert encoder.pos_embed.requires_grad and not any(p.requires_grad for p in encoder.backbone.parameters())
    before = batchnorm_state(encoder)
    encoder(torch.randn(4, 3, 32, 32))
    assert all(torch.equal(a, b) for a, b in zip(before, batchnorm_state(encoder)))  # no running-stat update


def test_freeze_as_for_module_lr_zero_survives_train_and_deepcopy():
    """``freeze(part)``, what ``train.module_lr: {vision: 0}`` should call: eval for good, no gradients."""
    encoder = VisionEncoder(VisionConfig(name="resnet10t", image_size=32, pos_embed_2d=True))
    assert not encoder.frozen
    parent = nn.ModuleDict({"vision": freeze(encoder)})
    for model in (parent, copy.deepcopy(parent)):
        model.train()
        assert model.training and model["vision"].frozen
        assert not any(m.training for m in model["vision"].modules())
        assert not any(p.requires_grad for p in model["vision"].parameters())
    unfrozen = VisionEncoder(VisionConfig(name="resnet10t", image_size=32)).train()
    assert all(m.training for m in unfrozen.modules())


# ----------------------------------------------------------------------------------------- weights files
class RunsCode:
    def __reduce__(self):
        return os.system, ("touch pwned",)


def test_weights_path_is_read_by_mmlm_safety_and_a_code_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "tower.pth"
    path.write_bytes(pickle.dumps({"conv1.0.weight": RunsCode()}))
    with pytest.raises(UnsafeFileError, match="tower.pth: refused to load"):
        VisionEncoder(VisionConfig(name="resnet10t", image_size=32, weights_path=str(path)))
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_the_tower_builds_under_no_grad_and_inference_mode(context):
    """Evaluation loads models under no_grad; the build-time probe must not need autograd enabled outside."""
    with context():
        encoder = VisionEncoder(VisionConfig(name="resnet10t"))
    assert encoder.num_tokens > 0 and encoder.dim > 0
