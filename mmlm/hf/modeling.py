"""The VisionLanguageModel as a transformers model: ``MmlmVLMConfig`` + ``MmlmVLMForConditionalGeneration``.

The wrapper holds the VLM's own modules (``vision``, ``projector``, ``language_model``) under the same names,
so its state dict is the one ``VisionLanguageModel.save_pretrained`` writes and one folder serves both
loaders. ``forward`` embeds the image placeholders exactly as ``VisionLanguageModel.embed`` does; transformers'
``generate`` then drives the LM (pixel values go to the prefill only, positions come from the attention mask).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, GenerationConfig, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from mmlm.models.hub import ARCHITECTURE, MODEL_TYPE


class MmlmVLMConfig(PreTrainedConfig):
    """The ``config.json`` of an mmlm VLM folder: ``{"model_type": "mmlm_vlm", "model_class": ..., "config": {...}}``.

    ``config`` is mmlm's own ``VLMConfig`` as a dict; ``text_config`` (the causal LM's config, from
    ``language/config.json``) is attached when the model is loaded.
    """

    model_type = MODEL_TYPE
    sub_configs = {"text_config": AutoConfig}

    def __init__(self, config: dict | None = None, model_class: str = "VisionLanguageModel",
                 text_config: PreTrainedConfig | dict | None = None, **kwargs):
        self.config = dict(config or {})
        self.model_class = model_class
        if isinstance(text_config, dict):
            text_config = AutoConfig.for_model(**text_config)
        self.text_config = text_config
        super().__init__(**kwargs)

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        return self.text_config if self.text_config is not None else self


def _is_local(path: str | Path) -> bool:
    return Path(path).is_dir()


def resolve_folder(name_or_path: str | Path, **hub_kwargs) -> Path:
    """A local folder as is; a Hub id downloaded (``huggingface_hub.snapshot_download``) to a local folder."""
    if _is_local(name_or_path):
        return Path(name_or_path)
    from huggingface_hub import snapshot_download

    allowed = {k: v for k, v in hub_kwargs.items() if k in ("revision", "cache_dir", "token", "local_files_only")}
    return Path(snapshot_download(str(name_or_path), **allowed))


class MmlmVLMForConditionalGeneration(PreTrainedModel, GenerationMixin):
    """transformers face of a :class:`~mmlm.models.vlm.VisionLanguageModel` (same modules, same weights)."""

    config_class = MmlmVLMConfig
    base_model_prefix = "mmlm"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    _supports_sdpa = True
    _supports_attention_backend = True

    def __init__(self, config: MmlmVLMConfig, vlm=None):
        if vlm is None:
            raise ValueError("MmlmVLMForConditionalGeneration needs a trained tokenizer and weights: load it with "
                             "from_pretrained(folder) or wrap a model with from_vlm(model)")
        if config.text_config is None:
            config.text_config = vlm.language_model.config
        super().__init__(config)
        self.vision, self.projector, self.language_model = vlm.vision, vlm.projector, vlm.language_model
        object.__setattr__(self, "vlm", vlm)  # not a submodule: its parameters are the three above
        lm_generation = getattr(vlm.language_model, "generation_config", None)
        self.generation_config = copy.deepcopy(lm_generation) if lm_generation is not None else GenerationConfig()
        self.generation_config.update(eos_token_id=vlm.eos_token_id, pad_token_id=vlm.pad_token_id)

    def _init_weights(self, module):  # every weight comes from the VLM
        pass

    @classmethod
    def from_vlm(cls, vlm) -> "MmlmVLMForConditionalGeneration":
        """Wrap an in-memory VisionLanguageModel (shares its modules)."""
        from mmlm.models.vlm import VisionLanguageModel  # noqa: F401  (type only)
        from mmlm.config import to_dict

        config = MmlmVLMConfig(config=to_dict(vlm.config), model_class=type(vlm).__name__,
                               architectures=[ARCHITECTURE])
        return cls(config, vlm)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, device_map=None, dtype=None,
                        **kwargs) -> "MmlmVLMForConditionalGeneration":
        """A folder saved by ``VisionLanguageModel.save_pretrained`` (any version: ``model_type`` not needed) or a
        Hub id holding one."""
        from mmlm.models.vlm import VisionLanguageModel

        folder = resolve_folder(pretrained_model_name_or_path, **kwargs)
        vlm = VisionLanguageModel.from_pretrained(folder)
        if config is None or not isinstance(config, MmlmVLMConfig):
            data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            data.pop("model_type", None)
            config = MmlmVLMConfig(**data)
        model = cls(config, vlm).eval()
        if dtype not in (None, "auto"):
            model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        if device_map not in (None, "auto") and isinstance(device_map, (str, torch.device)):
            model = model.to(device_map)
        return model

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """mmlm's folder layout (``push_to_hub`` saves through this too); extra transformers options are ignored."""
        self.vlm.save_pretrained(save_directory)

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def forward(self, input_ids: torch.LongTensor | None = None, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.LongTensor | None = None,
                cache: Any = None, inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs) -> CausalLMOutputWithPast:
        from mmlm.models.sequence import positions_from_mask

        if inputs_embeds is None:
            inputs_embeds = self.vlm.embed(input_ids, pixel_values)
        if position_ids is None and attention_mask is not None and attention_mask.ndim == 2:
            position_ids = positions_from_mask(attention_mask)[:, -inputs_embeds.shape[1]:]
        lm_kwargs = {self.vlm._cache_arg: cache} if cache is not None else {}
        if "past_key_values" in kwargs:  # older callers' name for the cache
            lm_kwargs[self.vlm._cache_arg] = kwargs.pop("past_key_values")
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  position_ids=position_ids, use_cache=use_cache, logits_to_keep=logits_to_keep,
                                  **lm_kwargs, **kwargs)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(),
                                                     labels[:, 1:].flatten(), ignore_index=-100)
        from mmlm.models.language import output_cache

        return CausalLMOutputWithPast(loss=loss, logits=out.logits, cache=output_cache(out))
