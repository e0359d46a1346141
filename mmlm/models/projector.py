"""Projectors: image tokens (batch, n, vision_dim) -> LM embeddings (batch, m, lm_dim).

* ``linear``: one Linear layer (LLaVA-1.0).
* ``mlp``: Linear-GELU-Linear (LLaVA-1.5).
* ``pixel_shuffle``: space-to-depth by ``reduce_factor`` r (nanoVLM / Idefics3): an s x s grid of
  tokens becomes (s/r) x (s/r) tokens r^2 times wider, then the MLP. n -> n / r^2 tokens.
* ``perceiver``: ``num_latents`` learned queries cross-attend to the image tokens (a small
  perceiver resampler, as Flamingo / BLIP-2's Q-Former idea). n -> num_latents tokens.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from mmlm.config import ConfigError

PROJECTOR_TYPES = ("linear", "mlp", "pixel_shuffle", "perceiver")


@dataclasses.dataclass
class ProjectorConfig:
    type: str = "mlp"  # linear | mlp | pixel_shuffle | perceiver
    hidden_dim: int | None = None  # MLP hidden width; None = the LM width
    reduce_factor: int = 2  # pixel_shuffle: r (tokens / r^2)
    num_latents: int = 32  # perceiver: output tokens
    num_layers: int = 2  # perceiver: cross-attention blocks
    num_heads: int = 4  # perceiver: attention heads

    def __post_init__(self):
        if self.type not in PROJECTOR_TYPES:
            raise ConfigError(f"projector.type: expected one of {', '.join(PROJECTOR_TYPES)}, got {self.type!r}")
        if self.reduce_factor < 1:
            raise ConfigError(f"projector.reduce_factor: expected >= 1, got {self.reduce_factor}")
        if self.num_latents < 1 or self.num_layers < 1 or self.num_heads < 1:
            raise ConfigError("projector: num_latents, num_layers and num_heads must be >= 1")


class MLPProjector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None):
        super().__init__()
        hidden_dim = hidden_dim or out_dim
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PixelShuffleProjector(nn.Module):
    """Space-to-depth on the square token grid, then an MLP."""

    def __init__(self, in_dim: int, out_dim: int, num_tokens: int, factor: int, hidden_dim: int | None = None):
        super().__init__()
        side = math.isqrt(num_tokens)
        if side * side != num_tokens or side % factor:
            raise ConfigError(
                f"projector.type=pixel_shuffle needs a square token grid whose side divides by reduce_factor={factor}; "
                f"the vision encoder gives {num_tokens} tokens (drop prefix tokens, or change the factor)"
            )
        self.side, self.factor = side, factor
        self.mlp = MLPProjector(in_dim * factor * factor, out_dim, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        s, r = self.side, self.factor
        x = x.reshape(b, s // r, r, s // r, r, c).permute(0, 1, 3, 2, 4, 5)
        return self.mlp(x.reshape(b, (s // r) ** 2, r * r * c))


class PerceiverBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm_latents = nn.LayerNorm(dim)
        self.norm_inputs = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = MLPProjector(dim, dim, 4 * dim)

    def forward(self, latents: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        q = self.norm_latents(latents)
        kv = self.norm_inputs(inputs)
        latents = latents + self.attn(q, kv, kv, need_weights=False)[0]
        return latents + self.mlp(self.norm_mlp(latents))


class PerceiverResampler(nn.Module):
    """Learned latents cross-attend to the image tokens: any n -> num_latents tokens."""

    def __init__(self, in_dim: int, out_dim: int, num_latents: int, num_layers: int, num_heads: int):
        super().__init__()
        if out_dim % num_heads:
            raise ConfigError(f"projector.num_heads={num_heads} must divide the LM width {out_dim}")
        self.input_proj = nn.Linear(in_dim, out_dim)
        self.latents = nn.Parameter(torch.randn(1, num_latents, out_dim) * 0.02)
        self.blocks = nn.ModuleList(PerceiverBlock(out_dim, num_heads) for _ in range(num_layers))
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = self.input_proj(x)
        latents = self.latents.expand(x.shape[0], -1, -1)
        for block in self.blocks:
            latents = block(latents, inputs)
        return self.norm(latents)


def build_projector(config: ProjectorConfig, in_dim: int, out_dim: int, num_tokens: int) -> tuple[nn.Module, int]:
    """The projector and how many tokens it outputs for ``num_tokens`` input tokens."""
    if config.type == "linear":
        return nn.Linear(in_dim, out_dim), num_tokens
    if config.type == "mlp":
        return MLPProjector(in_dim, out_dim, config.hidden_dim), num_tokens
    if config.type == "pixel_shuffle":
        proj = PixelShuffleProjector(in_dim, out_dim, num_tokens, config.reduce_factor, config.hidden_dim)
        return proj, num_tokens // config.reduce_factor**2
    return PerceiverResampler(in_dim, out_dim, config.num_latents, config.num_layers, config.num_heads), config.num_latents
