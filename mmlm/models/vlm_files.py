"""The VisionLanguageModel's folder on disk: write it, read it, and start a new run from it.

A folder holds ``config.json`` (model class + ``VLMConfig``), ``model.safetensors`` (LoRA merged into
the tower and projector; into the LM unless ``language.lora_merge_on_save`` is false), the tokenizer
files and ``language/config.json`` (the LM's transformers config). No pickles.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import save_model
from torch import nn
from transformers import AutoConfig, AutoTokenizer

from mmlm.config import ConfigError, from_dict, to_dict
from mmlm.models.adapters import AdapterConfig, has_lora, merged_copy
from mmlm.models.language import base_causal_lm, is_lora

if TYPE_CHECKING:  # pragma: no cover
    from mmlm.models.vlm import VisionLanguageModel, VLMConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LANGUAGE_DIR = "language"


def read_saved(path: Path) -> tuple[VLMConfig, Any, Any]:
    """(config, tokenizer, LM config) of a folder written by ``save``."""
    from mmlm.models.vlm import VLMConfig

    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: not found; expected a folder written by save_pretrained")
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
        config = from_dict(VLMConfig, data["config"], "config")
    except (json.JSONDecodeError, KeyError) as err:
        raise ConfigError(f"{config_file}: not a VisionLanguageModel config ({err})") from err
    trust = config.language.trust_remote_code
    lm_config = AutoConfig.from_pretrained(path / LANGUAGE_DIR, trust_remote_code=trust)
    # config=: else AutoTokenizer reads the folder's own config.json (mmlm's) and warns of a model-type mismatch
    tokenizer = AutoTokenizer.from_pretrained(path, config=lm_config, trust_remote_code=trust)
    return config, tokenizer, lm_config


def plain_parts(model: VisionLanguageModel, merge_lm: bool) -> nn.Module:
    """A module with the model's attribute names whose tower and projector have their LoRA merged
    (and the LM's, when ``merge_lm``): what the weights file holds."""
    container = nn.Module()
    container.vision = merged_copy(model.vision) if has_lora(model.vision) else model.vision
    container.projector = merged_copy(model.projector) if has_lora(model.projector) else model.projector
    lm = model.language_model
    container.language_model = copy.deepcopy(lm).merge_and_unload() if is_lora(lm) and merge_lm else lm
    return container


def save(model: VisionLanguageModel, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    config = model.config
    language = config.language
    merge_lm = is_lora(model.language_model) and language.lora_merge_on_save
    if merge_lm:
        language = dataclasses.replace(language, lora_rank=0)
    saved = dataclasses.replace(
        config, language=language, init_from=None, vision_lora=AdapterConfig(), projector_lora=AdapterConfig(),
        vision=dataclasses.replace(config.vision, pretrained=False, weights_path=None),
    )
    container = plain_parts(model, merge_lm)
    save_model(container, str(path / WEIGHTS_NAME))
    from mmlm.models.hub import transformers_keys  # model_type, architectures, image side (issue 16)
    from mmlm.model_card import write_model_card

    meta = {"model_class": type(model).__name__, "config": to_dict(saved), **transformers_keys(model)}
    (path / CONFIG_NAME).write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
    base_causal_lm(container.language_model).config.save_pretrained(path / LANGUAGE_DIR)
    model.tokenizer.save_pretrained(path)
    write_model_card(path)  # the trainer's final save rewrites it with the run's recipe, steps and metrics


def check_loaded(missing: list[str], unexpected: list[str], source: str) -> None:
    """Raise unless every key was loaded; the image-word head (training only, never saved) may be missing
    or left over: a new one starts at its initial values."""
    from mmlm.models.image_words import PARAMETER_PREFIX

    missing = [k for k in missing if not k.startswith(PARAMETER_PREFIX)]
    unexpected = [k for k in unexpected if not k.startswith(PARAMETER_PREFIX)]
    if missing or unexpected:
        raise RuntimeError(f"{source}: weights do not match the model: missing {missing[:8]}, "
                           f"unexpected {unexpected[:8]}")


def resolve_init_from(init_from: str) -> Path:
    """The saved model folder ``model.init_from`` names: the folder itself or a run folder's ``model/``."""
    for folder in (Path(init_from), Path(init_from) / "model"):
        if (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file():
            return folder
    raise ConfigError(f"model.init_from: {init_from} holds no saved model ({CONFIG_NAME} + {WEIGHTS_NAME}, "
                      "itself or in model/); expected a folder written by save_pretrained or a finished run")


def start_from(cls: type[VisionLanguageModel], config: VLMConfig) -> VisionLanguageModel:
    """``model.init_from``: the model ``config`` describes, with the saved folder's weights (every
    adapter merged), tokenizer and LM config exactly; then this config's LoRA adapters go on."""
    folder = resolve_init_from(config.init_from)
    source = cls.from_pretrained(folder)
    _, tokenizer, lm_config = read_saved(folder)
    built = dataclasses.replace(
        config, init_from=None, vision=dataclasses.replace(config.vision, pretrained=False, weights_path=None),
        language=dataclasses.replace(config.language, tokenizer=None))
    model = cls._build(built, None, lm_config, tokenizer)
    model.config = dataclasses.replace(model.config, init_from=config.init_from)
    try:
        check_loaded(*model.load_state_dict(source.plain_state_dict(), strict=False), str(folder))
    except RuntimeError as err:
        raise ConfigError(f"model.init_from: the weights in {folder} do not fit this config's model "
                          f"(vision and projector must be the saved ones): {err}") from err
    del source
    model._add_adapters()
    return model
