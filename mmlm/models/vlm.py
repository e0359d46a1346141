"""VisionLanguageModel: timm encoder -> projector -> transformers causal LM (LLaVA-style).

Sequence layout (one image; a conversation may hold up to ``model.max_images``, one ``<image>`` marker each)::

    [start] prompt-before-<image> [<image> x N] prompt-after-<image> answer [eos] [pad ...]

``start`` is the tokenizer's BOS (EOS when it has none). The prompt may contain one ``<image>``
marker; without one the image goes first, right after ``start``. Prompt and answer are tokenised
as one text (``mmlm.models.sequence.encode_segments``), so every token is what the LM sees inside
the whole sentence. The N placeholder ids are kept in ``input_ids`` and their embeddings replaced by
the projected image tokens, so ``input_ids``, ``attention_mask`` and ``labels`` line up position by
position. Training pads on the right, generation on the left; positions come from the attention
mask. Labels are -100 everywhere except the answer and its EOS; the LM head runs on those only.

``model.init_from: <folder>`` starts from a saved VLM (weights and tokenizer): LLaVA's two stages
are two configs. LoRA: ``language.lora_*`` for the LM, ``model.vision_lora`` / ``model.projector_lora``
for the tower and the projector (``mmlm.models.adapters``).

This file holds the model (config, build, embed, forward, save/load, training tokenisation).
Decoding lives in ``mmlm.models.generation``, label scoring in ``mmlm.models.scoring``, the image-word
loss in ``mmlm.models.image_words``. Longer than 400 lines because the public methods' documentation
(caption, chat, classify, label scoring) stays on the class, where users read it; the work is in those modules.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from safetensors.torch import load_model
from torch import nn
from mmlm.config import ConfigError, from_dict
from mmlm.images import load_image
from mmlm.models import explain as explain_module, generation, scoring, vlm_files
from mmlm.models.adapters import AdapterConfig, add_lora
from mmlm.models.head import decoder_of, label_loss
from mmlm.models.image_words import ImageWordHead, token_share
from mmlm.models.language import (
    IMAGE_TOKEN, LanguageConfig, apply_lora, build_language_model, cache_argument_name, check_sequence_fits,
    enable_lm_checkpointing, forward_parameters, load_tokenizer, tokens_to_tensor,
)
from mmlm.models.projector import ProjectorConfig, build_projector
from mmlm.models.scoring import split_template  # noqa: F401  (re-exported: callers import it from here)
from mmlm.models.sequence import (IGNORE_INDEX, EncodedSequence, Segment, check_image_counts, check_prompt,
                                  encode_segments, join_answer, positions_from_mask)
from mmlm.models.token_dropout import drop_answer_tokens
from mmlm.models.vision import ImageTransform, VisionConfig, VisionEncoder

def _default_language() -> LanguageConfig:
    return LanguageConfig(config={
        "model_type": "llama", "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512, "tie_word_embeddings": True,
    })


@dataclasses.dataclass
class VLMConfig:
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    projector: ProjectorConfig = dataclasses.field(default_factory=ProjectorConfig)
    language: LanguageConfig = dataclasses.field(default_factory=_default_language)
    prompt: str = ""  # default prompt for captioning; may contain one "<image>"
    chat_template: str = "auto"  # auto | none | a Jinja template: how conversations render (models/chat.py)
    max_length: int = 64  # text tokens per sample (start + prompt + answer + eos), image tokens not counted
    max_images: int = 1  # images per sample at most (<image> markers of a conversation); more is a data error
    # Training only: this fraction of answer tokens in the LM's input is replaced by pad (models/token_dropout.py).
    answer_token_dropout: float = 0.0
    # Training only: weight of the image-word loss (each answer word found in some image token; models/image_words.py).
    image_word_loss: float = 0.0
    # A saved model folder (or a run folder holding model/) to start from: its weights, tokenizer and LM
    # config (language.name_or_path / config are then not read); vision / projector must match the saved ones.
    init_from: str | None = None
    vision_lora: AdapterConfig = dataclasses.field(default_factory=AdapterConfig)  # LoRA on the timm tower
    projector_lora: AdapterConfig = dataclasses.field(default_factory=AdapterConfig)  # LoRA on the projector

    def __post_init__(self):
        if self.max_length < 2:
            raise ConfigError(f"model.max_length: expected >= 2, got {self.max_length}")
        if not isinstance(self.max_images, int) or self.max_images < 1:
            raise ConfigError(f"model.max_images: expected an integer >= 1, got {self.max_images!r}")
        if not 0.0 <= self.answer_token_dropout < 1.0:
            raise ConfigError(f"model.answer_token_dropout: expected a rate in [0, 1), got {self.answer_token_dropout}")
        if not (isinstance(self.image_word_loss, (int, float)) and self.image_word_loss >= 0):
            raise ConfigError(f"model.image_word_loss: expected a weight >= 0, got {self.image_word_loss!r}")
        check_prompt(self.prompt, "model.prompt")


@dataclasses.dataclass
class VLMOutput:
    """``logits``: [batch, length, vocab] without labels; with labels only the label positions',
    [num_label_tokens, vocab] in fp32 (row k predicts the k-th label token in reading order)."""

    loss: torch.Tensor | None
    logits: torch.Tensor
    num_label_tokens: torch.Tensor | None = None
    image_word_loss: torch.Tensor | None = None  # training with model.image_word_loss: the unweighted term


class VisionLanguageModel(nn.Module):
    def __init__(self, config: VLMConfig, vision: VisionEncoder, projector: nn.Module, language_model: nn.Module,
                 tokenizer, num_image_tokens: int):
        super().__init__()
        self.config = config
        self.vision = vision
        self.projector = projector
        self.language_model = language_model
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id
        self.start_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self._cache_arg = cache_argument_name(language_model)
        # A prefill needs the next-token logits only: [batch, 1, vocab], not [batch, length, vocab] (for a
        # 150k-word vocabulary and 600 image tokens, that is 90M floats per image).
        self.last_logits_only = {"logits_to_keep": 1} if "logits_to_keep" in forward_parameters(language_model) else {}
        self._prefix_ids: dict[str, list[int]] = {}
        if config.image_word_loss:
            special = [i for i in tokenizer.all_special_ids if i is not None]
            self.image_words = ImageWordHead(language_model.get_input_embeddings().num_embeddings, special)

    # ------------------------------------------------------------------ construction, save, load

    @classmethod
    def from_config(cls, config: VLMConfig, corpus: Iterable[str] | None = None,
                    _lm_config=None, _tokenizer=None) -> "VisionLanguageModel":
        """Build the model; ``corpus`` (caption texts) trains the tokenizer when there is none to load.
        With ``config.init_from`` the weights and tokenizer come from that saved folder."""
        if isinstance(config, dict):
            config = from_dict(VLMConfig, config)
        if config.init_from is not None:
            return vlm_files.start_from(cls, config)
        model = cls._build(config, corpus, _lm_config, _tokenizer)
        model._add_adapters()
        return model

    @classmethod
    def _build(cls, config: VLMConfig, corpus, lm_config, tokenizer) -> "VisionLanguageModel":
        """The model without LoRA adapters (they go on after any weights are loaded)."""
        language = config.language
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(language, corpus)
        plain = dataclasses.replace(language, lora_rank=0, freeze=language.freeze and language.lora_rank == 0)
        language_model = build_language_model(plain, tokenizer, model_config=lm_config)
        vision = VisionEncoder(config.vision)
        lm_dim = language_model.get_input_embeddings().embedding_dim
        projector, num_image_tokens = build_projector(config.projector, vision.dim, lm_dim, vision.num_tokens)
        check_sequence_fits(language_model.config, num_image_tokens * config.max_images, config.max_length)
        return cls(config, vision, projector, language_model, tokenizer, num_image_tokens)

    def _add_adapters(self) -> None:
        language = self.config.language
        if language.lora_rank > 0:
            self.language_model.requires_grad_(False)
            self.language_model = apply_lora(self.language_model, language)
        if self.config.vision_lora.rank > 0:
            add_lora(self.vision.backbone, self.config.vision_lora, "model.vision_lora")
        if self.config.projector_lora.rank > 0:
            add_lora(self.projector, self.config.projector_lora, "model.projector_lora")

    def plain_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights with every LoRA adapter merged in (names as a model without adapters has them)."""
        return vlm_files.plain_parts(self, merge_lm=True).state_dict()

    def save_pretrained(self, path: str | Path) -> None:
        """A folder: config.json, model.safetensors, tokenizer files, language/config.json. No pickles.
        Vision / projector LoRA is merged; the LM's too unless ``language.lora_merge_on_save`` is false."""
        vlm_files.save(self, Path(path))

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None) -> "VisionLanguageModel":
        config, tokenizer, lm_config = vlm_files.read_saved(Path(path))
        config.language.tokenizer = None
        model = cls.from_config(config, _lm_config=lm_config, _tokenizer=tokenizer)
        weights = Path(path) / vlm_files.WEIGHTS_NAME
        vlm_files.check_loaded(*load_model(model, str(weights), strict=False), str(weights))
        return model.to(device) if device is not None else model

    # ------------------------------------------------------------------ parts

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def image_transform(self, train: bool = False) -> ImageTransform:
        """PIL image -> tensor, from timm's data config; picklable for DataLoader workers."""
        return self.vision.image_transform(train)

    def trainable_groups(self) -> dict[str, nn.Module]:
        """Parameter groups for per-module learning rates (0 = frozen)."""
        return {"vision": self.vision, "projector": self.projector, "language": self.language_model}

    def enable_gradient_checkpointing(self) -> None:
        enable_lm_checkpointing(self.language_model)
        self.vision.enable_gradient_checkpointing()

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(batch, 3, H, W) -> (batch, num_image_tokens, lm_dim)."""
        return self.projector(self.vision(pixel_values))

    # ------------------------------------------------------------------ tokenisation

    def encode(self, segments: Sequence[Segment], eos: bool = True, with_image: bool = True) -> EncodedSequence:
        """``encode_segments`` with this model's tokenizer, start / image / EOS ids; without an ``<image>``
        marker in the segments the image goes first (``with_image=False``: a text-only sequence)."""
        marked = any(IMAGE_TOKEN in s.text for s in segments)
        if marked and not with_image:
            raise ValueError(f"prompt: '{IMAGE_TOKEN}' given but there is no image: {segments[0].text!r}")
        return encode_segments(self.tokenizer, segments, image_token_id=self.image_token_id,
                               num_image_tokens=self.num_image_tokens, start_token_id=self.start_token_id,
                               eos_token_id=self.eos_token_id if eos else None,
                               image_first=with_image and not marked)

    def encode_sample(self, prompt: str | None, answer: str, eos: bool = True) -> EncodedSequence:
        """prompt + answer as one text (the answer trained, a space between them where the sentence has one)."""
        prompt = self.config.prompt if prompt is None else prompt
        check_prompt(prompt, "prompt")
        return self.encode([Segment(prompt), Segment(join_answer(prompt, answer), train=True)], eos=eos)

    def prompt_ids(self, prompt: str | None, with_image: bool = True) -> list[int]:
        """[start] + prompt tokens with the image placeholders spliced in (cached per prompt)."""
        prompt = self.config.prompt if prompt is None else prompt
        check_prompt(prompt, "prompt")
        key = f"{with_image}|{prompt}"
        if key not in self._prefix_ids:
            self._prefix_ids[key] = self.encode([Segment(prompt)], eos=False, with_image=with_image).input_ids
        return self._prefix_ids[key]

    def prepare_batch(self, pixel_values: torch.Tensor, captions: Sequence[str],
                      prompts: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Training tensors (right-padded): input_ids, attention_mask, labels, pixel_values.

        Each sample is prompt + caption tokenised as one text (``encode_sample``), cut to ``max_length``
        text tokens. Raises ValueError when a sample would have no answer token left to learn from (its
        prompt fills ``max_length``): a silent all -100 label row is the LLaVA "loss 0.0" bug.
        """
        n = len(captions)
        if prompts is None:
            prompts = [self.config.prompt] * n
        if len(prompts) != n or pixel_values.shape[0] != n:
            raise ValueError(f"prepare_batch: {pixel_values.shape[0]} images, {n} captions and {len(prompts)} prompts; "
                             "expected one of each per sample")
        rows, label_rows = [], []
        for i, (caption, prompt) in enumerate(zip(captions, prompts)):
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(f"captions[{i}]: expected a non-empty string, got {caption!r}")
            sample = self.encode_sample(prompt, caption)
            sample = sample.truncate(self.config.max_length + sample.input_ids.count(self.image_token_id))
            if sample.first_label is None:
                prompt_tokens = len(self.prompt_ids(prompt)) - self.num_image_tokens
                raise ValueError(f"sample {i}: the prompt takes {prompt_tokens} text tokens of max_length="
                                 f"{self.config.max_length}, leaving no answer tokens to train on; raise max_length")
            rows.append(sample.input_ids)
            label_rows.append(sample.labels)
        input_ids, attention_mask = tokens_to_tensor(rows, self.pad_token_id, left=False)
        labels, _ = tokens_to_tensor(label_rows, IGNORE_INDEX, left=False)
        device = pixel_values.device
        return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
                "labels": labels.to(device), "pixel_values": pixel_values}

    # ------------------------------------------------------------------ forward

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
              image_counts: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings, image placeholders replaced by projected image tokens (``check_image_counts``)."""
        embeds = self.language_model.get_input_embeddings()(input_ids)
        image_mask = input_ids == self.image_token_id
        if pixel_values is None:
            if image_mask.any():
                raise ValueError("input_ids contain image placeholders but no pixel_values were given")
            return embeds
        check_image_counts(image_mask, len(pixel_values), self.num_image_tokens, image_counts)
        image_tokens = self.encode_images(pixel_values).to(embeds.dtype)
        return embeds.masked_scatter(image_mask.unsqueeze(-1), image_tokens)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None, num_items_in_batch: int | torch.Tensor | None = None,
                reduction: str = "mean", image_counts: Sequence[int] | torch.Tensor | None = None) -> VLMOutput:
        """Without ``labels``: the LM's logits at every position. With ``labels`` (unshifted, -100 = none):
        the decoder's hidden states, the LM head on the label positions only, cross-entropy in fp32.

        Loss: ``reduction="mean"`` divides the summed token losses by ``num_items_in_batch`` when given,
        else by this batch's label-token count; ``"sum"`` returns the sum. ``num_label_tokens`` (a 0-d
        tensor) is the count. For gradient accumulation and several processes, a trainer counts the label
        tokens of all micro-batches of an optimizer step (``sequence.count_label_tokens``), all-reduces the
        count, and passes ``num_items_in_batch = total / world_size`` (DDP averages gradients over
        processes), so every token weighs the same however the step is split. ``image_counts``: see ``embed``.
        """
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction: expected 'mean' or 'sum', got {reduction!r}")
        if labels is not None and self.training and self.config.answer_token_dropout:
            input_ids = drop_answer_tokens(input_ids, labels, self.config.answer_token_dropout, self.pad_token_id)
        embeds = self.embed(input_ids, pixel_values, image_counts)
        inputs = dict(inputs_embeds=embeds, attention_mask=attention_mask,
                      position_ids=positions_from_mask(attention_mask), use_cache=False)
        if labels is None:
            return VLMOutput(loss=None, logits=self.language_model(**inputs).logits)
        empty = (labels[:, 1:] == IGNORE_INDEX).all(dim=1)
        if empty.any():
            raise ValueError(f"samples {empty.nonzero().flatten().tolist()} have no answer tokens in labels "
                             "(all -100): the loss would silently ignore them")
        hidden = decoder_of(self.language_model)(**inputs).last_hidden_state
        loss, logits, count = label_loss(self.language_model, hidden, labels, num_items_in_batch, reduction)
        words = None
        if self.training and self.config.image_word_loss and pixel_values is not None:
            words = self.image_words(embeds, input_ids == self.image_token_id, labels,
                                     self.language_model.get_input_embeddings().weight)
            if words is not None:
                loss = loss + self.config.image_word_loss * token_share(count, num_items_in_batch, reduction) * words
        return VLMOutput(loss=loss, logits=logits, num_label_tokens=count, image_word_loss=words)

    def lm_step(self, cache=None, **inputs):
        """One cached LM call (prefill or extension of ``cache``), as generation and scoring run it."""
        return self.language_model(use_cache=True, **{self._cache_arg: cache}, **inputs)

    def pixel_values(self, images: Sequence[Any]) -> torch.Tensor:
        """Images (paths, bytes, PIL, arrays, tensors; decoded safely) -> a preprocessed batch on the model's device."""
        transform = self.image_transform(train=False)
        return torch.stack([transform(load_image(im)) for im in images]).to(self.device)

    # ------------------------------------------------------------------ generation (mmlm.models.generation)

    def explain(self, images: Any, text: str | Sequence[str] | None = None, prompt: str | None = None) -> list:
        """Relevance maps of caption tokens over the images (rollout, gradient x attention): ``models.explain``."""
        return explain_module.explain(self, images, text, prompt)

    def caption(self, images: Any, prompt: str | Sequence[str] | None = None, max_new_tokens: int = 32,
                num_beams: int | None = None, do_sample: bool | None = None, temperature: float | None = None,
                top_p: float | None = None, batch_size: int = 32, progress: bool = False,
                **generate_kwargs) -> list[str]:
        """Captions for ``images`` (PIL images, paths, arrays or tensors; a 4D tensor is a batch).

        ``prompt``: one for all images or one per image (left-padded when their lengths differ). Options left
        None and ``generate_kwargs`` (any ``GenerationConfig`` field, or ``generation_config=``) come from /
        override the LM's own ``generation_config`` (``mmlm.models.generation.resolve_config``).
        """
        return generation.caption(self, images, prompt, max_new_tokens, num_beams, do_sample, temperature, top_p,
                                  batch_size, progress, **generate_kwargs)

    def caption_pixels(self, pixel_values: torch.Tensor, prompt: str | Sequence[str] | None = None,
                       max_new_tokens: int = 32, num_beams: int | None = None, do_sample: bool | None = None,
                       temperature: float | None = None, top_p: float | None = None, **generate_kwargs) -> list[str]:
        """Captions for a batch already preprocessed by ``image_transform`` (what a DataLoader yields)."""
        return generation.caption_pixels(self, pixel_values, prompt, max_new_tokens, num_beams, do_sample,
                                         temperature, top_p, **generate_kwargs)

    def generate_text(self, prompt: str, max_new_tokens: int = 32, num_beams: int | None = None,
                      do_sample: bool | None = None, temperature: float | None = None, top_p: float | None = None,
                      **generate_kwargs) -> str:
        """Text-only continuation of ``prompt`` (no image)."""
        return generation.generate_text(self, prompt, max_new_tokens, num_beams, do_sample, temperature, top_p,
                                        **generate_kwargs)

    # ------------------------------------------------------------------ chat and questions (mmlm.models.chat)

    def chat(self, images: Any, messages: Sequence[dict], stream: bool = False, **generate_kwargs):
        """The next assistant reply to ``messages`` (``[{"role", "content"}]``, ``<image>`` markers optional),
        rendered with ``model.chat_template``; ``stream=True``: an iterator of text pieces as they come."""
        from mmlm.models import chat

        return chat.chat(self, images, messages, stream, **generate_kwargs)

    def answer(self, images: Any, questions: str | Sequence[str], batch_size: int = 32, progress: bool = False,
               **generate_kwargs) -> list[str]:
        """One answer per image to its question (one question for all, or one per image), batched."""
        from mmlm.models import chat

        return chat.answer(self, images, questions, batch_size, progress, **generate_kwargs)

    def answer_pixels(self, pixel_values: torch.Tensor, questions: Sequence[str], **generate_kwargs) -> list[str]:
        """``answer`` for a batch already preprocessed by ``image_transform``."""
        from mmlm.models import chat

        return chat.answer_pixels(self, pixel_values, questions, **generate_kwargs)

    # ------------------------------------------------------------------ classification by prompt (mmlm.models.scoring)

    def classify(self, images: Any, labels: Sequence[str], prompt: str | Sequence[str] = "a photo of a {}",
                 batch_size: int = 16, progress: bool = False, eos: bool = True,
                 ensemble: str = "mean") -> torch.Tensor:
        """[n_images, n_labels] probabilities over the labels.

        A template's text before "{}" is the prompt; the label plus the text after "{}" is the
        scored answer, followed by EOS when ``eos`` (the answer is the whole reply, as a trained
        classifier gives it). ``eos=False`` scores the answer as the start of a longer reply: what
        a captioner does ("red circle" in "a small red circle on the left, ...").

        Several templates form an ensemble. ``ensemble="mean"`` averages each label's mean token
        log-likelihood over them (open_clip-style prompt averaging); ``"marginal"`` treats them as
        alternatives and takes log(mean_t p(answer | template t)) with whole-answer probabilities,
        e.g. for templates that spell out a nuisance attribute ("a small {}", "a large {}").
        """
        return scoring.classify(self, images, labels, prompt, batch_size, progress, eos, ensemble)

    def classify_pixels(self, pixel_values: torch.Tensor, labels: Sequence[str],
                        prompt: str | Sequence[str] = "a photo of a {}", eos: bool = True,
                        ensemble: str = "mean") -> torch.Tensor:
        """``classify`` for a batch already preprocessed by ``image_transform``."""
        return scoring.classify_pixels(self, pixel_values, labels, prompt, eos, ensemble)

    def label_log_likelihoods(self, pixel_values: torch.Tensor, labels: Sequence[str], template: str,
                              method: str = "auto", max_tokens: int | None = None, eos: bool = True,
                              reduce: str = "mean") -> torch.Tensor:
        """[batch, n_labels] log-probability of each label's tokens (and EOS when ``eos``) after the
        image + prompt: per token (``reduce="mean"``) or of the whole answer (``"sum"``).

        ``method``: ``"tree"`` runs the image + prompt once per image and then every distinct label
        prefix once, as a token trie with tree attention (``LabelTree``); ``"expand"`` repeats the
        prompt's KV cache for every label (for attention kernels that take no dense mask, e.g.
        flash attention); ``"naive"`` scores each (image, label) pair with a full forward pass, the
        reference. ``"auto"`` is ``"tree"`` when the LM's attention takes a 4D mask, else ``"expand"``.
        ``max_tokens`` bounds image x label tokens per LM call (labels are chunked to fit, at most 1024
        label tokens per call); by default 8192, fewer for large vocabularies so that one call's logits
        stay under 2**26 floats. Runs under ``torch.no_grad`` (not inference mode: the scores may be
        modified in place).
        """
        return scoring.label_log_likelihoods(self, pixel_values, labels, template, method, max_tokens, eos, reduce)
