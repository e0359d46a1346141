"""``MmlmProcessor``: images + prompts -> ``input_ids`` / ``attention_mask`` / ``pixel_values``, as the VLM builds them.

The image side runs the very transform ``VisionEncoder.image_transform`` builds (same timm data config, resize
mode and crop), the text side the prompt ``vlm.caption`` continues (``mmlm.models.rendering``): the plain layout
``[start] prompt`` with each ``<image>`` expanded to the image's placeholder ids (the image goes right after
``start`` when the prompt has no marker), or, for a model whose captions render in a chat template, the user
turn ``apply_chat_template(..., add_generation_prompt=True)`` gives; tokenised as one text by
:func:`mmlm.models.sequence.encode_segments`, left-padded for generation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import AutoConfig, AutoTokenizer, BatchFeature, ProcessorMixin
from transformers.image_processing_base import ImageProcessingMixin

from mmlm.config import from_dict
from mmlm.images import load_image
from mmlm.models import chat
from mmlm.models.language import IMAGE_TOKEN, tokens_to_tensor
from mmlm.models.rendering import caption_messages, tokenizer_caption_template
from mmlm.models.sequence import Segment, check_prompt, encode_segments
from mmlm.models.vision import VisionConfig, VisionEncoder
from mmlm.models.vlm_files import LANGUAGE_DIR


class _TransformSpec:
    """What ``VisionEncoder.image_transform`` reads (its config and timm data config), without the backbone."""

    image_transform = VisionEncoder.image_transform
    _whole_image = VisionEncoder._whole_image
    _resolve_data_config = VisionEncoder._resolve_data_config

    def __init__(self, config: VisionConfig, data_config: dict[str, Any]):
        self.config, self.data_config = config, data_config


class MmlmImageProcessor(ImageProcessingMixin):
    """PIL images (or paths, bytes, arrays; decoded safely) -> ``pixel_values`` with the VLM's eval transform."""

    model_input_names = ["pixel_values"]

    def __init__(self, vision: dict | None = None, data_config: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self.vision = dict(vision or {})
        self.data_config = {k: list(v) if isinstance(v, tuple) else v for k, v in (data_config or {}).items()}
        config = from_dict(VisionConfig, {**self.vision, "pretrained": False, "weights_path": None}, "vision")
        spec_config = {k: tuple(v) if isinstance(v, list) else v for k, v in self.data_config.items()}
        self._transform = _TransformSpec(config, spec_config).image_transform(train=False)

    def __call__(self, images, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        images = images if isinstance(images, (list, tuple)) else [images]
        pixels = torch.stack([self._transform(load_image(image)) for image in images])
        return BatchFeature({"pixel_values": pixels}, tensor_type=return_tensors)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("_transform", None)
        return out


class MmlmProcessor(ProcessorMixin):
    """Image processor + tokenizer of an mmlm VLM folder (``AutoProcessor.from_pretrained(folder)``)."""

    def __init__(self, image_processor, tokenizer, num_image_tokens: int = 0, chat_template: str | None = None,
                 default_prompt: str = "", caption_chat_template: str = "auto"):
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.num_image_tokens, self.default_prompt = num_image_tokens, default_prompt
        self.caption_chat_template = caption_chat_template  # the model's ``model.chat_template`` setting
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.start_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "MmlmProcessor":
        """The processor of a folder saved by ``VisionLanguageModel.save_pretrained`` (or a Hub id holding one)."""
        from mmlm.hf.modeling import resolve_folder

        folder = resolve_folder(pretrained_model_name_or_path, **kwargs)
        meta = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        vision = meta["config"]["vision"]
        trust = bool(meta["config"].get("language", {}).get("trust_remote_code", False))
        lm_config = AutoConfig.from_pretrained(folder / LANGUAGE_DIR, trust_remote_code=trust)  # not mmlm's config.json
        tokenizer = AutoTokenizer.from_pretrained(folder, config=lm_config, trust_remote_code=trust)
        data_config, num_image_tokens = meta.get("data_config"), meta.get("num_image_tokens")
        if data_config is None or num_image_tokens is None:  # a folder saved before these keys existed
            data_config, num_image_tokens = probe_image_side(folder, meta["config"])
        return cls(MmlmImageProcessor(vision, data_config), tokenizer, num_image_tokens,
                   chat_template=getattr(tokenizer, "chat_template", None),
                   default_prompt=meta["config"].get("prompt", ""),
                   caption_chat_template=meta["config"].get("chat_template", "auto"))

    def prompt_ids(self, prompt: str, with_image: bool) -> list[int]:
        check_prompt(prompt, "text")
        if not with_image and IMAGE_TOKEN in prompt:
            raise ValueError(f"text: '{IMAGE_TOKEN}' given but there are no images: {prompt!r}")
        if with_image and tokenizer_caption_template(self.tokenizer, self.caption_chat_template) is not None:
            return chat.prompt_ids(self.tokenizer, caption_messages(prompt), 1, self.caption_chat_template,
                                   image_token_id=self.image_token_id,
                                   num_image_tokens=self.num_image_tokens)  # the template writes its BOS
        encoded = encode_segments(self.tokenizer, [Segment(prompt)] if prompt else [],
                                  image_token_id=self.image_token_id,
                                  num_image_tokens=self.num_image_tokens if with_image else 0,
                                  start_token_id=self.start_token_id,
                                  image_first=with_image and IMAGE_TOKEN not in prompt)
        return encoded.input_ids

    def __call__(self, images=None, text: str | Sequence[str] | None = None, return_tensors: str | None = "pt",
                 **kwargs) -> BatchFeature:
        """One prompt for all images or one per image; ``text=None`` is the model's default prompt (``model.prompt``),
        as in ``vlm.caption(images)``."""
        n_images = 0 if images is None else (len(images) if isinstance(images, (list, tuple)) else 1)
        texts = [text] if isinstance(text, str) or text is None else list(text)
        if n_images and len(texts) == 1:
            texts = texts * n_images
        if n_images and len(texts) != n_images:
            raise ValueError(f"text: {len(texts)} prompts for {n_images} images; give one or one per image")
        rows = [self.prompt_ids(self.default_prompt if t is None else t, with_image=n_images > 0) for t in texts]
        input_ids, attention_mask = tokens_to_tensor(rows, self.tokenizer.pad_token_id, left=True)
        data = {"input_ids": input_ids, "attention_mask": attention_mask}
        if n_images:
            data.update(self.image_processor(images, return_tensors=None))
        return BatchFeature(data, tensor_type=return_tensors)

    def batch_decode(self, sequences, **kwargs) -> list[str]:
        """Texts of the generated ids, as ``vlm.caption`` returns them (the one space an answer starts with after
        a prompt is dropped)."""
        return [strip_answer_space(text) for text in self.tokenizer.batch_decode(sequences, **kwargs)]

    def decode(self, ids, **kwargs) -> str:
        return strip_answer_space(self.tokenizer.decode(ids, **kwargs))


def strip_answer_space(text: str) -> str:
    """mmlm trains an answer after a prompt with a leading space (``sequence.join_answer``); captions drop it."""
    return text[1:] if text.startswith(" ") else text


def probe_image_side(folder: Path, config: dict) -> tuple[dict, int]:
    """Data config and image-token count of an older folder, by building its (untrained) tower and projector."""
    from mmlm.models.projector import ProjectorConfig, build_projector

    vision = VisionEncoder(from_dict(VisionConfig, {**config["vision"], "pretrained": False, "weights_path": None}))
    lm_config = AutoConfig.from_pretrained(folder / LANGUAGE_DIR)
    projector = from_dict(ProjectorConfig, config.get("projector", {}), "projector")
    _, n = build_projector(projector, vision.dim, lm_config.get_text_config().hidden_size, vision.num_tokens)
    return dict(vision.data_config), n
