"""Text-to-image diffusion, laid out as diffusers does: configs, model, sampling (schedulers and the CFG loop)
and the parts (text encoder, autoencoder) apart."""

from mmlm.models.diffusion.autoencoder import build_autoencoder, train_autoencoder
from mmlm.models.diffusion.config import AutoencoderConfig, DenoiserConfig, TextEncoderConfig, TextToImageConfig
from mmlm.models.diffusion.model import TextToImage, build_denoiser, pooled_text
from mmlm.models.diffusion.sampling import SAMPLERS, to_pil
from mmlm.models.diffusion.text_encoder import SCRATCH_TOKENIZER, TextEncoder

__all__ = [
    "AutoencoderConfig", "DenoiserConfig", "SAMPLERS", "SCRATCH_TOKENIZER", "TextEncoder", "TextEncoderConfig",
    "TextToImage", "TextToImageConfig", "build_autoencoder", "build_denoiser", "pooled_text", "to_pil",
    "train_autoencoder",
]
