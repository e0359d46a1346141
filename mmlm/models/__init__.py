"""Models: the vision-language model and its parts."""

from mmlm.models.language import LanguageConfig, train_tokenizer
from mmlm.models.projector import ProjectorConfig, build_projector
from mmlm.models.vision import VisionConfig, VisionEncoder
from mmlm.models.vlm import VisionLanguageModel, VLMConfig, VLMOutput

__all__ = [
    "LanguageConfig", "ProjectorConfig", "VisionConfig", "VLMConfig", "VLMOutput", "VisionEncoder",
    "VisionLanguageModel", "build_projector", "train_tokenizer",
]
