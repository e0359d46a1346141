"""A colour stream beside the vision tower: colour comes from here, shape from the tower.

Trained from scratch on data where some colour-kind pairs never occur, a CNN ties kind to colour: the
features that find a circle are the ones that saw red, blue ... circles, and a green circle comes out as
a green square. With ``vision.colour_stream`` the tower sees each training image with its RGB channels
in a random order, so colour tells it nothing and its kind features cannot lean on it; colour reaches the
image tokens through this stream instead: per-pixel features of the true colours (1x1 convolutions: they
see no shape), pooled onto the tower's token grid and added to the tokens at the same place.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def shuffle_channels(pixel_values: torch.Tensor) -> torch.Tensor:
    """Each image of a (batch, channels, H, W) tensor with its channels in its own random order."""
    batch, channels = pixel_values.shape[:2]
    order = torch.rand(batch, channels, device=pixel_values.device).argsort(dim=1)
    return pixel_values.gather(1, order[:, :, None, None].expand_as(pixel_values))


class ColourStream(nn.Module):
    """(batch, 3, H, W) pixels -> (batch, grid_h * grid_w, dim) colour features, one per image token."""

    def __init__(self, grid: tuple[int, int], dim: int, width: int = 32, in_channels: int = 3):
        super().__init__()
        self.grid = grid
        self.pixel_features = nn.Sequential(
            nn.Conv2d(in_channels, width, 1), nn.GELU(), nn.Conv2d(width, width, 1), nn.GELU())
        self.to_tokens = nn.Linear(width, dim)
        nn.init.zeros_(self.to_tokens.weight)  # starts as a no-op on the tower's tokens
        nn.init.zeros_(self.to_tokens.bias)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # Every second pixel where the grid allows: a quarter of the cost (at full resolution the stream was
        # 31% of a captioner step on CPU), and colour is constant over far more than two pixels of a shape.
        if min(pixel_values.shape[-2:]) >= 2 * max(self.grid):
            pixel_values = pixel_values[:, :, ::2, ::2]
        # Max-pooling keeps a small shape's colour, which averaging would mix with the background's.
        pooled = F.adaptive_max_pool2d(self.pixel_features(pixel_values), self.grid)
        return self.to_tokens(pooled.flatten(2).transpose(1, 2))
