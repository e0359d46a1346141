"""Noise schedules and sampling: the training schedule, sampling schedulers, classifier-free guidance, generate.

The pipeline half of ``TextToImage`` (diffusers keeps schedulers and pipelines apart from models): the
model supplies ``predict`` (one denoiser call), the text encoder and ``decode``; this module runs the
DDPM / DDIM / DPM-Solver++ loop (a flow model's Euler / Heun / DPM-Solver++ ODE solvers: ``flow.py``) with both
guidance halves in one doubled batch.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from mmlm.models.diffusion import flow
from mmlm.models.diffusion.config import SAMPLER_NAMES, TextToImageConfig
from mmlm.models.diffusion.text_encoder import check_prompts

if TYPE_CHECKING:
    from mmlm.models.diffusion.model import TextToImage

SAMPLERS = dict(zip(SAMPLER_NAMES, (DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler)))


def shifted_betas(base: DDPMScheduler, shift: float) -> list[float]:
    """Betas whose cumulative alphas have ``base``'s log-SNR minus ``2 log(shift)`` at every timestep."""
    alphas_cumprod = base.alphas_cumprod.double()
    log_snr = torch.log(alphas_cumprod) - torch.log1p(-alphas_cumprod) - 2 * math.log(shift)
    shifted = torch.sigmoid(log_snr)
    previous = torch.cat([shifted.new_ones(1), shifted[:-1]])
    return (1 - shifted / previous).clamp(max=0.999).tolist()


def build_noise_scheduler(config: TextToImageConfig) -> DDPMScheduler | FlowMatchEulerDiscreteScheduler:
    """The training schedule (betas, prediction type; a flow model's time shift); every sampler is converted from it."""
    if config.objective == "flow":
        return flow.build_scheduler(config.flow, config.num_train_timesteps)
    schedule = dict(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        prediction_type=config.prediction_type,
        clip_sample=False,  # DDPM's default clipping is wrong for latents and v-prediction
    )
    noise_scheduler = DDPMScheduler(**schedule)
    if config.noise_shift != 1.0:  # the betas travel in the scheduler's config, and on to every sampler
        noise_scheduler = DDPMScheduler(**schedule, trained_betas=shifted_betas(noise_scheduler, config.noise_shift))
    return noise_scheduler


def load_noise_scheduler(config: TextToImageConfig, folder) -> DDPMScheduler | FlowMatchEulerDiscreteScheduler:
    """The training schedule a model saved in ``folder`` (``scheduler/``), of its objective's class."""
    cls = FlowMatchEulerDiscreteScheduler if config.objective == "flow" else DDPMScheduler
    return cls.from_pretrained(folder)


def make_sampler(noise_scheduler: DDPMScheduler | FlowMatchEulerDiscreteScheduler, name: str):
    """A sampling scheduler converted from the training one (same betas and prediction type, or flow shift)."""
    if isinstance(noise_scheduler, FlowMatchEulerDiscreteScheduler):
        return flow.make_sampler(noise_scheduler, name)
    if name not in SAMPLERS:
        raise ValueError(f"scheduler: expected one of {list(SAMPLERS)}, got {name!r}")
    # "trailing" spacing starts sampling at the last training step, which few-step samplers need.
    return SAMPLERS[name].from_config(noise_scheduler.config, timestep_spacing="trailing")


def guided_prediction(predict: Callable[..., torch.Tensor], sample, timestep, text, text_mask, uncond=None,
                      uncond_mask=None, guidance_scale: float = 1.0) -> torch.Tensor:
    """One ``predict`` call; with ``uncond``, both CFG halves run in one doubled batch:
    ``out_u + guidance_scale * (out_c - out_u)``."""
    if uncond is None:
        return predict(sample, timestep, text, text_mask)
    both = predict(torch.cat([sample, sample]), timestep, torch.cat([uncond, text]),
                   torch.cat([uncond_mask, text_mask]))
    out_u, out_c = both.chunk(2)
    return out_u + guidance_scale * (out_c - out_u)


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> RGB PIL images."""
    array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


@torch.no_grad()
def generate(
    model: TextToImage,
    prompts: str | Sequence[str],
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int | None = None,
    negative_prompt: str | Sequence[str] | None = None,
    scheduler: str | None = None,
    batch_size: int = 16,
    num_images_per_prompt: int = 1,
    output_type: str = "pil",
) -> list[Image.Image] | torch.Tensor:
    """Images for ``prompts`` (``num_images_per_prompt`` each, prompt-major order); see ``TextToImage.generate``.

    ``output_type="pt"``: one tensor [N, 3, H, W] in [0, 1], as diffusers' pipelines give with that option."""
    if output_type not in ("pil", "pt"):
        raise ValueError(f"output_type: expected 'pil' or 'pt', got {output_type!r}")
    prompts = check_prompts(prompts, "prompts")
    steps = model.config.num_inference_steps if num_inference_steps is None else num_inference_steps
    scale = model.config.guidance_scale if guidance_scale is None else guidance_scale
    scheduler = scheduler or model.config.scheduler
    if not prompts:
        raise ValueError("prompts: empty list; give at least one prompt")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"num_inference_steps: expected an int, got {steps!r}")
    if steps < 1:
        raise ValueError(f"num_inference_steps: expected >= 1, got {steps}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"guidance_scale: expected a number, got {scale!r}")
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"guidance_scale: expected a finite number >= 0, got {scale}")
    if batch_size < 1 or num_images_per_prompt < 1:
        raise ValueError(
            f"batch_size and num_images_per_prompt must be >= 1, got {batch_size}, {num_images_per_prompt}"
        )
    negatives = check_prompts("" if negative_prompt is None else negative_prompt, "negative_prompt")
    if len(negatives) == 1:
        negatives = negatives * len(prompts)
    if len(negatives) != len(prompts):
        raise ValueError(f"negative_prompt: expected 1 or {len(prompts)} strings, got {len(negatives)}")
    steps, scale = int(steps), float(scale)
    sampler = make_sampler(model.noise_scheduler, scheduler)
    prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
    negatives = [n for n in negatives for _ in range(num_images_per_prompt)]
    base_seed = int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else seed

    was_training = model.training
    model.eval()
    images = []
    for start in range(0, len(prompts), batch_size):
        stop = min(start + batch_size, len(prompts))
        generators = [torch.Generator().manual_seed(base_seed + i) for i in range(start, stop)]
        images.append(_sample(model, prompts[start:stop], negatives[start:stop], sampler, steps, scale, generators))
    model.train(was_training)
    pixels = torch.cat(images)
    return (pixels / 2 + 0.5).clamp(0, 1) if output_type == "pt" else to_pil(pixels)


def _sample(model: TextToImage, prompts, negatives, sampler, steps, scale, generators) -> torch.Tensor:
    text, text_mask = model.text_encoder(prompts)
    uncond = uncond_mask = None
    if scale != 1.0:  # at scale 1 the unconditional half cancels out: skip it
        uncond, uncond_mask = model.text_encoder(negatives)
    size = model.denoiser.config.sample_size
    channels = model.denoiser.config.in_channels
    sample = randn_tensor((len(prompts), channels, size, size), generator=generators, device=model.device,
                          dtype=text.dtype)
    sampler.set_timesteps(steps, device=model.device)
    sample = sample * getattr(sampler, "init_noise_sigma", 1.0)  # flow schedulers start at the noise itself
    for t in sampler.timesteps:
        model_input = sampler.scale_model_input(sample, t) if hasattr(sampler, "scale_model_input") else sample
        output = model.guided_prediction(model_input, t, text, text_mask, uncond, uncond_mask, scale)
        sample = sampler.step(output, t, sample, generator=generators).prev_sample
    return model.decode(sample).float().cpu()
