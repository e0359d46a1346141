"""TextToImage: text encoder + diffusers denoiser + noise schedule, CFG sampling, save/load.

Three spaces the denoiser can work in: ``pixel`` (the image itself), ``patch`` (the image rearranged
losslessly into ``patch_size`` x ``patch_size`` patches stacked on channels: pixel-space diffusion at the
cost of a network running at 1/patch_size the resolution, as in Simple Diffusion) and ``latent``
(through a diffusers ``AutoencoderKL``). The denoiser is a ``UNet2DConditionModel`` (cross-attention on
the text tokens, optionally also the pooled text added to the timestep embedding, which conditions every
ResNet block) or a ``PixArtTransformer2DModel`` (DiT with cross-attention on text); epsilon or
v-prediction with optional min-SNR weighting, caption dropout for classifier-free guidance, and DDPM /
DDIM / DPM-Solver++ sampling with both guidance halves in one doubled batch.

Latent space with a VAE trained here is a two-stage recipe: call ``fit_autoencoder(images)`` once
before diffusion training (``needs_autoencoder_fit`` says whether it is still due; the budget comes
from ``config.vae.train_steps`` / ``train_minutes``). A pretrained VAE (``vae.name_or_path``) needs no
fit and keeps its own scaling factor.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    PixArtTransformer2DModel,
    UNet2DConditionModel,
)
from diffusers.training_utils import compute_snr
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from torch import nn

from mmlm.config import ConfigError, from_dict, to_dict
from mmlm.models.autoencoder import AutoencoderConfig, build_autoencoder, train_autoencoder
from mmlm.models.text_encoder import TextEncoder, TextEncoderConfig

SAMPLERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler}
SPACES = ("pixel", "patch", "latent")
PREDICTION_TYPES = ("epsilon", "v_prediction")
CONFIG_NAME = "config.json"


@dataclasses.dataclass
class DenoiserConfig:
    """The denoiser's architecture. Tiny by default; CPU cost grows fast with attention heads.

    ``unet``: one level per ``block_out_channels`` entry, cross-attention on text where ``attention``
    is true (skip the highest resolution on CPU); ``pooled_text`` also adds the masked mean of the text
    states, projected, to the timestep embedding (FiLM-like: every ResNet block sees colour and kind).
    ``transformer``: PixArt-style DiT blocks with cross-attention, on ``patch_size`` patches.
    """

    kind: str = "unet"  # unet | transformer
    block_out_channels: tuple[int, ...] = (32, 64)
    attention: tuple[bool, ...] = (False, True)  # per level: cross-attention blocks or plain ResNet
    layers_per_block: int = 1
    norm_num_groups: int = 8
    num_heads: int = 1  # attention heads (diffusers' UNet calls this ``attention_head_dim``)
    pooled_text: bool | None = None  # pooled text added to the timestep embedding; None: on for unet, off for DiT
    hidden_size: int = 128  # transformer width
    num_layers: int = 4  # transformer blocks
    patch_size: int = 2

    def __post_init__(self):
        if self.kind not in ("unet", "transformer"):
            raise ConfigError(f"denoiser.kind: expected 'unet' or 'transformer', got {self.kind!r}")
        if self.num_heads < 1:
            raise ConfigError(f"denoiser.num_heads: expected >= 1, got {self.num_heads}")
        if self.kind == "unet":
            if len(self.attention) != len(self.block_out_channels):
                raise ConfigError(
                    f"denoiser.attention: expected one flag per level ({len(self.block_out_channels)}), "
                    f"got {list(self.attention)}"
                )
            if not any(self.attention):
                raise ConfigError("denoiser.attention: at least one level needs cross-attention to see the text")
            bad = [c for c in self.block_out_channels if c % self.norm_num_groups or c % self.num_heads]
            if bad:
                raise ConfigError(
                    f"denoiser.block_out_channels: {bad} not divisible by norm_num_groups={self.norm_num_groups} "
                    f"and num_heads={self.num_heads}"
                )
        else:
            if self.hidden_size % self.num_heads:
                raise ConfigError(f"denoiser.hidden_size ({self.hidden_size}) must be a multiple of num_heads")
            if self.pooled_text:
                raise ConfigError("denoiser.pooled_text: supported by kind 'unet' only; leave it null for 'transformer'")

    @property
    def uses_pooled_text(self) -> bool:
        return self.kind == "unet" and self.pooled_text is not False


@dataclasses.dataclass
class TextToImageConfig:
    """A text-to-image model: round-trips through mmlm.config.from_dict / to_dict.

    ``training_loss`` takes pixel values in [-1, 1] (what ``image_transform`` produces).
    """

    image_size: int = 32
    # Patch by default: exact pixel-space diffusion (no VAE pre-stage, nothing lost) with the denoiser
    # running at image_size / patch_size; a tiny self-trained 2x VAE came out washed out, and a UNet at
    # the full 32x32 learned far slower per CPU-second (benchmarks/diffusion_recipe_search.py).
    space: str = "patch"  # pixel | patch | latent
    patch_size: int = 2  # patch space only: pixel_unshuffle factor (32x32x3 -> 16x16x12)
    denoiser: DenoiserConfig = dataclasses.field(default_factory=DenoiserConfig)
    text_encoder: TextEncoderConfig = dataclasses.field(default_factory=TextEncoderConfig)
    vae: AutoencoderConfig | None = dataclasses.field(default_factory=AutoencoderConfig)  # latent space only
    prediction_type: str = "v_prediction"  # epsilon | v_prediction
    snr_gamma: float | None = 5.0  # min-SNR loss weighting; None = plain MSE
    caption_dropout: float = 0.1  # p(caption -> "") in training, for classifier-free guidance
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"  # any DDPMScheduler beta_schedule
    # Shifts the schedule's log-SNR by -2 log(noise_shift) (Simple Diffusion, Hoogeboom et al. 2023): more noise,
    # so that more steps decide the global layout; 2 gives a 32x32 image the noise levels a 16x16 one sees.
    noise_shift: float = 1.0
    scheduler: str = "dpm++"  # default sampler: ddpm | ddim | dpm++
    num_inference_steps: int = 20
    guidance_scale: float = 2.0
    random_flip: bool = False  # train-time horizontal flip (off: captions may say left/right)

    def __post_init__(self):
        if self.space not in SPACES:
            raise ConfigError(f"model.space: expected one of {SPACES}, got {self.space!r}")
        if self.space == "patch" and (self.patch_size < 1 or self.image_size % self.patch_size):
            raise ConfigError(
                f"model.patch_size: expected a divisor of image_size ({self.image_size}) >= 1, got {self.patch_size}"
            )
        if self.space == "latent" and self.vae is None:
            raise ConfigError("model.vae: required when space is 'latent'")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(
                f"model.prediction_type: expected one of {PREDICTION_TYPES}, got {self.prediction_type!r}"
            )
        if self.scheduler not in SAMPLERS:
            raise ConfigError(f"model.scheduler: expected one of {list(SAMPLERS)}, got {self.scheduler!r}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"model.caption_dropout: expected 0 <= p < 1, got {self.caption_dropout}")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ConfigError(f"model.snr_gamma: expected > 0 or null, got {self.snr_gamma}")
        if not self.noise_shift > 0:
            raise ConfigError(f"model.noise_shift: expected > 0, got {self.noise_shift}")
        if self.image_size < 8:
            raise ConfigError(f"model.image_size: expected >= 8, got {self.image_size}")


class ImageTransform:
    """PIL image -> float tensor [3, size, size] in [-1, 1]; picklable for DataLoader workers."""

    def __init__(self, size: int, random_flip: bool = False):
        self.size = size
        self.random_flip = random_flip

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
        if self.random_flip and torch.rand(()) < 0.5:
            pixels = pixels.flip(-1)
        return pixels


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> RGB PIL images."""
    array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


def build_denoiser(config: DenoiserConfig, sample_size: int, channels: int, text_dim: int) -> nn.Module:
    """A diffusers denoiser for ``channels`` x ``sample_size``^2 inputs, conditioned on ``text_dim``-wide text."""
    if config.kind == "transformer":
        return PixArtTransformer2DModel(
            num_attention_heads=config.num_heads,
            attention_head_dim=config.hidden_size // config.num_heads,
            in_channels=channels,
            out_channels=channels,
            num_layers=config.num_layers,
            cross_attention_dim=config.hidden_size,
            caption_channels=text_dim,  # projected to hidden_size inside the model
            sample_size=sample_size,
            patch_size=config.patch_size,
            norm_num_groups=config.norm_num_groups,
            use_additional_conditions=False,
        )
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config.attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.attention))
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        down_block_types=down,
        up_block_types=up,
        mid_block_type="UNetMidBlock2DCrossAttn" if config.attention[-1] else "UNetMidBlock2D",
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        norm_num_groups=config.norm_num_groups,
        cross_attention_dim=text_dim,
        attention_head_dim=config.num_heads,  # diffusers' naming: this is the number of heads
        # The pooled text goes through an MLP and is added to the timestep embedding (forward's class_labels).
        class_embed_type="projection" if config.uses_pooled_text else None,
        projection_class_embeddings_input_dim=text_dim if config.uses_pooled_text else None,
    )


def shifted_betas(base: DDPMScheduler, shift: float) -> list[float]:
    """Betas whose cumulative alphas have ``base``'s log-SNR minus ``2 log(shift)`` at every timestep."""
    alphas_cumprod = base.alphas_cumprod.double()
    log_snr = torch.log(alphas_cumprod) - torch.log1p(-alphas_cumprod) - 2 * math.log(shift)
    shifted = torch.sigmoid(log_snr)
    previous = torch.cat([shifted.new_ones(1), shifted[:-1]])
    return (1 - shifted / previous).clamp(max=0.999).tolist()


def pooled_text(text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the text states over valid tokens: [B, L, D], [B, L] -> [B, D]."""
    weights = text_mask.to(text.dtype).unsqueeze(-1)
    return (text * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def _check_prompts(prompts: str | Sequence[str], name: str) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"{name}: expected a string or a list of strings, got {prompts!r}")
    return prompts


class TextToImage(nn.Module):
    """Text-conditioned diffusion model; see the module docstring for the recipe."""

    def __init__(
        self,
        config: TextToImageConfig,
        text_encoder: TextEncoder,
        denoiser: nn.Module,
        noise_scheduler: DDPMScheduler,
        vae: AutoencoderKL | None = None,
        latent_scale: float = 0.0,
    ):
        super().__init__()
        if (vae is None) == (config.space == "latent"):
            raise ValueError(f"a VAE is needed in latent space and only there (space={config.space!r})")
        self.config = config
        self.text_encoder = text_encoder
        self.denoiser = denoiser
        self.noise_scheduler = noise_scheduler
        self.vae = vae
        if vae is not None:
            vae.requires_grad_(False)
            vae.eval()
        # In the state dict, so a data-computed scale survives resume and weight swaps. 0 = not fitted yet.
        self.register_buffer("latent_scale", torch.tensor(float(latent_scale)))

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_config(
        cls,
        config: TextToImageConfig,
        corpus: Iterable[str] | None = None,
        text_encoder: TextEncoder | None = None,
    ) -> TextToImage:
        """Build from a config; ``corpus`` trains the scratch tokenizer; ``text_encoder`` overrides the config's
        (e.g. ``TextEncoder.from_language_model(vlm.language, vlm.tokenizer)``)."""
        text_encoder = text_encoder or TextEncoder.from_config(config.text_encoder, corpus)
        vae, latent_scale, size, channels = None, 0.0, config.image_size, 3
        if config.space == "latent":
            vae = build_autoencoder(config.vae, config.image_size)
            factor = 2 ** (len(vae.config.block_out_channels) - 1)
            if config.image_size % factor:
                raise ConfigError(f"model.image_size {config.image_size} is not divisible by the VAE's factor {factor}")
            size, channels = config.image_size // factor, vae.config.latent_channels
            latent_scale = float(vae.config.scaling_factor) if config.vae.name_or_path else 0.0
        elif config.space == "patch":
            size, channels = config.image_size // config.patch_size, 3 * config.patch_size**2
        denoiser = build_denoiser(config.denoiser, size, channels, text_encoder.hidden_size)
        schedule = dict(
            num_train_timesteps=config.num_train_timesteps,
            beta_schedule=config.beta_schedule,
            prediction_type=config.prediction_type,
            clip_sample=False,  # DDPM's default clipping is wrong for latents and v-prediction
        )
        noise_scheduler = DDPMScheduler(**schedule)
        if config.noise_shift != 1.0:  # the betas travel in the scheduler's config, and on to every sampler
            noise_scheduler = DDPMScheduler(**schedule, trained_betas=shifted_betas(noise_scheduler, config.noise_shift))
        return cls(config, text_encoder, denoiser, noise_scheduler, vae, latent_scale)

    def save_pretrained(self, path: str | Path) -> None:
        """A diffusers-style folder: config.json, denoiser/, scheduler/, text_encoder/, tokenizer/, vae/."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.denoiser.save_pretrained(path / "denoiser", safe_serialization=True)
        self.noise_scheduler.save_pretrained(path / "scheduler")
        text_class = self.text_encoder.save(path / "text_encoder", path / "tokenizer")
        if self.vae is not None:
            self.vae.register_to_config(scaling_factor=float(self.latent_scale))
            self.vae.save_pretrained(path / "vae", safe_serialization=True)
        meta = {
            "_class_name": type(self).__name__,
            "text_encoder_class": text_class,
            "latent_scale": float(self.latent_scale),
            "config": to_dict(self.config),
        }
        (path / CONFIG_NAME).write_text(json.dumps(meta, indent=2), encoding="utf-8")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> TextToImage:
        """Load a folder written by ``save_pretrained`` (local only: no network, no pickle)."""
        path = Path(path)
        meta_file = path / CONFIG_NAME
        if not meta_file.is_file():
            raise FileNotFoundError(f"{meta_file}: not found; expected a folder written by TextToImage.save_pretrained")
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        if meta.get("_class_name") != cls.__name__:
            raise ValueError(f"{meta_file}: _class_name is {meta.get('_class_name')!r}, expected {cls.__name__!r}")
        config = from_dict(TextToImageConfig, meta["config"], where="model")
        text_encoder = TextEncoder.from_folder(
            path / "text_encoder", path / "tokenizer", meta["text_encoder_class"], config.text_encoder
        )
        denoiser_class = PixArtTransformer2DModel if config.denoiser.kind == "transformer" else UNet2DConditionModel
        denoiser = denoiser_class.from_pretrained(path / "denoiser")
        vae = AutoencoderKL.from_pretrained(path / "vae") if config.space == "latent" else None
        scheduler = DDPMScheduler.from_pretrained(path / "scheduler")
        return cls(config, text_encoder, denoiser, scheduler, vae, meta["latent_scale"])

    # ---------------------------------------------------------------- pieces the harness uses
    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def image_transform(self, train: bool = False) -> Callable[[Image.Image], torch.Tensor]:
        """PIL -> tensor in [-1, 1] at ``image_size``, the input ``training_loss`` expects (picklable)."""
        return ImageTransform(self.config.image_size, random_flip=train and self.config.random_flip)

    def trainable_groups(self) -> dict[str, nn.Module]:
        """Parameter groups for the optimizer (per-group LR in train.module_lr); frozen parts are left out."""
        groups: dict[str, nn.Module] = {"denoiser": self.denoiser}
        if not self.text_encoder.frozen:
            groups["text_encoder"] = self.text_encoder.model
        return groups

    def train(self, mode: bool = True) -> TextToImage:
        super().train(mode)
        if self.vae is not None:
            self.vae.eval()  # always frozen during diffusion
        return self

    @property
    def needs_autoencoder_fit(self) -> bool:
        """True in latent space with a VAE built here that ``fit_autoencoder`` has not trained yet."""
        return self.vae is not None and float(self.latent_scale) == 0.0

    def fit_autoencoder(
        self,
        images: torch.Tensor | Sequence[Image.Image],
        steps: int | None = None,
        max_minutes: float | None = None,
        seed: int = 0,
        log: Callable[[dict], None] | None = None,
    ) -> dict:
        """Train the VAE (pre-stage, MSE + KL) on ``images`` and set the latent scale from them.

        ``images``: PIL images or a tensor [N, 3, H, W] in [-1, 1]. Budget defaults to the config's.
        """
        if self.vae is None:
            raise ValueError("fit_autoencoder: this model works in pixel space (config.space='pixel'); there is no VAE")
        if not isinstance(images, torch.Tensor):
            transform = self.image_transform()
            images = torch.stack([transform(image) for image in images])
        self.vae.requires_grad_(True)
        try:
            stats = train_autoencoder(self.vae, images, self.config.vae, steps=steps, max_minutes=max_minutes,
                                      seed=seed, log=log)
        finally:
            self.vae.requires_grad_(False)
            self.vae.eval()
        self.latent_scale.fill_(stats["scaling_factor"])
        return stats

    # ---------------------------------------------------------------- diffusion
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] -> what the denoiser works on (the pixels, their patches, or scaled latents)."""
        if self.config.space == "patch":
            return F.pixel_unshuffle(pixel_values, self.config.patch_size)
        if self.vae is None:
            return pixel_values
        if self.needs_autoencoder_fit:
            raise RuntimeError(
                "the VAE has not been trained: call model.fit_autoencoder(images) before diffusion training "
                "(or set vae.name_or_path to a pretrained AutoencoderKL)"
            )
        with torch.no_grad():
            return self.vae.encode(pixel_values).latent_dist.sample() * self.latent_scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of ``encode_images``: denoiser space -> pixels (roughly in [-1, 1])."""
        if self.config.space == "patch":
            return F.pixel_shuffle(latents, self.config.patch_size)
        if self.vae is None:
            return latents
        return self.vae.decode(latents / self.latent_scale).sample

    def predict(self, sample: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor,
                text_mask: torch.Tensor) -> torch.Tensor:
        """The denoiser's raw output (epsilon or v, by ``prediction_type``)."""
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(sample.shape[0])
        extra = {}
        if getattr(self.denoiser.config, "class_embed_type", None) == "projection":
            extra["class_labels"] = pooled_text(text, text_mask)
        return self.denoiser(
            sample, timestep=timesteps, encoder_hidden_states=text, encoder_attention_mask=text_mask, **extra
        ).sample

    def forward(self, pixel_values: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """The training loss; calling the module (not ``training_loss``) lets DDP/FSDP wrappers sync gradients."""
        return self.training_loss(pixel_values, captions)

    def training_loss(self, pixel_values: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """Diffusion loss on a batch: ``pixel_values`` [B, 3, H, W] in [-1, 1], one caption per image."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"training_loss: pixel_values must be [B, 3, H, W], got {tuple(pixel_values.shape)}")
        size = self.config.image_size
        if pixel_values.shape[-2:] != (size, size):
            raise ValueError(f"training_loss: images must be {size}x{size}, got {tuple(pixel_values.shape[-2:])}")
        captions = _check_prompts(captions, "training_loss: captions")
        if len(captions) != len(pixel_values):
            raise ValueError(f"training_loss: {len(pixel_values)} images but {len(captions)} captions")
        low, high = pixel_values.min().item(), pixel_values.max().item()
        if low < -1.001 or high > 1.001:
            raise ValueError(
                f"training_loss: pixel values must be in [-1, 1] (model.image_transform()), got [{low:.3g}, {high:.3g}]"
            )
        x0 = self.encode_images(pixel_values)
        if self.training and self.config.caption_dropout > 0:
            drop = (torch.rand(len(captions)) < self.config.caption_dropout).tolist()
            captions = ["" if d else c for c, d in zip(captions, drop)]
        text, text_mask = self.text_encoder(captions)

        noise = torch.randn_like(x0)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(x0),), device=x0.device)
        noisy = self.noise_scheduler.add_noise(x0, noise, timesteps)
        if self.config.prediction_type == "epsilon":
            target = noise
        else:
            target = self.noise_scheduler.get_velocity(x0, noise, timesteps)
        prediction = self.predict(noisy, timesteps, text, text_mask)
        loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.config.snr_gamma is not None:
            # Min-SNR-gamma (Hang et al. 2023): weight min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v.
            snr = compute_snr(self.noise_scheduler, timesteps)
            clipped = snr.clamp(max=self.config.snr_gamma)
            loss = loss * (clipped / (snr + 1) if self.config.prediction_type == "v_prediction" else clipped / snr)
        return loss.mean()

    def guided_prediction(self, sample, timestep, text, text_mask, uncond=None, uncond_mask=None,
                          guidance_scale: float = 1.0) -> torch.Tensor:
        """One denoiser call; with ``uncond``, both CFG halves run in one doubled batch:
        ``out_u + guidance_scale * (out_c - out_u)``."""
        if uncond is None:
            return self.predict(sample, timestep, text, text_mask)
        both = self.predict(torch.cat([sample, sample]), timestep, torch.cat([uncond, text]),
                            torch.cat([uncond_mask, text_mask]))
        out_u, out_c = both.chunk(2)
        return out_u + guidance_scale * (out_c - out_u)

    def make_sampler(self, name: str):
        """A sampling scheduler converted from the training one (same betas and prediction type)."""
        if name not in SAMPLERS:
            raise ValueError(f"scheduler: expected one of {list(SAMPLERS)}, got {name!r}")
        # "trailing" spacing starts sampling at the last training step, which few-step samplers need.
        return SAMPLERS[name].from_config(self.noise_scheduler.config, timestep_spacing="trailing")

    @torch.no_grad()
    def generate(
        self,
        prompts: str | Sequence[str],
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        scheduler: str | None = None,
        batch_size: int = 16,
        num_images_per_prompt: int = 1,
    ) -> list[Image.Image]:
        """Images for ``prompts`` (``num_images_per_prompt`` each, prompt-major order).

        Defaults come from the config (``dpm++``, 20 steps, guidance 2). Image ``i`` draws its noise from
        its own generator seeded ``seed + i``, so results do not depend on ``batch_size``.
        """
        prompts = _check_prompts(prompts, "prompts")
        steps = self.config.num_inference_steps if num_inference_steps is None else num_inference_steps
        scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        scheduler = scheduler or self.config.scheduler
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
        negatives = _check_prompts("" if negative_prompt is None else negative_prompt, "negative_prompt")
        if len(negatives) == 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise ValueError(f"negative_prompt: expected 1 or {len(prompts)} strings, got {len(negatives)}")
        steps, scale = int(steps), float(scale)
        sampler = self.make_sampler(scheduler)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        negatives = [n for n in negatives for _ in range(num_images_per_prompt)]
        base_seed = int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else seed

        was_training = self.training
        self.eval()
        images = []
        for start in range(0, len(prompts), batch_size):
            stop = min(start + batch_size, len(prompts))
            generators = [torch.Generator().manual_seed(base_seed + i) for i in range(start, stop)]
            images += self._sample(prompts[start:stop], negatives[start:stop], sampler, steps, scale, generators)
        self.train(was_training)
        return images

    def _sample(self, prompts, negatives, sampler, steps, scale, generators) -> list[Image.Image]:
        text, text_mask = self.text_encoder(prompts)
        uncond = uncond_mask = None
        if scale != 1.0:  # at scale 1 the unconditional half cancels out: skip it
            uncond, uncond_mask = self.text_encoder(negatives)
        size = self.denoiser.config.sample_size
        channels = self.denoiser.config.in_channels
        sample = randn_tensor((len(prompts), channels, size, size), generator=generators, device=self.device,
                              dtype=text.dtype)
        sampler.set_timesteps(steps, device=self.device)
        sample = sample * sampler.init_noise_sigma
        for t in sampler.timesteps:
            model_input = sampler.scale_model_input(sample, t)
            output = self.guided_prediction(model_input, t, text, text_mask, uncond, uncond_mask, scale)
            sample = sampler.step(output, t, sample, generator=generators).prev_sample
        return to_pil(self.decode(sample))
