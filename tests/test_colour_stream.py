"""vision.colour_stream: the tower learns on channel-shuffled images, the true colours reach the tokens beside it."""

import pytest
import torch
from PIL import Image, ImageDraw

from hub_fixtures import vision_config
from mmlm.config import ConfigError
from mmlm.models import LanguageConfig, ProjectorConfig, VisionConfig, VisionLanguageModel, VLMConfig
from mmlm.models.colour_stream import shuffle_channels
from mmlm.models.freezing import freeze
from mmlm.models.vision import VisionEncoder

STAGE2 = dict(name="resnet10t", features_only_stage=2, image_size=64, pos_embed_2d=True)
TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 2}
CORPUS = ["a red square", "a green square", "a blue circle"]


def square(colour: str, box=(4, 4, 20, 20)) -> Image.Image:
    image = Image.new("RGB", (64, 64), (235, 235, 235))
    ImageDraw.Draw(image).rectangle(box, fill=colour)
    return image


def pixels(encoder: VisionEncoder, *images: Image.Image) -> torch.Tensor:
    transform = encoder.image_transform()
    return torch.stack([transform(image) for image in images])


def tower_inputs(encoder: VisionEncoder, x: torch.Tensor) -> torch.Tensor:
    seen = []
    hook = encoder.backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    try:
        encoder(x)
    finally:
        hook.remove()
    return seen[0]


def test_shuffle_channels_reorders_each_image_on_its_own():
    torch.manual_seed(0)
    x = torch.arange(64 * 3, dtype=torch.float32).reshape(64, 3, 1, 1).expand(64, 3, 2, 2).contiguous()
    shuffled = shuffle_channels(x)
    orders = set()
    for original, out in zip(x, shuffled):
        order = tuple(int(torch.nonzero((original == out[c]).all(dim=(1, 2)))[0]) for c in range(3))
        assert sorted(order) == [0, 1, 2]  # the same three channels, none lost or repeated
        orders.add(order)
    assert len(orders) == 6  # all six orders occur over 64 images: a per-image draw, not one per batch


def test_the_tower_sees_shuffled_channels_in_training_and_the_true_image_in_evaluation():
    torch.manual_seed(0)
    encoder = VisionEncoder(VisionConfig(**STAGE2, colour_stream=True))
    x = pixels(encoder, *[square(c) for c in ("red", "green", "blue", "orange")] * 4)
    encoder.train()
    seen = tower_inputs(encoder, x)
    assert not torch.equal(seen, x)
    for original, got in zip(x, seen):
        assert any(torch.equal(got, original[list(order)]) for order in
                   [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)])
    encoder.eval()
    assert torch.equal(tower_inputs(encoder, x), x)
    freeze(encoder.backbone)  # as module_lr {vision: 0} does after building: a tower that no longer learns
    encoder.train()
    assert torch.equal(tower_inputs(encoder, x), x)


def test_the_stream_starts_as_a_no_op_and_then_carries_the_colour_at_its_place():
    torch.manual_seed(0)
    with_stream = VisionEncoder(VisionConfig(**STAGE2, colour_stream=True)).eval()
    plain = VisionEncoder(VisionConfig(**STAGE2)).eval()
    plain.load_state_dict({k: v for k, v in with_stream.state_dict().items() if not k.startswith("colour_stream.")})
    x = pixels(with_stream, square("red"), square("green"))
    with torch.no_grad():
        torch.testing.assert_close(with_stream(x), plain(x))  # zero-initialised output layer
        torch.nn.init.normal_(with_stream.colour_stream.to_tokens.weight)
        colour = with_stream.colour_stream(x)
    assert colour.shape == (2, with_stream.num_tokens, with_stream.dim)
    # The squares fill the top-left tokens of the 8x8 grid; the far corner is background in both images.
    assert not torch.allclose(colour[0, 0], colour[1, 0])
    torch.testing.assert_close(colour[0, -1], colour[1, -1], atol=0.05, rtol=0)


def test_a_dot_of_two_pixels_anywhere_reaches_its_token():
    # The stream reads every second pixel of a large image: any 2x2 patch still holds a pixel it reads.
    torch.manual_seed(0)
    encoder = VisionEncoder(VisionConfig(**STAGE2, colour_stream=True)).eval()
    torch.nn.init.normal_(encoder.colour_stream.to_tokens.weight)
    for box in [(41, 41, 42, 42), (42, 42, 43, 43)]:  # the token grid is 8x8: both dots lie in cell (5, 5)
        x = pixels(encoder, square("red", box), square("green", box))
        with torch.no_grad():
            colour = encoder.colour_stream(x)
        assert not torch.allclose(colour[0, 5 * 8 + 5], colour[1, 5 * 8 + 5], atol=0.05, rtol=0), box
        torch.testing.assert_close(colour[0, 0], colour[1, 0], atol=0.05, rtol=0)


def test_a_captioner_with_the_stream_trains_and_round_trips(tmp_path):
    torch.manual_seed(0)
    config = VLMConfig(vision=VisionConfig(**STAGE2, colour_stream=True), projector=ProjectorConfig(type="mlp"),
                       language=LanguageConfig(config=dict(TINY_LLAMA), vocab_size=300), prompt="look:")
    model = VisionLanguageModel.from_config(config, CORPUS)
    images = [square("red"), square("green"), Image.new("RGB", (64, 64), "white")]
    transform = model.image_transform()
    batch = model.prepare_batch(torch.stack([transform(im) for im in images]), CORPUS)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    stream = model.vision.colour_stream
    assert stream.to_tokens.weight.abs().sum() > 0  # it learned, starting from zero
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = VisionLanguageModel.from_pretrained(tmp_path).eval()
    assert loaded.config.vision.colour_stream and loaded.vision.colour_stream is not None
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=1e-5, rtol=1e-5)


def test_a_frozen_tower_or_kept_prefix_tokens_are_refused_by_name():
    with pytest.raises(ConfigError, match=r"vision\.colour_stream: the tower must train.*vision\.freeze=false"):
        VisionEncoder(VisionConfig(**STAGE2, freeze=True, colour_stream=True))
    with pytest.raises(ConfigError, match=r"vision\.colour_stream: prefix tokens.*keep_prefix_tokens=false"):
        VisionEncoder(vision_config("vit_cls", "override", keep_prefix_tokens=True, colour_stream=True))
