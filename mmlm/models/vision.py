"""Vision encoder: a timm model by name, turned into a sequence of image tokens.

timm builds the network, loads weights (Hub or a local file) and supplies the preprocessing;
this module only chooses which features become tokens:

* ViT-like models: the last layer (``forward_features``) or any block via
  ``forward_intermediates`` (NLC), with the class/prefix tokens kept or dropped;
* CNNs: the final feature map, or an earlier stage (``features_only``), flattened to H*W tokens;
* optionally a learned 2D position embedding added to the tokens (CNN maps have none).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import timm
import timm.data
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from torch import nn

from mmlm.config import ConfigError


AUGMENTATIONS = ("none", "crop", "affine")


@dataclasses.dataclass
class VisionConfig:
    """Which timm encoder to build and which of its features become image tokens."""

    name: str = "resnet10t"
    pretrained: bool = False  # timm weights from the Hub
    weights_path: str | None = None  # local .safetensors / .pth / .bin (loaded by timm, weights_only)
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)  # timm.create_model overrides (img_size, depth, ...)
    feature_layer: int | None = None  # ViT block index (negative from the end); None = last layer, normed
    features_only_stage: int | None = None  # CNN stage index via features_only/out_indices (e.g. 2 = stride 8)
    keep_prefix_tokens: bool = False  # keep the ViT class/register tokens
    pos_embed_2d: bool = False  # learned position embedding added to the image tokens
    freeze: bool = False  # freeze the timm backbone (the added position embedding stays trainable)
    image_size: int | None = None  # input resolution; None = kwargs['img_size'] or timm's pretrained_cfg
    crop_pct: float = 1.0  # 1.0 keeps the whole image (captions talk about its edges); timm's ImageNet default is 0.875
    # Train-time augmentation: "none"; "crop" (true) a mild random-resized crop; "affine" small rotations
    # (+-10 deg), shifts (+-10%) and scaling (0.9-1.1), e.g. for handwriting. Never flips or colour
    # jitter: they change what a caption says ("on the left", "red").
    augment: bool | str = "none"

    def __post_init__(self):
        if self.feature_layer is not None and self.features_only_stage is not None:
            raise ConfigError("vision: set feature_layer (ViT blocks) or features_only_stage (CNN stages), not both")
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
        self.data_config = self._resolve_data_config()
        self.num_tokens, self.dim = self._probe_output_shape()
        self.pos_embed = nn.Parameter(torch.randn(1, self.num_tokens, self.dim) * 0.02) if config.pos_embed_2d else None
        if config.freeze:
            self.backbone.requires_grad_(False)

    def _resolve_data_config(self) -> dict[str, Any]:
        data_config = timm.data.resolve_data_config({}, model=self.backbone)
        size = self.config.image_size or self.config.kwargs.get("img_size")
        if size is not None:
            size = (size, size) if isinstance(size, int) else tuple(size)
            data_config["input_size"] = (3, *size)
        data_config["crop_pct"] = self.config.crop_pct
        return data_config

    @torch.no_grad()
    def _probe_output_shape(self) -> tuple[int, int]:
        was_training = self.training
        self.eval()  # keep BatchNorm statistics untouched by the probe
        tokens = self._tokens(torch.zeros(1, *self.data_config["input_size"]))
        self.train(was_training)
        return tokens.shape[1], tokens.shape[2]

    def _tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self._uses_intermediates:
            out = self.backbone.forward_intermediates(
                pixel_values, indices=[self._take_index], output_fmt="NLC", intermediates_only=True,
                return_prefix_tokens=self.config.keep_prefix_tokens,
            )[0]
            if self.config.keep_prefix_tokens:
                spatial, prefix = out
                return torch.cat([prefix, spatial], dim=1) if prefix is not None else spatial
            return out
        features = self.backbone(pixel_values) if self.config.features_only_stage is not None \
            else self.backbone.forward_features(pixel_values)
        if isinstance(features, (list, tuple)):
            features = features[-1]
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
        tokens = self._tokens(pixel_values)
        if self.pos_embed is not None:
            tokens = tokens + self.pos_embed
        return tokens

    def train(self, mode: bool = True):
        super().train(mode)
        if self.config.freeze:
            self.backbone.eval()  # a frozen backbone keeps its BatchNorm/dropout in inference mode
        return self

    def image_transform(self, train: bool = False) -> ImageTransform:
        cfg = self.data_config
        if train and self.config.augment == "crop":
            transform = timm.data.create_transform(
                input_size=cfg["input_size"], is_training=True, scale=(0.8, 1.0), ratio=(0.9, 1.1), hflip=0.0,
                color_jitter=0.0, interpolation=cfg["interpolation"], mean=cfg["mean"], std=cfg["std"],
            )
        else:
            transform = timm.data.create_transform(
                input_size=cfg["input_size"], is_training=False, interpolation=cfg["interpolation"],
                mean=cfg["mean"], std=cfg["std"], crop_pct=cfg["crop_pct"], crop_mode=cfg.get("crop_mode", "center"),
            )
            if train and self.config.augment == "affine":
                transform = T.Compose([SmallAffine(), transform])
        return ImageTransform(transform)

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
        # timm's own loader: safetensors or torch.load(weights_only=True), classifier filtered/adapted.
        kwargs["pretrained_cfg_overlay"] = {"file": str(config.weights_path)}
        pretrained = True
    try:
        return timm.create_model(config.name, pretrained=pretrained, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ConfigError(f"vision.name: unknown timm model '{config.name}'") from err
        raise
