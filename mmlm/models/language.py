"""Causal language model + tokenizer, from a Hub id, a local folder, or a config trained from scratch.

transformers builds the model (``AutoModelForCausalLM``); when there is no tokenizer, one is
trained on the caption corpus with ``tokenizers`` (byte-level BPE, so any UTF-8 text, Chinese
included, round-trips) and wrapped in ``PreTrainedTokenizerFast``. The special tokens the VLM
needs (image placeholder, padding, end of text) are added and the embeddings resized.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable

import torch
from tokenizers import AddedToken
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerFast

from mmlm.config import ConfigError
from mmlm.models.freezing import freeze
from mmlm.models.tokenizer import train_bpe_tokenizer

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"


@dataclasses.dataclass
class LanguageConfig:
    """The causal LM: ``name_or_path`` (Hub id or local folder) or ``config`` (from scratch)."""

    name_or_path: str | None = None
    config: dict[str, Any] = dataclasses.field(default_factory=dict)  # from scratch: {"model_type": "llama", ...};
    # with name_or_path: overrides passed to from_pretrained
    tokenizer: str | None = None  # tokenizer folder/id; None = name_or_path's, else trained on the corpus
    vocab_size: int = 1024  # size of a tokenizer trained on the corpus
    trust_remote_code: bool = False
    attn_implementation: str | None = "sdpa"
    freeze: bool = False
    lora_rank: int = 0  # > 0 wraps the LM with peft LoRA
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = dataclasses.field(default_factory=list)  # module names; [] = all linear layers
    lora_merge_on_save: bool = True  # save a plain merged model (False: keep the adapter in the saved weights)

    def __post_init__(self):
        if self.name_or_path is None and self.config and "model_type" not in self.config:
            raise ConfigError("language.config: a from-scratch config needs 'model_type' (e.g. 'llama', 'gpt2')")
        if self.vocab_size < 300:
            raise ConfigError(f"language.vocab_size: expected >= 300 (256 bytes + merges), got {self.vocab_size}")
        if self.lora_rank < 0:
            raise ConfigError(f"language.lora_rank: expected >= 0, got {self.lora_rank}")


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``corpus``, with the VLM's special tokens."""
    texts = [t for t in corpus if isinstance(t, str) and t]
    if not texts:
        raise ValueError("train_tokenizer: the corpus is empty; pass the training captions")
    return train_bpe_tokenizer(texts, vocab_size, [EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN], eos_token=EOS_TOKEN,
                               pad_token=PAD_TOKEN)


def add_vlm_special_tokens(tokenizer) -> None:
    """Ensure end-of-text, padding and image-placeholder tokens exist (in place)."""
    special = {}
    if tokenizer.eos_token is None:
        special["eos_token"] = EOS_TOKEN
    if tokenizer.pad_token is None:
        special["pad_token"] = PAD_TOKEN
    if special:
        tokenizer.add_special_tokens(special)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")


def _has_tokenizer_files(source: str) -> bool:
    """False for a local folder holding only a model (a Hub id is assumed to have a tokenizer)."""
    path = Path(source)
    return not path.is_dir() or any((path / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(config: LanguageConfig, corpus: Iterable[str] | None):
    """The LM's own tokenizer (``language.tokenizer``, else ``name_or_path``'s); trained on ``corpus``
    only for a from-scratch LM. A pretrained LM never gets a fresh tokenizer: its embedding rows
    belong to its own vocabulary."""
    source = config.tokenizer or config.name_or_path
    tokenizer = None
    if source is not None:
        if config.tokenizer is None and not _has_tokenizer_files(source):
            raise ConfigError(
                f"language.name_or_path: '{source}' holds a model but no tokenizer files "
                f"(none of {', '.join(TOKENIZER_FILES)}); its embeddings belong to the tokenizer it was "
                "trained with: set language.tokenizer to that tokenizer's folder or Hub id")
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=config.trust_remote_code)
        except (OSError, ValueError, TypeError) as err:
            key = "language.tokenizer" if config.tokenizer is not None else "language.name_or_path"
            raise ConfigError(f"{key}: cannot load a tokenizer from '{source}' ({err}); "
                              "set language.tokenizer to the LM's tokenizer folder or Hub id") from err
    if tokenizer is None:
        if corpus is None:
            raise ConfigError("language: no tokenizer to load (language.tokenizer / name_or_path) "
                              "and no caption corpus to train one on")
        tokenizer = train_tokenizer(corpus, config.vocab_size)
    add_vlm_special_tokens(tokenizer)
    return tokenizer


def build_language_model(
    config: LanguageConfig, tokenizer, model_config: PretrainedConfig | None = None,
) -> nn.Module:
    """The causal LM with embeddings sized for ``tokenizer``.

    ``model_config`` builds the architecture without loading weights (used by
    ``VisionLanguageModel.from_pretrained``, whose own file holds them).
    """
    attn = {"attn_implementation": config.attn_implementation} if config.attn_implementation else {}
    if model_config is not None:
        lm = AutoModelForCausalLM.from_config(model_config, trust_remote_code=config.trust_remote_code, **attn)
    elif config.name_or_path is not None:
        try:
            lm = AutoModelForCausalLM.from_pretrained(
                config.name_or_path, trust_remote_code=config.trust_remote_code, **attn, **config.config)
        except OSError as err:
            raise ConfigError(f"language.name_or_path: cannot load a causal LM from '{config.name_or_path}' ({err})") from err
    else:
        if not config.config:
            raise ConfigError("language: set name_or_path (Hub id / local folder) or config (from scratch)")
        arch = dict(config.config)
        model_type = arch.pop("model_type")
        arch["vocab_size"] = len(tokenizer)
        try:
            lm_config = AutoConfig.for_model(model_type, **arch)
        except ValueError as err:
            raise ConfigError(f"language.config.model_type: {err}") from err
        lm = AutoModelForCausalLM.from_config(lm_config, trust_remote_code=config.trust_remote_code, **attn)
    if lm.get_input_embeddings().num_embeddings < len(tokenizer):
        lm.resize_token_embeddings(len(tokenizer))
    for name in ("pad_token_id", "eos_token_id"):
        setattr(lm.config, name, getattr(tokenizer, name))
        if getattr(lm, "generation_config", None) is not None:
            setattr(lm.generation_config, name, getattr(tokenizer, name))
    if config.freeze and config.lora_rank == 0:
        freeze(lm)  # no gradients, and eval mode (dropout off) that survives model.train()
    elif config.freeze:
        lm.requires_grad_(False)  # peft trains the adapters on the frozen base (its dropout stays on)
    if config.lora_rank > 0:
        lm = apply_lora(lm, config)
    return lm


POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def max_positions(lm_config: PretrainedConfig) -> tuple[int, str] | None:
    """The most positions the LM takes and the config key that says so (e.g. ``(128, 'n_positions')``);
    None when its config names no limit. Multimodal configs are read through their ``text_config``."""
    config = getattr(lm_config, "text_config", None) or lm_config
    for key in POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value, getattr(config, "attribute_map", {}).get(key, key)  # GPT-2's file says n_positions
    return None


def check_sequence_fits(lm_config: PretrainedConfig, num_image_tokens: int, max_length: int) -> None:
    """ConfigError when ``num_image_tokens`` + ``max_length`` (text tokens) exceed the LM's positions
    (past them a learned position table is indexed out of range: a device-side assert on a GPU)."""
    limit = max_positions(lm_config)
    if limit is None:
        return
    positions, key = limit
    total = num_image_tokens + max_length
    if total > positions:
        fewer = ("use fewer image tokens (projector pooling such as pixel_shuffle or perceiver, a smaller "
                 "vision.image_size, or a coarser vision.features_only_stage)")
        fix = (f"lower model.max_length to <= {positions - num_image_tokens} or {fewer}"
               if num_image_tokens < positions else fewer)
        raise ConfigError(
            f"model.max_length: {num_image_tokens} image tokens + max_length {max_length} = {total} positions, "
            f"but the language model's {key} is {positions}; {fix}")


def apply_lora(lm: nn.Module, config: LanguageConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_targets) or "all-linear", task_type="CAUSAL_LM",
    )
    return get_peft_model(lm, lora)


def is_lora(lm: nn.Module) -> bool:
    return hasattr(lm, "peft_config")


def base_causal_lm(lm: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return lm.get_base_model() if is_lora(lm) else lm


def forward_parameters(lm: nn.Module) -> set[str]:
    """The argument names the causal LM's ``forward`` takes."""
    import inspect

    return set(inspect.signature(base_causal_lm(lm).forward).parameters)


def cache_argument_name(lm: nn.Module) -> str:
    """transformers 5 calls the KV cache argument ``cache``; 4.x called it ``past_key_values``."""
    return "cache" if "cache" in forward_parameters(lm) else "past_key_values"


def output_cache(outputs) -> Any:
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else outputs.past_key_values



def tokens_to_tensor(ids: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token-id lists into (ids, attention_mask), on the left (generation) or right (training)."""
    width = max(len(x) for x in ids)
    out = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        if left:
            out[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
        else:
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
    return out, mask


def enable_lm_checkpointing(lm: nn.Module) -> None:
    """Activation checkpointing of a transformers LM (non-reentrant), under its 5.x name or the older one."""
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
