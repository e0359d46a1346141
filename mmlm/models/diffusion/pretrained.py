"""Pretrained diffusers pipelines in and out: load the parts of a pipeline folder (or Hub id), check that they fit,
add LoRA adapters (peft), and write a trained model back as a diffusers-layout folder.

What ``DiffusionPipeline.from_pretrained`` reads is what we write: ``model_index.json``, ``unet/`` or
``transformer/``, ``text_encoder/``, ``tokenizer/``, ``vae/``, ``scheduler/`` (the sampler mmlm samples with,
so the pipeline and ``TextToImage.generate`` give the same images), LoRA runs also their adapters over the
untouched base weights (``lora.py``: diffusers' LoRA file for SD-style pipelines, peft's format for PixArt's),
and mmlm's own ``config.json`` beside them (``model_class`` and the training config).

Two pipeline families: Stable-Diffusion style (``unet/``, CLIP) and PixArt style (``transformer/``, T5, saved as
``PixArtAlphaPipeline``). PixArt's conventions are kept in training and sampling: the T5 mask reaches the denoiser, prompts are
lower-cased and padded to 120 tokens, the learned-sigma half of the output is dropped, and the 1024px models get
their resolution micro-conditions.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import AutoencoderKL, DDPMScheduler
from torch import nn

from mmlm.config import ConfigError
from mmlm.models.diffusion.config import TextToImageConfig
from mmlm.models.diffusion.lora import add_lora, load_lora, save_lora, save_part, save_peft_adapters
from mmlm.models.diffusion.text_encoder import TextEncoder

__all__ = ["add_lora", "load_lora", "load_pipeline_parts", "save_diffusers_layout"]  # the first two from lora.py

DENOISER_PARTS = ("unet", "transformer")
# The diffusers pipeline class a saved folder names, by its denoiser's folder.
PIPELINE_CLASSES = {"unet": "StableDiffusionPipeline", "transformer": "PixArtAlphaPipeline"}
PIXART_MAX_SEQUENCE_LENGTH = 120  # PixArtAlphaPipeline's max_sequence_length default (T5 tokens per prompt)


class MissingPartError(ConfigError, FileNotFoundError):
    """A pipeline folder lacks a part's subfolder: a config error (model.pipeline) about a missing file."""


@dataclasses.dataclass
class PipelineParts:
    """What a pipeline folder gives a TextToImage, and the config with the pipeline's values filled in."""

    config: TextToImageConfig
    text_encoder: TextEncoder
    denoiser: nn.Module
    noise_scheduler: DDPMScheduler
    vae: AutoencoderKL
    latent_scale: float
    latent_shift: float


def pipeline_index(pipeline: str) -> dict:
    """``model_index.json`` of a folder or Hub id; a local folder without one is an error naming it."""
    folder = Path(pipeline)
    if folder.is_dir():
        index = folder / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(f"model.pipeline: {index} not found; expected a diffusers pipeline folder "
                                    "(model_index.json, unet/ or transformer/, text_encoder/, tokenizer/, vae/, "
                                    "scheduler/)")
        return json.loads(index.read_text(encoding="utf-8"))
    return diffusers.DiffusionPipeline.load_config(pipeline)


def _part_class(index: dict, part: str, library, pipeline: str):
    entry = index.get(part)
    if not isinstance(entry, (list, tuple)) or len(entry) != 2 or entry[1] is None:
        raise ConfigError(f"model.pipeline: {pipeline} has no '{part}' part (model_index.json: {entry!r})")
    cls = getattr(library, entry[1], None)
    if cls is None:
        raise ConfigError(f"model.pipeline: {pipeline}/{part} is a {entry[1]}, which {library.__name__} lacks")
    return cls


def _check_folder(pipeline: str, part: str) -> None:
    if Path(pipeline).is_dir() and not (Path(pipeline) / part).is_dir():
        raise MissingPartError(f"model.pipeline: {Path(pipeline) / part} not found (the pipeline's {part}); "
                               "add it to the folder or set the part's own key in the model config")


def load_pipeline_parts(config: TextToImageConfig) -> PipelineParts:
    """Build every part from ``config.pipeline`` (or the part's own key where set) and check that they fit."""
    pipeline = config.pipeline
    index = pipeline_index(pipeline)
    if "text_encoder_2" in index or "text_encoder_3" in index:
        raise ConfigError(f"model.pipeline: {pipeline} has several text encoders (SDXL / SD3 style); mmlm "
                          "fine-tunes pipelines with one text encoder")
    denoiser = _load_denoiser(config, index)
    pixart = not isinstance(denoiser, diffusers.UNet2DConditionModel)
    text_encoder = _load_text_encoder(config, index, pixart)
    vae = _load_vae(config, index)
    noise_scheduler = _load_noise_scheduler(config)
    check_parts_fit(pipeline, denoiser, text_encoder.hidden_size, vae)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    image_size = config.image_size or int(denoiser.config.sample_size) * factor
    if image_size % factor:
        raise ConfigError(f"model.image_size {image_size} is not divisible by the VAE's factor {factor}")
    resolved = dataclasses.replace(
        config, space="latent", image_size=image_size,
        prediction_type=noise_scheduler.config.prediction_type,
        beta_schedule=noise_scheduler.config.beta_schedule,
        num_train_timesteps=noise_scheduler.config.num_train_timesteps,
        text_encoder=text_encoder.config,
        denoiser=dataclasses.replace(config.denoiser, kind="transformer" if pixart else "unet"),
    )
    shift = getattr(vae.config, "shift_factor", None)
    return PipelineParts(resolved, text_encoder, denoiser, noise_scheduler, vae,
                         float(vae.config.scaling_factor), float(shift or 0.0))


def _load_denoiser(config: TextToImageConfig, index: dict) -> nn.Module:
    own = config.denoiser
    part = next((p for p in DENOISER_PARTS if p in index), None)
    if own.name_or_path:
        path, subfolder = own.name_or_path, own.subfolder
        cls = diffusers.UNet2DConditionModel if own.kind == "unet" else diffusers.PixArtTransformer2DModel
        if part is not None:
            cls = _part_class(index, part, diffusers, config.pipeline)
    else:
        if part is None:
            raise ConfigError(f"model.pipeline: {config.pipeline} has neither a 'unet' nor a 'transformer' part "
                              "(model_index.json); set model.denoiser.name_or_path")
        _check_folder(config.pipeline, part)
        path, subfolder, cls = config.pipeline, part, _part_class(index, part, diffusers, config.pipeline)
    return cls.from_pretrained(path, subfolder=subfolder)


def _load_text_encoder(config: TextToImageConfig, index: dict, pixart: bool) -> TextEncoder:
    """The pipeline's text encoder as its pipeline runs it: SD's without a mask, every padded position attended;
    PixArt's with the T5 mask (to the denoiser too), 120 tokens, lower-cased prompts."""
    own = config.text_encoder
    if own.kind == "pretrained" and own.name_or_path != config.pipeline:  # the config's own overrides the pipeline's
        encoder = TextEncoder.from_config(own)
        encoder.lowercase = pixart
    else:
        for part in ("text_encoder", "tokenizer"):
            _check_folder(config.pipeline, part)
        model_class = _part_class(index, "text_encoder", transformers, config.pipeline)
        tokenizer_class = _part_class(index, "tokenizer", transformers, config.pipeline)
        model = model_class.from_pretrained(config.pipeline, subfolder="text_encoder")
        tokenizer = tokenizer_class.from_pretrained(config.pipeline, subfolder="tokenizer")
        length = tokenizer.model_max_length if tokenizer.model_max_length < 100_000 else own.max_length
        if pixart:
            length = min(length, PIXART_MAX_SEQUENCE_LENGTH) if tokenizer.model_max_length < 100_000 \
                else PIXART_MAX_SEQUENCE_LENGTH
        train_it = own.freeze is False or (config.lora is not None and config.lora.text_encoder)
        te_config = dataclasses.replace(own, kind="pretrained", name_or_path=config.pipeline, max_length=length,
                                        attend_padding=not pixart, freeze=not train_it)
        encoder = TextEncoder(model, tokenizer, te_config, lowercase=pixart)
    return encoder


def _load_vae(config: TextToImageConfig, index: dict) -> AutoencoderKL:
    own = config.vae
    if own is not None and own.name_or_path:
        return AutoencoderKL.from_pretrained(own.name_or_path, subfolder=own.subfolder)
    _check_folder(config.pipeline, "vae")
    return _part_class(index, "vae", diffusers, config.pipeline).from_pretrained(config.pipeline, subfolder="vae")


def _load_noise_scheduler(config: TextToImageConfig) -> DDPMScheduler:
    """The pipeline's noise schedule as a DDPM training scheduler; ``prediction_type`` / ``beta_schedule`` override."""
    _check_folder(config.pipeline, "scheduler")
    scheduler_config = DDPMScheduler.load_config(config.pipeline, subfolder="scheduler")
    overrides = {key: getattr(config, key) for key in ("prediction_type", "beta_schedule")
                 if getattr(config, key) is not None}
    if overrides.get("beta_schedule") and overrides["beta_schedule"] != scheduler_config.get("beta_schedule"):
        scheduler_config.pop("trained_betas", None)  # an explicit schedule replaces the folder's betas
    return DDPMScheduler.from_config(scheduler_config, **overrides, clip_sample=False)


def check_parts_fit(pipeline: str, denoiser: nn.Module, text_width: int, vae: AutoencoderKL) -> None:
    """Cross-attention width vs text encoder width, and denoiser channels vs VAE latents, named with both numbers."""
    cfg = denoiser.config
    wanted = getattr(cfg, "caption_channels", None) or getattr(cfg, "cross_attention_dim", None)
    name = "caption_channels" if getattr(cfg, "caption_channels", None) else "cross_attention_dim"
    if wanted is not None and int(wanted) != int(text_width):
        raise ConfigError(f"model.pipeline {pipeline}: the denoiser's {name} is {wanted} but the text encoder's "
                          f"hidden size is {text_width}; they must match")
    latent = int(vae.config.latent_channels)
    if int(cfg.in_channels) != latent:
        raise ConfigError(f"model.pipeline {pipeline}: the denoiser takes {cfg.in_channels} input channels but "
                          f"the VAE's latents have {latent} (vae latent_channels); they must match")


# ------------------------------------------------------------------------------------------ PixArt's forward
def denoiser_extras(denoiser: nn.Module, batch: int, image_size: int, like: torch.Tensor) -> dict:
    """PixArt's resolution and aspect-ratio micro-conditions where the denoiser takes them (the 1024px models,
    sample size 128), with the values ``PixArtAlphaPipeline`` passes: the square image's pixel size, aspect 1."""
    if not getattr(denoiser, "use_additional_conditions", False):
        return {}
    resolution = torch.tensor([[image_size, image_size]], dtype=like.dtype, device=like.device).repeat(batch, 1)
    aspect_ratio = torch.ones(batch, 1, dtype=like.dtype, device=like.device)
    return {"added_cond_kwargs": {"resolution": resolution, "aspect_ratio": aspect_ratio}}


def without_learned_sigma(denoiser: nn.Module, output: torch.Tensor) -> torch.Tensor:
    """The prediction half of a learned-sigma denoiser's output (PixArt's: 8 channels for 4 latents), the half
    ``PixArtAlphaPipeline`` samples with and diffusers' PixArt training scripts train; other outputs as they are."""
    cfg = denoiser.config
    if getattr(cfg, "out_channels", None) == 2 * cfg.in_channels:
        return output.chunk(2, dim=1)[0]
    return output


# ------------------------------------------------------------------------------------------ saving
def save_diffusers_layout(model, path: Path) -> None:
    """Write ``model`` (a TextToImage from a pipeline) as a diffusers pipeline folder; see the module docstring."""
    from mmlm.models.diffusion import sampling

    part = "unet" if isinstance(model.denoiser, diffusers.UNet2DConditionModel) else "transformer"
    text_model, tokenizer = model.text_encoder.model, model.text_encoder.tokenizer
    sampler = sampling.make_sampler(model.noise_scheduler, model.config.scheduler)
    vae = model.vae
    vae.register_to_config(scaling_factor=float(model.latent_scale))
    save_part(model.denoiser, path / part, "diffusion_pytorch_model.safetensors")
    save_part(text_model, path / "text_encoder", "model.safetensors")
    tokenizer.save_pretrained(path / "tokenizer")
    vae.save_pretrained(path / "vae", safe_serialization=True)
    sampler.save_pretrained(path / "scheduler")
    index = {
        "_class_name": PIPELINE_CLASSES[part],
        "_diffusers_version": diffusers.__version__,
        part: [_library_of(model.denoiser), type(model.denoiser).__name__],
        "text_encoder": [_library_of(text_model), type(text_model).__name__],
        "tokenizer": [_library_of(tokenizer), type(tokenizer).__name__],
        "vae": ["diffusers", type(vae).__name__],
        "scheduler": ["diffusers", type(sampler).__name__],
    }
    if part == "unet":
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False,
                     image_encoder=[None, None])
    (path / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    if part == "unet":
        save_lora(model, path)
    else:
        save_peft_adapters(model, path)


def _library_of(obj) -> str:
    return type(obj).__module__.split(".")[0]


# ------------------------------------------------------------------------------------------ from-scratch models
CUSTOM_PIPELINE = "mmlm_pipeline"  # the file name (without .py) model_index.json names


def write_custom_pipeline(model, path: Path) -> None:
    """Make a from-scratch model's folder (denoiser/, text_encoder/, tokenizer/, scheduler/, vae/) a diffusers
    pipeline too: ``model_index.json`` naming ``mmlm_pipeline.py`` (a copy of pipeline.py, which imports no mmlm).

    Not for text encoders taken from a causal LM (their hidden-layer choice is mmlm's): those load with mmlm only.
    """
    import shutil

    from mmlm.models.diffusion import pipeline as pipeline_module

    if model.text_encoder.config.kind == "lm":
        return
    shutil.copyfile(pipeline_module.__file__, path / f"{CUSTOM_PIPELINE}.py")
    config, text_model, tokenizer = model.config, model.text_encoder.model, model.text_encoder.tokenizer
    index = {
        "_class_name": [CUSTOM_PIPELINE, "MmlmTextToImagePipeline"],
        "_diffusers_version": diffusers.__version__,
        "denoiser": ["diffusers", type(model.denoiser).__name__],
        "text_encoder": [_library_of(text_model), type(text_model).__name__],
        "tokenizer": [_library_of(tokenizer), type(tokenizer).__name__],
        "scheduler": ["diffusers", type(model.noise_scheduler).__name__],
        "vae": ["diffusers", type(model.vae).__name__] if model.vae is not None else [None, None],
        "space": config.space, "patch_size": config.patch_size, "latent_scale": float(model.latent_scale),
        "max_length": model.text_encoder.config.max_length, "sampler": config.scheduler,
        "num_inference_steps": config.num_inference_steps, "guidance_scale": config.guidance_scale,
    }
    (path / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
