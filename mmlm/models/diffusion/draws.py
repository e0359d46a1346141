"""The training loss's random draws, per image when it is given one generator per image.

With a list of generators (one per image, as diffusers' pipelines take ``generator=``), each image's caption
dropout, latent sample, noise and timestep come from its own generator, so they do not depend on which batch,
micro-batch or process the image is in: 2 processes x batch 4 draw what 1 process x batch 8 draws. Without
generators (None), torch's global RNG in one batched call each, as before. Generators live on the CPU; the
draws are moved to ``device`` (diffusers' ``randn_tensor`` does the same).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor

Generators = Sequence[torch.Generator] | None


def _check(n: int, generators: Generators) -> None:
    if generators is not None and len(generators) != n:
        raise ValueError(f"training_loss: {n} images but {len(generators)} generators (one per image)")


def per_image(n: int, generators: Generators, draw: Callable[[int, torch.Generator | None], torch.Tensor],
              device: torch.device | str | None = None) -> torch.Tensor:
    """``draw(1, generator)`` for each image's generator, concatenated on dim 0; without, ``draw(n, None)``."""
    if generators is None:
        return draw(n, None).to(device)
    _check(n, generators)
    return torch.cat([draw(1, g) for g in generators]).to(device)


def uniform(n: int, generators: Generators) -> torch.Tensor:
    """``n`` draws from U[0, 1), on the CPU."""
    return per_image(n, generators, lambda k, g: torch.rand(k, generator=g))


def integers(high: int, n: int, generators: Generators, device: torch.device | str | None = None) -> torch.Tensor:
    """``n`` integers in [0, high)."""
    if generators is None:
        return torch.randint(0, high, (n,), device=device)
    return per_image(n, generators, lambda k, g: torch.randint(0, high, (k,), generator=g), device)


def normal(shape: Sequence[int], generators: Generators, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard normal noise of ``shape`` (dim 0: the images)."""
    if generators is None:
        return torch.randn(*shape, device=device, dtype=dtype)
    _check(shape[0], generators)
    return randn_tensor(tuple(shape), generator=list(generators), device=torch.device(device or "cpu"), dtype=dtype)
