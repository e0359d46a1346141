"""Tiny VLMs for the Hugging Face integration tests (real timm / transformers classes, random init, no downloads)."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw

from mmlm.models import LanguageConfig, ProjectorConfig, VisionConfig, VisionLanguageModel, VLMConfig

CORPUS = ["a red circle", "a blue square", "a green triangle", "a small yellow star on the left"]
TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 2, "tie_word_embeddings": False}
VIT = {"name": "vit_tiny_patch16_224", "image_size": 32, "kwargs": {"patch_size": 8, "depth": 3}}


def images() -> list[Image.Image]:
    """Three square images and a non-square one (the resize mode matters for it)."""
    out = []
    for colour, size in (("red", (32, 32)), ("blue", (48, 48)), ("green", (32, 32)), ("purple", (40, 24))):
        image = Image.new("RGB", size, "white")
        ImageDraw.Draw(image).ellipse((4, 4, size[0] - 6, size[1] - 8), fill=colour)
        out.append(image)
    return out


def tiny_vlm(seed: int = 0, *, vision: dict | None = None, projector: str = "mlp", prompt: str = "",
             **projector_kwargs) -> VisionLanguageModel:
    torch.manual_seed(seed)
    config = VLMConfig(vision=VisionConfig(**(vision or VIT)), projector=ProjectorConfig(type=projector,
                                                                                          **projector_kwargs),
                       language=LanguageConfig(config=dict(TINY_LLAMA), vocab_size=300), prompt=prompt)
    model = VisionLanguageModel.from_config(config, CORPUS)
    with torch.no_grad():  # larger logits than the init's, so greedy decoding is not a coin toss between ties
        model.language_model.get_output_embeddings().weight.mul_(20)
    return model.eval()
