"""The latent space of latent diffusion: a diffusers ``AutoencoderKL``, pretrained or trained here.

A pretrained VAE comes from a Hub id or a local folder and keeps its own ``scaling_factor``. A VAE
built from ``AutoencoderConfig`` is trained as a quick pre-stage with ``train_autoencoder``
(pixel MSE + a small KL term; no downloaded perceptual loss), and its latent scaling factor is
computed from the data (1 / std of the latents) by ``latent_scaling_factor``: SD's 0.18215 belongs
to SD's VAE only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from mmlm.models.diffusion.config import AutoencoderConfig


def build_autoencoder(config: AutoencoderConfig, image_size: int) -> AutoencoderKL:
    """A pretrained VAE (no network unless ``name_or_path`` is a Hub id) or a fresh one from the config."""
    if config.name_or_path:
        return AutoencoderKL.from_pretrained(config.name_or_path, subfolder=config.subfolder)
    levels = len(config.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_num_groups,
        sample_size=image_size,
        scaling_factor=1.0,  # replaced by latent_scaling_factor after training
        mid_block_add_attention=config.mid_block_attention,
    )


def autoencoder_loss(vae: AutoencoderKL, pixels: torch.Tensor, kl_weight: float) -> tuple[torch.Tensor, dict]:
    """Pixel MSE of the reconstruction of a posterior sample + ``kl_weight`` x KL(posterior || N(0, I))."""
    posterior = vae.encode(pixels).latent_dist
    recon = vae.decode(posterior.sample()).sample
    mse = F.mse_loss(recon, pixels)
    kl = posterior.kl().mean() / pixels[0].numel()  # per pixel value, so kl_weight does not depend on size
    return mse + kl_weight * kl, {"mse": mse.item(), "kl": kl.item()}


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, pixels: torch.Tensor, batch_size: int = 64) -> float:
    """1 / std of latent samples over ``pixels`` (in [-1, 1]), so scaled latents have unit variance."""
    was_training = vae.training
    vae.eval()
    device = next(vae.parameters()).device
    latents = [
        vae.encode(pixels[i : i + batch_size].to(device)).latent_dist.sample().float().cpu()
        for i in range(0, len(pixels), batch_size)
    ]
    vae.train(was_training)
    std = torch.cat(latents).std().item()
    if not math.isfinite(std) or std <= 0:
        raise ValueError(f"latent std is {std}; cannot compute a scaling factor")
    return 1.0 / std


def train_autoencoder(
    vae: AutoencoderKL,
    pixels: torch.Tensor,
    config: AutoencoderConfig,
    *,
    steps: int | None = None,
    max_minutes: float | None = None,
    seed: int = 0,
    log: Callable[[dict], None] | None = None,
) -> dict:
    """Train ``vae`` on ``pixels`` ([N, 3, H, W] in [-1, 1]) with AdamW and a cosine LR; returns final stats.

    Stops after ``steps`` (default ``config.train_steps``) or ``max_minutes`` (default
    ``config.train_minutes``), whichever comes first. Also returns the latent scaling factor.
    """
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"train_autoencoder: expected pixels of shape [N, 3, H, W], got {tuple(pixels.shape)}")
    steps = config.train_steps if steps is None else steps
    max_minutes = config.train_minutes if max_minutes is None else max_minutes
    device = next(vae.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))) * 0.9 + 0.1
    )
    vae.train()
    start, step, parts = time.perf_counter(), 0, {"mse": float("nan"), "kl": float("nan")}
    torch.manual_seed(seed)  # posterior sampling inside the loss
    while step < steps:
        if max_minutes is not None and time.perf_counter() - start > 60 * max_minutes:
            break
        index = torch.randint(len(pixels), (min(config.batch_size, len(pixels)),), generator=generator)
        loss, parts = autoencoder_loss(vae, pixels[index].to(device), config.kl_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        if log is not None and (step % 50 == 0 or step == steps):
            log({"vae/step": step, "vae/mse": parts["mse"], "vae/kl": parts["kl"]})
    vae.eval()
    scale = latent_scaling_factor(vae, pixels)
    vae.register_to_config(scaling_factor=scale)
    return {"steps": step, "seconds": time.perf_counter() - start, "scaling_factor": scale, **parts}
