"""Rectified flow (flow matching) for ``model.objective: flow``: time draws, interpolation, target, loss, samplers.

As in Stable Diffusion 3 (Esser et al. 2024): ``x_t = (1 - t) x0 + t noise`` on a straight line from the
image (t = 0) to the noise (t = 1), the denoiser predicts the velocity ``noise - x0``, plain MSE, and the
training times come from a logit-normal ``t = sigmoid(N(logit_mean, logit_std))``, which puts more of them
in the middle of the path where the prediction is hardest, then ``shift t / (1 + (shift - 1) t)``.
The denoiser sees ``t x num_train_timesteps`` as its timestep, the scale diffusers' flow schedulers sample
with. Sampling is an ODE solve from t = 1 to 0 by diffusers' own flow schedulers, so a saved model's
``scheduler/`` is a diffusers-native ``FlowMatchEulerDiscreteScheduler`` config.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler

from mmlm.models.diffusion import pipeline
from mmlm.models.diffusion.config import FLOW_SAMPLER_NAMES, FlowConfig


def shift_times(t: torch.Tensor, shift: float) -> torch.Tensor:
    """``shift t / (1 + (shift - 1) t)``: the time shift of SD3 and ``FlowMatchEulerDiscreteScheduler(shift=...)``."""
    return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)


def times_from_normal(normal: torch.Tensor, config: FlowConfig) -> torch.Tensor:
    """Training times in (0, 1) from standard normal draws: logit-normal, then shifted (see the module docstring)."""
    return shift_times(torch.sigmoid(config.logit_mean + config.logit_std * normal), config.shift)


def sample_times(n: int, config: FlowConfig, device: torch.device | str | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` training times from torch's RNG (or ``generator``)."""
    return times_from_normal(torch.randn(n, generator=generator, device=device), config)


def broadcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, 1, 1] (as many ones as ``like`` has dimensions after the batch), in ``like``'s dtype."""
    return t.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The point at time ``t`` [B] on the straight path: ``(1 - t) x0 + t noise``."""
    t = broadcast(t, x0)
    return (1 - t) * x0 + t * noise


def velocity(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The training target, ``d x_t / d t = noise - x0`` (diffusers' ``flow_prediction``)."""
    return noise - x0


def timestep_input(t: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """The denoiser's timestep for time ``t``: ``t x num_train_timesteps``, the flow schedulers' ``timesteps``."""
    return t * num_train_timesteps


def loss(predict: Callable[..., torch.Tensor], x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
         text: torch.Tensor, text_mask: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """Mean squared velocity error of ``predict(x_t, timestep, text, text_mask)`` at times ``t`` [B]."""
    prediction = predict(interpolate(x0, noise, t), timestep_input(t, num_train_timesteps), text, text_mask)
    target = velocity(x0, noise)
    return F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=tuple(range(1, x0.ndim))).mean()


def build_scheduler(config: FlowConfig, num_train_timesteps: int) -> FlowMatchEulerDiscreteScheduler:
    """The training scheduler saved with the model: its ``shift`` is the times' shift."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=config.shift)


def make_sampler(noise_scheduler: FlowMatchEulerDiscreteScheduler, name: str):
    """A flow sampler from the training scheduler: Euler, Heun (2 calls a step) or DPM-Solver++ on flow sigmas
    (diffusers' flow mode of the multistep solver); defined once, in the saved folder's pipeline file."""
    if name not in FLOW_SAMPLER_NAMES:
        raise ValueError(f"scheduler: a flow model samples with one of {list(FLOW_SAMPLER_NAMES)}, got {name!r}")
    return pipeline.make_sampler(noise_scheduler, name)
