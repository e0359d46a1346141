"""Text encoders that condition the diffusion denoiser: captions -> (hidden states, mask).

Three kinds, chosen by ``TextEncoderConfig.kind``:

- ``"scratch"``: a small CLIP-style text transformer (transformers' ``CLIPTextModel``) built from
  the config, with a byte-level BPE tokenizer trained on the caption corpus; trained with the denoiser.
- ``"pretrained"``: any transformers text encoder from a Hub id or local folder (CLIP, SigLIP, T5
  encoder, BERT, ...); frozen by default.
- ``"lm"``: the hidden states of a causal LM: a Hub id or LM folder, an mmlm VLM folder (the demo's captioner),
  or the live ``.language`` / ``.tokenizer`` of a VisionLanguageModel, so one LM both captions and conditions
  generation; frozen by default.

Every kind pads to a fixed ``max_length`` so that embeddings of a frozen encoder can be cached per
unique caption (the big CPU saving: the encoder then runs once per caption, not once per step).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mmlm.config import ConfigError
from mmlm.models.diffusion.config import TextEncoderConfig
from mmlm.models.hub import MODEL_TYPE as VLM_MODEL_TYPE
from mmlm.models.tokenizer import train_bpe_tokenizer

# The scratch tokenizer: every caption wrapped as ``<bos> ... <eos>``, so even the empty caption has two tokens.
SCRATCH_TOKENIZER = dict(special_tokens=("<pad>", "<bos>", "<eos>"), wrap=("<bos>", "<eos>"), pad_token="<pad>",
                         bos_token="<bos>", eos_token="<eos>")


def check_prompts(prompts: str | Sequence[str], name: str) -> list[str]:
    """A string or a list of strings -> a list of strings; anything else is a TypeError naming ``name``."""
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"{name}: expected a string or a list of strings, got {prompts!r}")
    return prompts


def _pretrained_text_model_class(name_or_path: str, trust_remote_code: bool = False) -> type[PreTrainedModel]:
    """The text-only model class for a checkpoint: CLIP/SigLIP text towers, T5 encoders, else AutoModel."""
    config = transformers.AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    by_type = {
        "clip": transformers.CLIPTextModel,
        "clip_text_model": transformers.CLIPTextModel,
        "siglip": transformers.SiglipTextModel,
        "siglip_text_model": transformers.SiglipTextModel,
        "t5": transformers.T5EncoderModel,
        "umt5": transformers.UMT5EncoderModel,
    }
    return by_type.get(config.model_type, transformers.AutoModel)


def vlm_folder(name_or_path: str) -> Path:
    """A saved VLM folder, or a run folder holding one under model/."""
    path = Path(name_or_path)
    return path / "model" if (path / "model" / "config.json").is_file() else path


def is_vlm_folder(name_or_path: str) -> bool:
    config_file = vlm_folder(name_or_path) / "config.json"
    if not config_file.is_file():
        return False
    try:
        return json.loads(config_file.read_text(encoding="utf-8")).get("model_type") == VLM_MODEL_TYPE
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def _model_class_by_name(name: str) -> type[PreTrainedModel]:
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise ValueError(f"text encoder class {name!r} is not a transformers model class")
    return cls


class TextEncoder(nn.Module):
    """Tokenizer + transformers model -> fixed-length hidden states and attention mask.

    ``forward(captions)`` returns ``(hidden [B, max_length, hidden_size], mask [B, max_length])``.
    When frozen, results are cached per caption string (on CPU) and computed without gradients.
    ``lowercase``: every caption lower-cased and stripped first, as ``PixArtAlphaPipeline`` treats prompts
    (``clean_caption=False``), so training and the saved pipeline see the same text.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: TextEncoderConfig,
                 freeze_weights: bool = True, lowercase: bool = False):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.lowercase = lowercase
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if config.kind == "lm":
            self._check_hidden_layer()
        if config.frozen and freeze_weights:
            self.model.requires_grad_(False)
        # Whatever replaces the weights through load_state_dict (resume, EMA swap) invalidates the cache.
        self.register_load_state_dict_post_hook(lambda module, keys: module.clear_cache())

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, config: TextEncoderConfig, corpus: Iterable[str] | None = None) -> TextEncoder:
        if config.kind == "scratch":
            texts = list(corpus) if corpus is not None else []  # None: bytes only
            tokenizer = train_bpe_tokenizer(texts, config.vocab_size, **SCRATCH_TOKENIZER)
            model_config = transformers.CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=config.hidden_size,
                intermediate_size=4 * config.hidden_size,
                num_hidden_layers=config.num_layers,
                num_attention_heads=config.num_heads,
                max_position_embeddings=config.max_length,
                hidden_act="gelu",
                projection_dim=config.hidden_size,
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            return cls(transformers.CLIPTextModel(model_config), tokenizer, config)
        if not config.name_or_path:
            raise ConfigError(
                f"text_encoder.name_or_path: required for kind {config.kind!r} "
                "(or pass the LM and tokenizer with TextEncoder.from_language_model)"
            )
        remote = config.trust_remote_code
        if config.kind == "lm" and is_vlm_folder(config.name_or_path):
            return cls.from_vlm_folder(config)
        tokenizer = transformers.AutoTokenizer.from_pretrained(config.name_or_path, trust_remote_code=remote)
        if config.kind == "lm":
            model = transformers.AutoModelForCausalLM.from_pretrained(config.name_or_path, trust_remote_code=remote)
        else:
            model_class = _pretrained_text_model_class(config.name_or_path, remote)
            model = model_class.from_pretrained(config.name_or_path, trust_remote_code=remote)
        return cls(model, tokenizer, config)

    @classmethod
    def from_language_model(
        cls,
        language_model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: TextEncoderConfig | None = None,
    ) -> TextEncoder:
        """Condition on an existing causal LM (e.g. ``vlm.language`` with ``vlm.tokenizer``); shares its weights.

        The LM's ``requires_grad`` flags are left as they are (its owner may be training it); when frozen
        here it runs under ``no_grad`` and stays out of ``TextToImage.trainable_groups``.
        """
        config = config or TextEncoderConfig(kind="lm")
        if config.kind != "lm":
            config = dataclasses.replace(config, kind="lm")
        return cls(language_model, tokenizer, config, freeze_weights=False)

    @classmethod
    def from_vlm_folder(cls, config: TextEncoderConfig) -> TextEncoder:
        """The LM and tokenizer of an mmlm VisionLanguageModel folder (or its run folder), e.g. the demo's
        captioner: its embeddings already tell the caption words apart. A copy, frozen unless ``freeze: false``."""
        from mmlm.models.language import base_causal_lm
        from mmlm.models.vlm import VisionLanguageModel

        vlm = VisionLanguageModel.from_pretrained(vlm_folder(config.name_or_path))
        return cls(base_causal_lm(vlm.language_model), vlm.tokenizer, config)

    @classmethod
    def from_folder(cls, model_dir: str | Path, tokenizer_dir: str | Path, class_name: str,
                    config: TextEncoderConfig) -> TextEncoder:
        """Load what ``save`` wrote (no network: local folders only)."""
        model = _model_class_by_name(class_name).from_pretrained(model_dir, local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            tokenizer_dir, local_files_only=True, trust_remote_code=config.trust_remote_code
        )
        return cls(model, tokenizer, config)

    def save(self, model_dir: str | Path, tokenizer_dir: str | Path) -> str:
        """Write model (safetensors) and tokenizer; returns the model class name for ``from_folder``."""
        self.model.save_pretrained(model_dir, safe_serialization=True)
        self.tokenizer.save_pretrained(tokenizer_dir)
        return type(self.model).__name__

    # ---------------------------------------------------------------- encoding
    def _text_config(self):
        """The model's config, or its text part for multimodal configs."""
        cfg = self.model.config
        return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg

    @property
    def hidden_size(self) -> int:
        cfg = self._text_config()
        for name in ("hidden_size", "d_model", "n_embd"):
            if getattr(cfg, name, None):
                return int(getattr(cfg, name))
        raise ValueError(f"cannot tell the hidden size of {type(self.model).__name__}")

    def _check_hidden_layer(self) -> None:
        """``hidden_layer`` indexes the LM's hidden states: embeddings (0) and one per layer; else a clear error."""
        layers = getattr(self._text_config(), "num_hidden_layers", None)
        if layers is not None and not -(layers + 1) <= self.config.hidden_layer <= layers:
            raise ConfigError(f"text_encoder.hidden_layer: the LM has {layers} layer{'s' * (layers != 1)}, so "
                              f"{layers + 1} hidden states (0: its input embeddings, -1 or {layers}: its last "
                              f"layer); got {self.config.hidden_layer}")

    @property
    def frozen(self) -> bool:
        return self.config.frozen

    def clear_cache(self) -> None:
        self._cache.clear()

    def tokenize(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids and mask of shape [B, max_length]; never an all-padding row."""
        length = self.config.max_length
        if self.config.attend_padding:  # exactly as diffusers' pipelines tokenise prompts
            encoded = self.tokenizer(list(captions), padding="max_length", max_length=length, truncation=True,
                                     return_tensors="pt")
            return encoded["input_ids"], encoded["attention_mask"]
        encoded = self.tokenizer(list(captions), add_special_tokens=True, truncation=True, max_length=length)
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        filler = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else pad_id
        ids = torch.full((len(captions), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(captions), length), dtype=torch.long)
        for row, seq in enumerate(encoded["input_ids"]):
            seq = list(seq) or [filler]  # an empty caption with no special tokens still needs one token
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        return ids, mask

    def _run(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.model.parameters()).device
        ids, mask = self.tokenize(captions)
        ids, mask = ids.to(device), mask.to(device)
        if self.config.kind == "lm":
            out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            hidden = out.hidden_states[self.config.hidden_layer]
        elif self.config.attend_padding:  # diffusers' pipelines: a mask only where the model's config asks for one
            use_mask = getattr(self.model.config, "use_attention_mask", False)
            hidden = self.model(input_ids=ids, attention_mask=mask if use_mask else None)[0]
            mask = torch.ones_like(mask)
        else:
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden, mask

    def forward(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lowercase:
            captions = [c.lower().strip() for c in captions]
        if not self.frozen:
            return self._run(captions)
        missing = list(dict.fromkeys(c for c in captions if c not in self._cache))
        if missing:
            if len(self._cache) + len(missing) > self.config.cache_size:
                self._cache.clear()
            was_training = self.model.training
            self.model.eval()  # frozen: no dropout, so one cached value per caption is exact
            with torch.no_grad():
                hidden, mask = self._run(missing)
            self.model.train(was_training)
            for i, caption in enumerate(missing):
                self._cache[caption] = (hidden[i].cpu(), mask[i].cpu())
        device = next(self.model.parameters()).device
        hidden = torch.stack([self._cache[c][0] for c in captions]).to(device)
        mask = torch.stack([self._cache[c][1] for c in captions]).to(device)
        return hidden, mask
