"""Models: the vision-language model, the text-to-image model, and their parts."""

from mmlm.models.autoencoder import AutoencoderConfig
from mmlm.models.diffusion import DenoiserConfig, TextToImage, TextToImageConfig
from mmlm.models.language import LanguageConfig, train_tokenizer
from mmlm.models.projector import ProjectorConfig, build_projector
from mmlm.models.text_encoder import TextEncoder, TextEncoderConfig
from mmlm.models.vision import VisionConfig, VisionEncoder
from mmlm.models.vlm import VisionLanguageModel, VLMConfig, VLMOutput

__all__ = [
    "AutoencoderConfig", "DenoiserConfig", "TextEncoder", "TextEncoderConfig", "TextToImage", "TextToImageConfig",
    "LanguageConfig", "ProjectorConfig", "VisionConfig", "VLMConfig", "VLMOutput", "VisionEncoder",
    "VisionLanguageModel", "build_projector", "train_tokenizer",
]
