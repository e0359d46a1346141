"""TextToImage: text encoder + diffusers denoiser + noise schedule; build, training loss, save/load.

Three spaces the denoiser can work in: ``pixel`` (the image itself), ``patch`` (the image rearranged
losslessly into ``patch_size`` x ``patch_size`` patches stacked on channels: pixel-space diffusion at the
cost of a network running at 1/patch_size the resolution, as in Simple Diffusion) and ``latent``
(through a diffusers ``AutoencoderKL``). The denoiser is a ``UNet2DConditionModel`` (cross-attention on
the text tokens, optionally also the pooled text added to the timestep embedding, which conditions every
ResNet block) or a ``PixArtTransformer2DModel`` (DiT with cross-attention on text); epsilon or
v-prediction with optional min-SNR weighting (or rectified flow, ``flow.py``) and caption dropout for CFG, plus,
while training, representation alignment to a frozen image encoder (``config.align``, ``alignment.py``). Sampling
(schedulers, CFG, ``generate``) lives in ``sampling.py``; loading a pretrained pipeline in ``pretrained.py``.
Longer than 400 lines: the three spaces' encode/decode and the alignment term sit beside the loss that uses them.

Latent space with a VAE trained here is a two-stage recipe: call ``fit_autoencoder(images)`` once
before diffusion training (``needs_autoencoder_fit`` says whether it is still due; the budget comes
from ``config.vae.train_steps`` / ``train_minutes``). A pretrained VAE (``vae.name_or_path``) needs no
fit and keeps its own scaling factor.

Fine-tuning a pretrained diffusers pipeline: ``config.pipeline`` names its folder or Hub id; the parts, the
resolution, the latent scaling (and shift) and the noise schedule come from it (``pretrained.py``), full or LoRA
(``config.lora``). Such a model saves as a diffusers pipeline folder that ``DiffusionPipeline.from_pretrained``
loads without mmlm.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from diffusers import AutoencoderKL, DDPMScheduler, PixArtTransformer2DModel, UNet2DConditionModel
from diffusers.training_utils import compute_snr
from PIL import Image
from torch import nn

from mmlm.config import ConfigError, from_dict, to_dict
from mmlm.models.diffusion import alignment, draws, flow, pretrained, sampling
from mmlm.models.diffusion.autoencoder import build_autoencoder, train_autoencoder
from mmlm.models.diffusion.config import DenoiserConfig, TextToImageConfig
from mmlm.models.diffusion.text_encoder import TextEncoder, check_prompts
from mmlm.models.vision import ImageTransform

CONFIG_NAME = "config.json"


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
        resnet_time_scale_shift=config.resnet_time_scale_shift,
        # The pooled text goes through an MLP and is added to the timestep embedding (forward's class_labels).
        class_embed_type="projection" if config.uses_pooled_text else None,
        projection_class_embeddings_input_dim=text_dim if config.uses_pooled_text else None,
    )


def pooled_text(text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the text states over valid tokens: [B, L, D], [B, L] -> [B, D]."""
    weights = text_mask.to(text.dtype).unsqueeze(-1)
    return (text * weights).sum(1) / weights.sum(1).clamp(min=1.0)


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
        latent_shift: float = 0.0,
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
        self.latent_shift = float(latent_shift)  # a pretrained VAE's shift_factor (SD3/Flux style); 0 otherwise
        self.alignment: alignment.RepresentationAlignment | None = None  # config.align, set by from_config

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
        if config.pipeline is not None:
            return cls.from_pipeline(config).with_alignment()
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
        noise_scheduler = sampling.build_noise_scheduler(config)
        return cls(config, text_encoder, denoiser, noise_scheduler, vae, latent_scale).with_alignment()

    def with_alignment(self) -> TextToImage:
        """Attach ``config.align``'s training aid (encoder, hook, MLP) when it is set; returns self."""
        if self.config.align is not None and self.alignment is None:
            self.alignment = alignment.build_for(self)
        return self

    @classmethod
    def from_pipeline(cls, config: TextToImageConfig) -> TextToImage:
        """The parts of the diffusers pipeline ``config.pipeline`` (see ``pretrained.load_pipeline_parts``), with
        LoRA adapters when ``config.lora`` is set."""
        parts = pretrained.load_pipeline_parts(config)
        if config.lora is not None:
            pretrained.add_lora(parts.denoiser, config.lora, config.lora.target_modules)
            if config.lora.text_encoder:
                pretrained.add_lora(parts.text_encoder.model, config.lora, config.lora.text_encoder_target_modules)
        return cls(parts.config, parts.text_encoder, parts.denoiser, parts.noise_scheduler, parts.vae,
                   parts.latent_scale, parts.latent_shift)

    def save_pretrained(self, path: str | Path) -> None:
        """A folder: from a pipeline, the diffusers pipeline layout (``pretrained.save_diffusers_layout``);
        from scratch, config.json, denoiser/, scheduler/, text_encoder/, tokenizer/, vae/."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.config.pipeline is not None:
            pretrained.save_diffusers_layout(self, path)
            meta = {"model_class": type(self).__name__, "layout": "diffusers", "config": to_dict(self.config)}
            (path / CONFIG_NAME).write_text(json.dumps(meta, indent=2), encoding="utf-8")
            return
        self.denoiser.save_pretrained(path / "denoiser", safe_serialization=True)
        self.noise_scheduler.save_pretrained(path / "scheduler")
        text_class = self.text_encoder.save(path / "text_encoder", path / "tokenizer")
        if self.vae is not None:
            self.vae.register_to_config(scaling_factor=float(self.latent_scale))
            self.vae.save_pretrained(path / "vae", safe_serialization=True)
        meta = {
            "model_class": type(self).__name__,
            "text_encoder_class": text_class,
            "latent_scale": float(self.latent_scale),
            "config": to_dict(self.config),
        }
        (path / CONFIG_NAME).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        pretrained.write_custom_pipeline(self, path)  # DiffusionPipeline.from_pretrained reads the folder too

    @classmethod
    def from_pretrained(cls, path: str | Path) -> TextToImage:
        """Load a folder written by ``save_pretrained`` (local only: no network, no pickle)."""
        path = Path(path)
        meta_file = path / CONFIG_NAME
        if not meta_file.is_file() and (path / "model_index.json").is_file():  # a diffusers pipeline of any origin
            return cls.from_config(TextToImageConfig(pipeline=str(path)))
        if not meta_file.is_file():
            raise FileNotFoundError(f"{meta_file}: not found; expected a folder written by TextToImage.save_pretrained")
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        if meta.get("layout") == "diffusers":
            return cls._from_diffusers_layout(path, meta)
        # "_class_name": the key of folders saved before the generator took the VLM's "model_class".
        class_name = meta.get("model_class", meta.get("_class_name"))
        if class_name != cls.__name__:
            raise ValueError(f"{meta_file}: model_class is {class_name!r}, expected {cls.__name__!r}")
        config = from_dict(TextToImageConfig, meta["config"], where="model")
        text_encoder = TextEncoder.from_folder(
            path / "text_encoder", path / "tokenizer", meta["text_encoder_class"], config.text_encoder
        )
        denoiser_class = PixArtTransformer2DModel if config.denoiser.kind == "transformer" else UNet2DConditionModel
        denoiser = denoiser_class.from_pretrained(path / "denoiser")
        vae = AutoencoderKL.from_pretrained(path / "vae") if config.space == "latent" else None
        scheduler = sampling.load_noise_scheduler(config, path / "scheduler")
        return cls(config, text_encoder, denoiser, scheduler, vae, meta["latent_scale"])

    @classmethod
    def _from_diffusers_layout(cls, path: Path, meta: dict) -> TextToImage:
        """A pipeline folder mmlm saved: every part from the folder itself, then its LoRA file when it has one."""
        config = from_dict(TextToImageConfig, meta["config"], where="model")
        config = dataclasses.replace(
            config, pipeline=str(path),
            denoiser=dataclasses.replace(config.denoiser, name_or_path=None, subfolder=None),
            text_encoder=dataclasses.replace(config.text_encoder, name_or_path=str(path)),
            vae=None if config.vae is None else dataclasses.replace(config.vae, name_or_path=None, subfolder=None),
        )
        model = cls.from_config(config)
        if config.lora is not None:
            pretrained.load_lora(model, path)
        return model

    # ---------------------------------------------------------------- pieces the harness uses
    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def image_transform(self, train: bool = False) -> Callable[[Image.Image], torch.Tensor]:
        """PIL -> tensor in [-1, 1] at ``image_size``, the input ``training_loss`` expects (picklable)."""
        size, crop = self.config.image_size, self.config.crop
        if crop == "squash":
            resize = [T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC)]
        else:  # the short side to size, then a centre crop (a random one in training with crop: random)
            cropper = T.RandomCrop(size) if train and crop == "random" else T.CenterCrop(size)
            resize = [T.Resize(size, interpolation=T.InterpolationMode.BILINEAR), cropper]
        steps = [*resize, T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]
        if train and self.config.random_flip:
            steps.append(T.RandomHorizontalFlip())
        return ImageTransform(T.Compose(steps))

    def trainable_groups(self) -> dict[str, nn.Module]:
        """Parameter groups for the optimizer (per-group LR in train.module_lr); frozen parts are left out."""
        groups: dict[str, nn.Module] = {"denoiser": self.denoiser}
        if not self.text_encoder.frozen:
            groups["text_encoder"] = self.text_encoder.model
        if self.alignment is not None:
            groups["align"] = self.alignment.projector
        return groups

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the denoiser's (and a trained text encoder's) activations in backward (train.gradient_checkpointing)."""
        self.denoiser.enable_gradient_checkpointing()
        if not self.text_encoder.frozen and hasattr(self.text_encoder.model, "gradient_checkpointing_enable"):
            self.text_encoder.model.gradient_checkpointing_enable()

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
    def encode_images(self, pixel_values: torch.Tensor,
                      generator: Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] -> what the denoiser works on (the pixels, their patches, or scaled latents sampled
        with ``generator``: one per image, or None)."""
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
            latents = self.vae.encode(pixel_values).latent_dist.sample(None if generator is None else list(generator))
            return (latents - self.latent_shift) * self.latent_scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of ``encode_images``: denoiser space -> pixels (roughly in [-1, 1])."""
        if self.config.space == "patch":
            return F.pixel_shuffle(latents, self.config.patch_size)
        if self.vae is None:
            return latents
        return self.vae.decode(latents / self.latent_scale + self.latent_shift).sample

    def predict(self, sample: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor,
                text_mask: torch.Tensor) -> torch.Tensor:
        """The denoiser's raw output (epsilon or v, by ``prediction_type``)."""
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(sample.shape[0])
        extra = {}
        if getattr(self.denoiser.config, "class_embed_type", None) == "projection":
            extra["class_labels"] = pooled_text(text, text_mask)
        extra.update(pretrained.denoiser_extras(self.denoiser, len(sample), self.config.image_size, text))
        # SD pipelines' denoisers attend over every padded position, as diffusers' pipelines call them.
        mask = None if self.text_encoder.config.attend_padding else text_mask
        output = self.denoiser(sample, timestep=timesteps, encoder_hidden_states=text, encoder_attention_mask=mask,
                               **extra).sample
        return pretrained.without_learned_sigma(self.denoiser, output)  # PixArt's learned variance: not sampled

    def forward(self, pixel_values: torch.Tensor, captions: Sequence[str],
                generator: Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """The training loss; calling the module (not ``training_loss``) lets DDP/FSDP wrappers sync gradients."""
        return self.training_loss(pixel_values, captions, generator)

    def training_loss(self, pixel_values: torch.Tensor, captions: Sequence[str],
                      generator: Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """Diffusion loss on a batch: ``pixel_values`` [B, 3, H, W] in [-1, 1], one caption per image.

        ``generator``: one per image; its random draws then come from it alone (``draws.py``); None: global RNG."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"training_loss: pixel_values must be [B, 3, H, W], got {tuple(pixel_values.shape)}")
        size = self.config.image_size
        if pixel_values.shape[-2:] != (size, size):
            raise ValueError(f"training_loss: images must be {size}x{size}, got {tuple(pixel_values.shape[-2:])}")
        captions = check_prompts(captions, "training_loss: captions")
        if len(captions) != len(pixel_values):
            raise ValueError(f"training_loss: {len(pixel_values)} images but {len(captions)} captions")
        low, high = pixel_values.min().item(), pixel_values.max().item()
        if low < -1.001 or high > 1.001:
            raise ValueError(
                f"training_loss: pixel values must be in [-1, 1] (model.image_transform()), got [{low:.3g}, {high:.3g}]"
            )
        if self.alignment is None:
            return self._denoising_loss(pixel_values, captions, generator)
        if not self.alignment.active(len(pixel_values)):
            return self._denoising_loss(pixel_values, captions, generator) + self.alignment.unused()
        targets = self.alignment.targets(pixel_values)
        with self.alignment.capture():
            loss = self._denoising_loss(pixel_values, captions, generator)
        return loss + self.config.align.weight * self.alignment.loss(targets)

    def _denoising_loss(self, pixel_values: torch.Tensor, captions: list[str],
                        generator: Sequence[torch.Generator] | None) -> torch.Tensor:
        x0 = self.encode_images(pixel_values, generator)
        if self.training and self.config.caption_dropout > 0:
            drop = (draws.uniform(len(captions), generator) < self.config.caption_dropout).tolist()
            captions = ["" if d else c for c, d in zip(captions, drop)]
        text, text_mask = self.text_encoder(captions)

        noise = draws.normal(x0.shape, generator, x0.device, x0.dtype)
        if self.config.noise_offset:  # per image and channel (Guttenberg's offset noise, as diffusers' scripts)
            noise = noise + self.config.noise_offset * draws.normal((*x0.shape[:2], 1, 1), generator, x0.device,
                                                                    x0.dtype)
        if self.config.objective == "flow":  # rectified flow (flow.py): logit-normal times, velocity target
            times = draws.per_image(len(x0), generator, lambda n, g: flow.sample_times(
                n, self.config.flow, device=x0.device if g is None else "cpu", generator=g), x0.device)
            return flow.loss(self.predict, x0, noise, times, text, text_mask, self.config.num_train_timesteps)
        timesteps = draws.integers(self.noise_scheduler.config.num_train_timesteps, len(x0), generator, x0.device)
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
        return sampling.guided_prediction(self.predict, sample, timestep, text, text_mask, uncond, uncond_mask,
                                          guidance_scale)

    def make_sampler(self, name: str):
        """A sampling scheduler converted from the training one (same betas and prediction type)."""
        return sampling.make_sampler(self.noise_scheduler, name)

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
        output_type: str = "pil",
    ) -> list[Image.Image] | torch.Tensor:
        """Images for ``prompts`` (``num_images_per_prompt`` each, prompt-major order).

        Defaults come from the config (``dpm++``, 20 steps, guidance 2). Image ``i`` draws its noise from
        its own generator seeded ``seed + i``, so results do not depend on ``batch_size``. ``output_type="pt"``:
        a tensor [N, 3, H, W] in [0, 1] (what a diffusers pipeline returns with that option).
        """
        return sampling.generate(self, prompts, num_inference_steps, guidance_scale, seed, negative_prompt,
                                 scheduler, batch_size, num_images_per_prompt, output_type)
