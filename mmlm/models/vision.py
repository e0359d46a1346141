"""Vision encoder: a timm model by name, turned into a sequence of image tokens.

timm builds the network, loads weights (Hub or a local file) and supplies the preprocessing;
this module only chooses which features become tokens:

* ViT-like models: the last layer (``forward_features``) or any block via
  ``forward_intermediates`` (NLC), with the class/prefix tokens kept or dropped;
* CNNs: the final feature map, or an earlier stage (``features_only``), flattened to H*W tokens;
* optionally a learned 2D position embedding added to the tokens (CNN maps have none);
* optionally a colour stream (:mod:`mmlm.models.colour_stream`): the tower learns shape on channel-shuffled
  images, and the true colours reach the tokens beside it.

Heads that ``forward_features`` never uses (classifier, SigLIP's attention pool) are removed, and
a final norm that timm keeps in the head (``fc_norm`` of avg-pool ViTs, ConvNeXt's ``head.norm``)
is applied to the tokens, so every trainable parameter gets a gradient and tokens come out
normalised. Any other parameter that a build-time probe finds without a gradient is frozen.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable

import timm
import timm.data
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from torch import nn

from mmlm.config import ConfigError
from mmlm.models.colour_stream import ColourStream, shuffle_channels
from mmlm.models.freezing import freeze, is_frozen
from mmlm.safety import load_state_dict


AUGMENTATIONS = ("none", "crop", "affine")
# How an image of any aspect ratio becomes the encoder's input size (see VisionConfig.resize).
RESIZE_MODES = ("squash", "pad", "crop")


@dataclasses.dataclass
class VisionConfig:
    """Which timm encoder to build and which of its features become image tokens."""

    name: str = "resnet10t"
    pretrained: bool = False  # timm weights from the Hub
    weights_path: str | None = None  # local .safetensors / .pth / .bin (read by mmlm.safety: tensors only)
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)  # timm.create_model overrides (depth, ...)
    feature_layer: int | None = None  # ViT block index (negative from the end); None = last layer, normed
    features_only_stage: int | None = None  # CNN stage index via features_only/out_indices (e.g. 2 = stride 8)
    keep_prefix_tokens: bool = False  # keep the ViT class/register tokens
    pos_embed_2d: bool = False  # learned position embedding added to the image tokens
    freeze: bool = False  # no gradients, eval mode kept (BatchNorm, dropout); pos_embed_2d stays trainable
    # Train the tower on images with their RGB channels shuffled and add per-token colour features of the
    # true image (mmlm.models.colour_stream): kind features that do not depend on colour, for from-scratch
    # towers on data that never shows some colour-kind pairs. Square token grids only (CNN maps, ViT patches).
    colour_stream: bool = False
    # input resolution, passed to timm as img_size where the model takes one (ViTs);
    # None = kwargs['img_size'] or timm's pretrained_cfg
    image_size: int | None = None
    # Any aspect ratio -> the input size: "pad" (default, as LLaVA-1.5) scales the long side and pads the
    # rest with the mean colour: the whole image, undistorted; "squash" stretches it to the size: the whole
    # image, distorted; "crop" scales the short side and centre-crops: the edges of a non-square image are
    # lost ("on the left" may no longer be true). Square images give the same tensor in all three.
    resize: str = "pad"
    crop_pct: float = 1.0  # scale by 1/crop_pct, crop back to size; 1.0 keeps the whole image (ImageNet: 0.875)
    # Train-time augmentation: "none"; "crop" (true) a mild random-resized crop; "affine" small rotations
    # (+-10 deg), shifts (+-10%) and scaling (0.9-1.1), e.g. for handwriting. Never flips or colour
    # jitter: they change what a caption says ("on the left", "red").
    augment: bool | str = "none"

    def __post_init__(self):
        if self.feature_layer is not None and self.features_only_stage is not None:
            raise ConfigError("vision: set feature_layer (ViT blocks) or features_only_stage (CNN stages), not both")
        if self.resize not in RESIZE_MODES:
            raise ConfigError(f"vision.resize: expected one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ConfigError(f"vision.crop_pct: expected a value in (0, 1], got {self.crop_pct}")
        if isinstance(self.augment, bool):
            self.augment = "crop" if self.augment else "none"
        if self.augment not in AUGMENTATIONS:
            raise ConfigError(f"vision.augment: expected one of {', '.join(AUGMENTATIONS)} (or true/false), "
                              f"got {self.augment!r}")
        if self.weights_path is not None and not Path(self.weights_path).is_file():
            raise ConfigError(f"vision.weights_path: file not found: {self.weights_path}")


class ImageTransform:
    """PIL image -> normalised tensor; a plain object so DataLoader workers can pickle it."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, image) -> torch.Tensor:
        if image.mode != "RGB":
            image = image.convert("RGB")
        return self.transform(image)

    def __repr__(self) -> str:
        return f"ImageTransform({self.transform})"


class SmallAffine:
    """Random small rotation, shift and scale of a PIL image; the uncovered border takes the colour of
    the image's top-left pixel (the background, for centred subjects)."""

    def __init__(self, degrees: float = 10.0, translate: float = 0.1, scale: tuple[float, float] = (0.9, 1.1)):
        self.degrees, self.translate, self.scale = degrees, translate, scale

    def __call__(self, image):
        angle, shift, scale, shear = T.RandomAffine.get_params(
            (-self.degrees, self.degrees), (self.translate, self.translate), self.scale, None, list(image.size))
        return TF.affine(image, angle, list(shift), scale, list(shear), interpolation=T.InterpolationMode.BILINEAR,
                         fill=list(image.getpixel((0, 0))))

    def __repr__(self) -> str:
        return f"SmallAffine(degrees={self.degrees}, translate={self.translate}, scale={self.scale})"


class ResizeLongestSide:
    """Scale a PIL image so it fits inside ``size`` (h, w), keeping its aspect ratio; every side >= 1 pixel."""

    def __init__(self, size: tuple[int, int], interpolation):
        self.size, self.interpolation = size, interpolation

    def __call__(self, image):
        w, h = image.size
        scale = min(self.size[0] / h, self.size[1] / w)
        return TF.resize(image, [max(1, round(h * scale)), max(1, round(w * scale))], interpolation=self.interpolation)

    def __repr__(self) -> str:
        return f"ResizeLongestSide(size={self.size})"


class VisionEncoder(nn.Module):
    """timm backbone -> (batch, num_tokens, dim) image tokens."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.backbone = _create_backbone(config)
        self.num_prefix_tokens = int(getattr(self.backbone, "num_prefix_tokens", 0) or 0)
        self._uses_intermediates = config.feature_layer is not None
        if self._uses_intermediates:
            if not hasattr(self.backbone, "forward_intermediates"):
                raise ConfigError(f"vision.feature_layer: timm model '{config.name}' has no forward_intermediates")
            # Blocks after the chosen one are never used: drop them (saves compute, as LLaVA's layer -2 does not).
            self._take_index = self.backbone.prune_intermediate_layers([config.feature_layer], prune_norm=True)[0]
        # A features_only network holds no head; forward_intermediates pruned it above.
        self.final_norm_name = _strip_head(self.backbone) \
            if not self._uses_intermediates and config.features_only_stage is None else None
        if config.freeze:
            freeze(self.backbone)
        self.data_config = self._resolve_data_config()
        self.num_tokens, self.dim, self.unused_parameters = self._probe()
        for name in self.unused_parameters:  # DDP needs every trainable parameter to get a gradient
            self.backbone.get_parameter(name).requires_grad_(False)
        self.pos_embed = nn.Parameter(torch.randn(1, self.num_tokens, self.dim) * 0.02) if config.pos_embed_2d else None
        self.colour_stream = self._colour_stream() if config.colour_stream else None

    def _colour_stream(self) -> ColourStream:
        if self.config.keep_prefix_tokens and self.num_prefix_tokens:
            raise ConfigError("vision.colour_stream: prefix tokens have no place on the grid; "
                              "set vision.keep_prefix_tokens=false")
        side = math.isqrt(self.num_tokens)
        if side * side != self.num_tokens:
            raise ConfigError(f"vision.colour_stream: needs a square grid of image tokens; '{self.config.name}' "
                              f"gives {self.num_tokens}")
        if self.config.freeze:
            raise ConfigError("vision.colour_stream: the tower must train (it learns shape on channel-shuffled "
                              "images); set vision.freeze=false")
        return ColourStream((side, side), self.dim, in_channels=self.data_config["input_size"][0])

    @property
    def frozen(self) -> bool:
        """True when the timm backbone is frozen (``vision.freeze``, or :func:`freeze` on this module)."""
        return is_frozen(self.backbone) or is_frozen(self)

    def _resolve_data_config(self) -> dict[str, Any]:
        data_config = timm.data.resolve_data_config({}, model=self.backbone)
        size = self.config.image_size or self.config.kwargs.get("img_size")
        if size is not None:
            size = (size, size) if isinstance(size, int) else tuple(size)
            data_config["input_size"] = (3, *size)
        data_config["crop_pct"] = self.config.crop_pct
        return data_config

    def _probe(self) -> tuple[int, int, list[str]]:
        """One forward (and backward) of a blank image: token count, width, and the backbone's
        trainable parameters the token path leaves without a gradient."""
        was_training = self.training
        self.eval()  # keep BatchNorm statistics untouched by the probe
        # Built under inference_mode there is no autograd at all: the gradient check is skipped then.
        trainable = [] if torch.is_inference_mode_enabled() else [
            (n, p) for n, p in self.backbone.named_parameters() if p.requires_grad]
        unused = []
        with torch.set_grad_enabled(bool(trainable)):  # callers may build the model under no_grad
            tokens = self._tokens(torch.zeros(1, *self.data_config["input_size"]))
            if trainable:
                grads = torch.autograd.grad(tokens.sum(), [p for _, p in trainable], allow_unused=True)
                unused = [n for (n, _), g in zip(trainable, grads) if g is None]
        self.train(was_training)
        return tokens.shape[1], tokens.shape[2], unused

    def _tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self._uses_intermediates:
            with_prefix = self.config.keep_prefix_tokens and self.num_prefix_tokens > 0  # SigLIP has none
            out = self.backbone.forward_intermediates(
                pixel_values, indices=[self._take_index], output_fmt="NLC", intermediates_only=True,
                return_prefix_tokens=with_prefix,
            )[0]
            if with_prefix:
                spatial, prefix = out
                return torch.cat([prefix, spatial], dim=1) if prefix is not None else spatial
            return out
        features = self.backbone(pixel_values) if self.config.features_only_stage is not None \
            else self.backbone.forward_features(pixel_values)
        if isinstance(features, (list, tuple)):
            features = features[-1]
        if self.final_norm_name is not None:  # NCHW for ConvNeXt's LayerNorm2d, NLC for a ViT's fc_norm
            features = self.backbone.get_submodule(self.final_norm_name)(features)
        if features.ndim == 4:  # NCHW feature map -> H*W tokens
            return features.flatten(2).transpose(1, 2)
        if features.ndim == 3:
            if not self.config.keep_prefix_tokens and self.num_prefix_tokens:
                features = features[:, self.num_prefix_tokens:]
            return features
        raise ValueError(f"vision '{self.config.name}': unexpected feature shape {tuple(features.shape)}")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        expected = tuple(self.data_config["input_size"])
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"pixel_values: expected shape (batch, {', '.join(map(str, expected))}), "
                             f"got {tuple(pixel_values.shape)}; use model.image_transform()")
        if self.colour_stream is None:
            tokens = self._tokens(pixel_values)
        else:
            learning = self.training and not self.frozen  # a tower frozen later (module_lr 0) sees true colours
            tokens = self._tokens(shuffle_channels(pixel_values) if learning else pixel_values)
            tokens = tokens + self.colour_stream(pixel_values)
        if self.pos_embed is not None:
            tokens = tokens + self.pos_embed
        return tokens

    def train(self, mode: bool = True):
        """A frozen backbone stays in inference mode (BatchNorm statistics, dropout) whatever ``mode`` is."""
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def image_transform(self, train: bool = False) -> ImageTransform:
        cfg = self.data_config
        if train and self.config.augment == "crop":
            transform = timm.data.create_transform(
                input_size=cfg["input_size"], is_training=True, scale=(0.8, 1.0), ratio=(0.9, 1.1), hflip=0.0,
                color_jitter=0.0, interpolation=cfg["interpolation"], mean=cfg["mean"], std=cfg["std"],
            )
            if self.config.resize != "crop":  # the random crop starts from the whole image, squashed or padded
                transform = T.Compose([self._whole_image(), transform])
        elif self.config.resize == "crop":
            transform = timm.data.create_transform(
                input_size=cfg["input_size"], is_training=False, interpolation=cfg["interpolation"],
                mean=cfg["mean"], std=cfg["std"], crop_pct=cfg["crop_pct"], crop_mode="center",
            )
        else:
            size = tuple(cfg["input_size"][1:])
            scaled = tuple(math.floor(s / cfg["crop_pct"]) for s in size)
            transform = T.Compose([self._whole_image(scaled), T.CenterCrop(size), T.ToTensor(),
                                   T.Normalize(mean=cfg["mean"], std=cfg["std"])])
        if train and self.config.augment == "affine":
            transform = T.Compose([SmallAffine(), transform])
        return ImageTransform(transform)

    def _whole_image(self, size: tuple[int, int] | None = None) -> Callable:
        """PIL image of any aspect ratio -> ``size`` (default: the input size), squashed, or scaled on its
        long side and padded with the mean colour (timm's "squash" / "border" modes, but never scaling a
        side of an extreme aspect ratio to 0 pixels)."""
        from timm.data.transforms import CenterCropOrPad, str_to_interp_mode

        size = size or tuple(self.data_config["input_size"][1:])
        interpolation = str_to_interp_mode(self.data_config["interpolation"])
        if self.config.resize == "squash":
            return T.Resize(size, interpolation=interpolation)
        fill = tuple(round(255 * v) for v in self.data_config["mean"])
        return T.Compose([ResizeLongestSide(size, interpolation), CenterCropOrPad(size, fill=fill)])

    def enable_gradient_checkpointing(self) -> None:
        if hasattr(self.backbone, "set_grad_checkpointing"):
            self.backbone.set_grad_checkpointing(True)


def _create_backbone(config: VisionConfig) -> nn.Module:
    kwargs = dict(config.kwargs)
    if config.features_only_stage is not None:
        kwargs.update(features_only=True, out_indices=(config.features_only_stage,))
    else:
        kwargs.setdefault("num_classes", 0)
    pretrained = config.pretrained
    if config.weights_path is not None:
        # A file we did not write: read by mmlm.safety (safetensors, or tensors-only unpickling), then
        # handed to timm as an in-memory state dict so its filter_fn (position-embedding resize, checkpoint
        # conversion) and classifier handling still apply.
        kwargs["pretrained_cfg_overlay"] = {"state_dict": load_state_dict(config.weights_path), "source": "",
                                            "custom_load": False}
        pretrained = True
    try:
        if config.image_size is not None and "img_size" not in kwargs:
            # ViTs build their patch grid / position table for one size (timm resamples pretrained ones);
            # CNNs take any size and have no img_size argument.
            try:
                return timm.create_model(config.name, pretrained=pretrained, img_size=config.image_size, **kwargs)
            except TypeError as err:
                if "img_size" not in str(err):
                    raise
        return timm.create_model(config.name, pretrained=pretrained, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ConfigError(f"vision.name: unknown timm model '{config.name}'") from err
        raise


def _strip_head(backbone: nn.Module) -> str | None:
    """Remove what ``forward_features`` does not use; return the name of a final norm timm keeps in the head.

    ``reset_classifier(0, '')`` drops the classifier and any attention pool (SigLIP's ``attn_pool``).
    An avg-pool ViT's final norm is ``fc_norm`` (its ``norm`` is an Identity) and ConvNeXt's is
    ``head.norm``: they are applied to the tokens instead of being left without gradients.
    """
    try:
        backbone.reset_classifier(0, "")
    except (TypeError, AssertionError):
        backbone.reset_classifier(0)
    for name in ("fc_norm", "head.norm"):
        try:
            norm = backbone.get_submodule(name)
        except AttributeError:
            continue
        if not isinstance(norm, nn.Identity) and any(True for _ in norm.parameters()):
            return name
    return None
