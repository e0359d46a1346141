"""Typed configs of the text-to-image model and its parts; round-trip through mmlm.config.from_dict / to_dict.

Plain dataclasses with validation only (no torch, transformers or diffusers import), so a recipe can be
checked without building anything.
"""

from __future__ import annotations

import dataclasses
import math

from mmlm.config import ConfigError

SAMPLER_NAMES = ("ddpm", "ddim", "dpm++")  # the classes are in sampling.SAMPLERS
FLOW_SAMPLER_NAMES = ("euler", "heun", "dpm++")  # a flow model's (flow.FLOW_SAMPLERS); dpm++ with flow sigmas
OBJECTIVES = ("diffusion", "flow")
SPACES = ("pixel", "patch", "latent")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TEXT_ENCODER_KINDS = ("scratch", "pretrained", "lm")
CROPS = ("squash", "center", "random")
# Without a pipeline these keys take their from-scratch defaults; with one, the pipeline's folder decides.
SCRATCH_DEFAULTS = dict(space="patch", image_size=32, prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2")


@dataclasses.dataclass
class TextEncoderConfig:
    """Which text encoder conditions the denoiser, and how big the from-scratch one is."""

    kind: str = "scratch"  # scratch | pretrained | lm
    name_or_path: str | None = None  # Hub id or folder for "pretrained" / "lm"
    freeze: bool | None = None  # None: train "scratch", freeze "pretrained" and "lm"
    max_length: int = 16  # tokens per caption, padded/truncated
    hidden_layer: int = -1  # which hidden state of an "lm" to use (-1: last, 0: its input embeddings)
    trust_remote_code: bool = False  # run a checkpoint's own Python code (only for checkpoints you trust)
    # "scratch" only:
    vocab_size: int = 512  # BPE vocabulary trained on the corpus (the 256 bytes always included)
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    cache_size: int = 65536  # cached caption embeddings when frozen (cleared when full)
    # Like diffusers' Stable Diffusion pipelines: the text model runs without an attention mask (unless its config
    # says use_attention_mask) and the denoiser attends over every padded position. Set for pipelines (model.pipeline).
    attend_padding: bool = False

    def __post_init__(self):
        if self.kind not in TEXT_ENCODER_KINDS:
            raise ConfigError(f"text_encoder.kind: expected one of {TEXT_ENCODER_KINDS}, got {self.kind!r}")
        # "lm" may come as live objects (TextEncoder.from_language_model), so only "pretrained" needs a path here.
        if self.kind == "pretrained" and not self.name_or_path:
            raise ConfigError("text_encoder.name_or_path: required when kind is 'pretrained'")
        if self.max_length < 2:
            raise ConfigError(f"text_encoder.max_length: expected >= 2, got {self.max_length}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"text_encoder.hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})"
            )

    @property
    def frozen(self) -> bool:
        return self.freeze if self.freeze is not None else self.kind != "scratch"


@dataclasses.dataclass
class AlignConfig:
    """Representation alignment (REPA): one of the denoiser's hidden maps, through a small MLP, is pulled
    towards a frozen image encoder's tokens of the clean training image (``alignment.py``).

    ``encoder``: an mmlm VLM folder (or its run folder), whose vision tower is used (the demo's captioner);
    or ``vision``: a timm tower as ``model.vision`` takes it (e.g. a pretrained DINOv2 ViT with
    ``feature_layer``). Exactly one of the two.
    """

    encoder: str | None = None
    vision: dict | None = None  # a mmlm.models.vision.VisionConfig as a dict; frozen whatever it says
    layer: str = "mid_block"  # the denoiser submodule whose output is aligned (diffusers names)
    weight: float = 0.5  # loss = diffusion loss + weight x (1 - cosine similarity), REPA's lambda
    projector_dim: int = 256  # hidden width of the 3-layer MLP (SiLU), dropped after training
    # Encoder tokens kept per training image (fp16, CPU; cleared when full): an epoch after the first costs no
    # encoder call. 0: off. Worth it for a fixed, unaugmented training set on CPU (20,000 32x32 shapes ~ 330 MB).
    cache_size: int = 0
    # Align for the first this-many training samples (all processes together), then train on the diffusion loss
    # alone at the recipe's step cost; the count is in the state dict, so a resumed run keeps it. None: throughout.
    until_samples: int | None = None

    def __post_init__(self):
        if (self.encoder is None) == (self.vision is None):
            raise ConfigError("model.align: set encoder (a VLM folder) or vision (a timm tower), exactly one")
        if not self.weight > 0:
            raise ConfigError(f"model.align.weight: expected > 0, got {self.weight}")
        if self.projector_dim < 1:
            raise ConfigError(f"model.align.projector_dim: expected >= 1, got {self.projector_dim}")
        if self.until_samples is not None and self.until_samples < 1:
            raise ConfigError(f"model.align.until_samples: expected >= 1 or null, got {self.until_samples}")
        if self.cache_size < 0:
            raise ConfigError(f"model.align.cache_size: expected >= 0 (0: off), got {self.cache_size}")


@dataclasses.dataclass
class AutoencoderConfig:
    """A pretrained VAE (``name_or_path``) or the size and training budget of a tiny one."""

    name_or_path: str | None = None  # Hub id or folder with an AutoencoderKL (config.json + weights)
    subfolder: str | None = None  # e.g. "vae" inside a whole-pipeline folder
    block_out_channels: tuple[int, ...] = (32, 64)  # each extra level halves the resolution
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 8
    mid_block_attention: bool = False  # attention costs a lot on CPU and buys little at these sizes
    kl_weight: float = 1e-6
    # Training budget of the pre-stage (TextToImage.fit_autoencoder); whichever ends first.
    train_steps: int = 1500
    train_minutes: float | None = None
    batch_size: int = 32
    lr: float = 2e-3

    def __post_init__(self):
        if not self.block_out_channels:
            raise ConfigError("vae.block_out_channels: expected at least one level")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ConfigError(
                f"vae.block_out_channels: {bad} not divisible by vae.norm_num_groups={self.norm_num_groups}"
            )
        if self.train_steps < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("vae.train_steps must be >= 0, vae.batch_size >= 1 and vae.lr > 0")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


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
    # unet: how each ResNet block takes the timestep (+ pooled text) embedding: "default" adds it, "scale_shift"
    # scales and shifts the normalised features with it (AdaGN / FiLM, Dhariwal & Nichol 2021)
    resnet_time_scale_shift: str = "default"
    hidden_size: int = 128  # transformer width
    num_layers: int = 4  # transformer blocks
    patch_size: int = 2
    # A pretrained UNet2DConditionModel / DiT folder or Hub id (with ``subfolder``): overrides model.pipeline's.
    name_or_path: str | None = None
    subfolder: str | None = None

    def __post_init__(self):
        if self.kind not in ("unet", "transformer"):
            raise ConfigError(f"denoiser.kind: expected 'unet' or 'transformer', got {self.kind!r}")
        if self.num_heads < 1:
            raise ConfigError(f"denoiser.num_heads: expected >= 1, got {self.num_heads}")
        if self.resnet_time_scale_shift not in ("default", "scale_shift"):
            raise ConfigError("denoiser.resnet_time_scale_shift: expected 'default' or 'scale_shift', "
                              f"got {self.resnet_time_scale_shift!r}")
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
                raise ConfigError(
                    "denoiser.pooled_text: supported by kind 'unet' only; leave it null for 'transformer'"
                )

    @property
    def uses_pooled_text(self) -> bool:
        return self.kind == "unet" and self.pooled_text is not False


@dataclasses.dataclass
class FlowConfig:
    """Rectified flow's time distribution (SD3, Esser et al. 2024): ``t = sigmoid(N(logit_mean, logit_std))``,
    then shifted ``shift t / (1 + (shift - 1) t)`` in training and sampling alike (> 1: more noise)."""

    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0

    def __post_init__(self):
        if not math.isfinite(self.logit_mean):
            raise ConfigError(f"model.flow.logit_mean: expected a finite number, got {self.logit_mean}")
        if not (math.isfinite(self.logit_std) and self.logit_std > 0):
            raise ConfigError(f"model.flow.logit_std: expected a finite number > 0, got {self.logit_std}")
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise ConfigError(f"model.flow.shift: expected a finite number > 0, got {self.shift}")


@dataclasses.dataclass
class LoraConfig:
    """LoRA adapters (peft) on the denoiser's attention, optionally the text encoder's. Saved in diffusers' LoRA
    format where the pipeline loads one (``pipe.load_lora_weights``: Stable Diffusion), else in peft's own
    (PixArt: ``PeftModel.from_pretrained(pipe.transformer, folder / "transformer_lora")``).

    Everything else is frozen; ``alpha`` defaults to ``rank`` (scale 1), as diffusers' LoRA training script does.
    """

    rank: int = 4
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0")
    text_encoder: bool = False  # also LoRA on the text encoder (else it stays as text_encoder.freeze says)
    text_encoder_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")

    def __post_init__(self):
        if self.rank < 1:
            raise ConfigError(f"model.lora.rank: expected >= 1, got {self.rank}")
        if not self.target_modules:
            raise ConfigError("model.lora.target_modules: expected at least one module name")

    @property
    def scale_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)


@dataclasses.dataclass
class TextToImageConfig:
    """A text-to-image model: round-trips through mmlm.config.from_dict / to_dict.

    ``training_loss`` takes pixel values in [-1, 1] (what ``image_transform`` produces).

    ``pipeline``: a diffusers pipeline folder or Hub id (model_index.json, unet/ or transformer/, text_encoder/,
    tokenizer/, vae/, scheduler/) to fine-tune; its parts, resolution, latent scaling and noise schedule are used
    unless ``denoiser.name_or_path`` / ``text_encoder`` (kind pretrained) / ``vae.name_or_path`` /
    ``prediction_type`` / ``beta_schedule`` / ``image_size`` are set. Left null, ``space``, ``image_size``,
    ``prediction_type`` and ``beta_schedule`` take the from-scratch defaults of ``SCRATCH_DEFAULTS``.

    ``objective``: ``diffusion`` (DDPM schedule, epsilon or v, min-SNR) or ``flow`` (rectified flow, ``flow.py``:
    ``x_t = (1 - t) x0 + t noise``, target ``noise - x0``, times from ``model.flow``; from scratch only, and
    ``prediction_type``, ``snr_gamma`` and ``beta_schedule`` do not apply). ``scheduler`` defaults to ``dpm++``
    for diffusion and ``euler`` for flow.
    """

    pipeline: str | None = None
    image_size: int | None = None  # 32 from scratch; a pipeline's own resolution (denoiser sample size x VAE factor)
    # Patch by default: exact pixel-space diffusion (no VAE pre-stage, nothing lost) with the denoiser
    # running at image_size / patch_size; a tiny self-trained 2x VAE came out washed out, and a UNet at
    # the full 32x32 learned far slower per CPU-second (benchmarks/diffusion_recipe_search.py).
    space: str | None = None  # pixel | patch | latent; patch from scratch, latent with a pipeline
    patch_size: int = 2  # patch space only: pixel_unshuffle factor (32x32x3 -> 16x16x12)
    denoiser: DenoiserConfig = dataclasses.field(default_factory=DenoiserConfig)
    text_encoder: TextEncoderConfig = dataclasses.field(default_factory=TextEncoderConfig)
    vae: AutoencoderConfig | None = dataclasses.field(default_factory=AutoencoderConfig)  # latent space only
    objective: str = "diffusion"  # diffusion | flow
    flow: FlowConfig | None = None  # objective flow only; its defaults when left null
    prediction_type: str | None = None  # epsilon | v_prediction; v from scratch, the pipeline scheduler's otherwise
    snr_gamma: float | None = 5.0  # min-SNR loss weighting; None = plain MSE
    caption_dropout: float = 0.1  # p(caption -> "") in training, for classifier-free guidance
    noise_offset: float = 0.0  # adds noise_offset x N(0, 1) per image and channel to the noise (brighter/darker images)
    num_train_timesteps: int = 1000
    beta_schedule: str | None = None  # any DDPMScheduler beta_schedule; squaredcos_cap_v2 from scratch
    # Shifts the schedule's log-SNR by -2 log(noise_shift) (Simple Diffusion, Hoogeboom et al. 2023): more noise,
    # so that more steps decide the global layout; 2 gives a 32x32 image the noise levels a 16x16 one sees.
    noise_shift: float = 1.0
    scheduler: str | None = None  # default sampler: ddpm | ddim | dpm++ (diffusion), euler | heun | dpm++ (flow)
    num_inference_steps: int = 20
    guidance_scale: float = 2.0
    random_flip: bool = False  # train-time horizontal flip (off: captions may say left/right)
    crop: str = "squash"  # squash (resize both sides) | center | random (resize the short side, then crop)
    lora: LoraConfig | None = None  # LoRA fine-tuning instead of full
    align: AlignConfig | None = None  # representation alignment while training (REPA); None: off

    def __post_init__(self):
        if self.pipeline is None:
            for key, value in SCRATCH_DEFAULTS.items():
                if getattr(self, key) is None:
                    setattr(self, key, value)
        elif self.space not in (None, "latent"):
            raise ConfigError(f"model.space: a pipeline (model.pipeline) works in latent space, got {self.space!r}")
        if self.crop not in CROPS:
            raise ConfigError(f"model.crop: expected one of {CROPS}, got {self.crop!r}")
        if self.noise_offset < 0:
            raise ConfigError(f"model.noise_offset: expected >= 0, got {self.noise_offset}")
        if self.lora is not None and self.pipeline is None and self.denoiser.name_or_path is None:
            raise ConfigError("model.lora: LoRA fine-tunes a pretrained denoiser; set model.pipeline "
                              "(or denoiser.name_or_path)")
        if self.space is not None and self.space not in SPACES:
            raise ConfigError(f"model.space: expected one of {SPACES}, got {self.space!r}")
        # image_size None: a pipeline's, filled in when the model is built
        if self.space == "patch" and (self.patch_size < 1 or self.image_size % self.patch_size):
            raise ConfigError(
                f"model.patch_size: expected a divisor of image_size ({self.image_size}) >= 1, got {self.patch_size}"
            )
        if self.space == "latent" and self.vae is None and self.pipeline is None:
            raise ConfigError("model.vae: required when space is 'latent'")
        if self.prediction_type is not None and self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(
                f"model.prediction_type: expected one of {PREDICTION_TYPES}, got {self.prediction_type!r}"
            )
        self._check_objective()
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"model.caption_dropout: expected 0 <= p < 1, got {self.caption_dropout}")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ConfigError(f"model.snr_gamma: expected > 0 or null, got {self.snr_gamma}")
        if not self.noise_shift > 0:
            raise ConfigError(f"model.noise_shift: expected > 0, got {self.noise_shift}")
        if self.image_size is not None and self.image_size < 8:
            raise ConfigError(f"model.image_size: expected >= 8, got {self.image_size}")

    def _check_objective(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"model.objective: expected one of {OBJECTIVES}, got {self.objective!r}")
        flow = self.objective == "flow"
        if self.scheduler is None:
            self.scheduler = "euler" if flow else "dpm++"
        names = FLOW_SAMPLER_NAMES if flow else SAMPLER_NAMES
        if self.scheduler not in names:
            raise ConfigError(f"model.scheduler: expected one of {list(names)} for objective {self.objective!r}, "
                              f"got {self.scheduler!r}")
        if not flow:
            if self.flow is not None:
                raise ConfigError("model.flow: set only with model.objective: flow (the objective is 'diffusion')")
            return
        if self.flow is None:
            self.flow = FlowConfig()
        if self.pipeline is not None:
            raise ConfigError("model.objective: flow trains from-scratch generators only; a pipeline "
                              f"(model.pipeline={self.pipeline!r}) keeps its own noise schedule and objective")
        if self.noise_shift != 1.0:
            raise ConfigError(f"model.noise_shift: a DDPM-schedule shift; a flow model shifts its times with "
                              f"model.flow.shift (got noise_shift {self.noise_shift})")
