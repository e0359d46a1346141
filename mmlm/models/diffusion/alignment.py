"""Representation alignment (REPA, Yu et al. 2025): a training aid for the denoiser.

While training, one hidden feature map of the denoiser (``model.align.layer``, read by a forward hook) goes
through a small MLP and is pulled, by cosine similarity token by token, towards a frozen image encoder's
tokens of the *clean* image. The denoiser so learns early what the encoder already knows (here: which
shape is where); sampling never runs the encoder or the MLP, and neither is saved with the model.

The encoder is the vision tower of an mmlm VLM folder (the demo's captioner, trained first) or any timm
tower (``vision``: e.g. a pretrained DINOv2, as in the paper). Its token grid is resized to the feature map's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mmlm.config import ConfigError, from_dict
from mmlm.models.diffusion.config import AlignConfig
from mmlm.models.diffusion.text_encoder import is_vlm_folder, vlm_folder
from mmlm.models.vision import VisionConfig, VisionEncoder


def load_encoder(config: AlignConfig) -> VisionEncoder:
    """The frozen tower ``config`` names: a VLM folder's vision tower, or a timm tower built from ``vision``."""
    if config.encoder is not None:
        from mmlm.models.vlm import VisionLanguageModel

        if not is_vlm_folder(config.encoder):
            raise ConfigError(f"model.align.encoder: {config.encoder} holds no saved VLM (an mmlm config.json); "
                              "expected a folder written by save_pretrained or a run folder with model/")
        encoder = VisionLanguageModel.from_pretrained(vlm_folder(config.encoder)).vision
    else:
        vision = from_dict(VisionConfig, config.vision, where="model.align.vision")
        encoder = VisionEncoder(dataclasses.replace(vision, freeze=True))
    encoder.requires_grad_(False)
    return encoder.eval()


def _as_tokens(feature: torch.Tensor, where: str) -> tuple[torch.Tensor, tuple[int, int]]:
    """[B, C, h, w] or [B, h*w, C] (a square grid) -> tokens [B, h*w, C] and the grid (h, w)."""
    if feature.ndim == 4:
        return feature.flatten(2).transpose(1, 2), tuple(feature.shape[-2:])
    if feature.ndim == 3:
        side = math.isqrt(feature.shape[1])
        if side * side == feature.shape[1]:
            return feature, (side, side)
    raise ConfigError(f"{where}: expected a [B, C, H, W] map or a square grid of tokens, got {tuple(feature.shape)}")


class RepresentationAlignment(nn.Module):
    """The hook on the denoiser's layer, the MLP and the frozen encoder; ``loss`` after a denoiser call."""

    def __init__(self, config: AlignConfig, denoiser: nn.Module, encoder: VisionEncoder,
                 probe: Callable[[], None]):
        """``probe`` runs the denoiser once (any input) so the layer's width is known before the MLP is built."""
        super().__init__()
        self.config = config
        try:
            layer = denoiser.get_submodule(config.layer)
        except AttributeError as error:
            names = [name for name, _ in denoiser.named_children()]
            raise ConfigError(f"model.align.layer: the denoiser has no submodule {config.layer!r}; "
                              f"its top-level ones are {names}") from error
        self.encoder = encoder
        side = math.isqrt(encoder.num_tokens)
        if side * side != encoder.num_tokens:
            raise ConfigError(f"model.align: the encoder gives {encoder.num_tokens} tokens, not a square grid")
        self.encoder_grid = (side, side)
        self._feature: torch.Tensor | None = None
        self._capturing = False
        self._cache: dict[bytes, torch.Tensor] = {}
        self.register_buffer("samples_seen", torch.zeros((), dtype=torch.long))  # training samples, all processes
        self._hook = layer.register_forward_hook(self._capture)
        with self.capture(), torch.no_grad():
            probe()
        if self._feature is None:
            raise ConfigError(f"model.align.layer: {config.layer!r} did not run in the denoiser's forward")
        width = _as_tokens(self._feature, "model.align.layer")[0].shape[-1]
        self._feature = None
        hidden = config.projector_dim
        self.projector = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                       nn.Linear(hidden, encoder.dim))

    def _capture(self, module, args, output) -> None:
        if self._capturing:
            self._feature = output[0] if isinstance(output, (tuple, list)) else output

    def active(self, batch_size: int) -> bool:
        """Whether this batch is aligned (``until_samples``); a training batch (grad on) is counted first."""
        if self.config.until_samples is None:
            return True
        if self.training and torch.is_grad_enabled():
            self.samples_seen += batch_size * (dist.get_world_size() if dist.is_initialized() else 1)
        return int(self.samples_seen) <= self.config.until_samples

    def unused(self) -> torch.Tensor:
        """A zero that touches the MLP, so DDP sees a gradient for it on the steps that are not aligned."""
        return sum(p.sum() for p in self.projector.parameters()) * 0.0

    def train(self, mode: bool = True) -> RepresentationAlignment:
        super().train(mode)
        self.encoder.eval()  # frozen: BatchNorm statistics stay the encoder's own
        return self

    def targets(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The encoder's tokens [B, N, D] of clean images in [-1, 1]; with ``cache_size``, each image's are kept
        (fp16, on the CPU, keyed by the image's bytes) and reused when the same image comes again."""
        if not self.config.cache_size:
            return self._encode(pixel_values)
        keys = [hashlib.blake2b(image.detach().cpu().numpy().tobytes(), digest_size=16).digest()
                for image in pixel_values]
        missing = [i for i, key in enumerate(keys) if key not in self._cache]
        if missing and len(self._cache) + len(missing) > self.config.cache_size:
            self._cache.clear()
            missing = list(range(len(keys)))
        if missing:
            for i, tokens in zip(missing, self._encode(pixel_values[missing])):
                self._cache[keys[i]] = tokens.to("cpu", torch.float16)
        return torch.stack([self._cache[key] for key in keys]).to(pixel_values.device, torch.float32)

    def _encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        cfg = self.encoder.data_config
        images = (pixel_values.float() + 1) / 2
        size = tuple(cfg["input_size"][1:])
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
        mean = images.new_tensor(cfg["mean"]).view(1, 3, 1, 1)
        std = images.new_tensor(cfg["std"]).view(1, 3, 1, 1)
        with torch.no_grad():
            return self.encoder((images - mean) / std)

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """A context in which the denoiser's call records the layer's output for ``loss``."""
        self._capturing = True
        try:
            yield
        finally:
            self._capturing = False

    def loss(self, targets: torch.Tensor) -> torch.Tensor:
        """``1 - cos`` between the projected feature and the targets, token by token, averaged (REPA's loss)."""
        if self._feature is None:
            raise RuntimeError("alignment loss: no feature captured; call the denoiser inside capture()")
        tokens, grid = _as_tokens(self._feature, "model.align.layer")
        self._feature = None
        if grid != self.encoder_grid:  # the encoder's grid, resized to the feature map's
            maps = targets.transpose(1, 2).reshape(len(targets), -1, *self.encoder_grid)
            targets = F.adaptive_avg_pool2d(maps, grid) if grid[0] <= self.encoder_grid[0] \
                else F.interpolate(maps, size=grid, mode="bilinear", align_corners=False)
            targets = targets.flatten(2).transpose(1, 2)
        projected = self.projector(tokens.float())
        return (1 - F.cosine_similarity(projected, targets.float(), dim=-1)).mean()


def build_for(model) -> RepresentationAlignment:
    """The alignment ``model.config.align`` asks for, on ``model``'s denoiser (a ``TextToImage``)."""
    def probe() -> None:  # one denoiser call on a blank input of its own size
        cfg = model.denoiser.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        device = model.device
        model.predict(torch.zeros(1, cfg.in_channels, size, size, device=device), torch.zeros(1, device=device),
                      torch.zeros(1, 1, model.text_encoder.hidden_size, device=device),
                      torch.ones(1, 1, dtype=torch.long, device=device))

    return RepresentationAlignment(model.config.align, model.denoiser, load_encoder(model.config.align), probe)
