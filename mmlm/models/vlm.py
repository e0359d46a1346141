"""VisionLanguageModel: timm encoder -> projector -> transformers causal LM (LLaVA-style).

Sequence layout (one image per sample)::

    [start] prompt-before-<image> [<image> x N] prompt-after-<image> answer [eos] [pad ...]

``start`` is the tokenizer's BOS (EOS when it has none). The prompt may contain one ``<image>``
marker; without one the image goes first, right after ``start``. The N placeholder ids are kept
in ``input_ids`` and their embeddings are replaced by the projected image tokens, so
``input_ids``, ``attention_mask`` and ``labels`` always line up position by position.
Training pads on the right, generation on the left; positions come from the attention mask,
so padding never shifts them. Labels are -100 everywhere except the answer and its EOS.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import AutoConfig, AutoTokenizer
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from mmlm.config import ConfigError, from_dict, to_dict
from mmlm.data.images import load_image
from mmlm.models.language import (
    IMAGE_TOKEN, LanguageConfig, base_causal_lm, build_language_model, cache_argument_name, forward_parameters,
    is_lora, load_tokenizer, output_cache, tokens_to_tensor,
)
from mmlm.models.label_tree import LabelTree, chunk_answers
from mmlm.models.projector import ProjectorConfig, build_projector
from mmlm.models.vision import ImageTransform, VisionConfig, VisionEncoder

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LANGUAGE_DIR = "language"
IGNORE_INDEX = -100


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
    max_length: int = 64  # text tokens per sample (prompt + answer + eos), image tokens not counted

    def __post_init__(self):
        if self.max_length < 2:
            raise ConfigError(f"model.max_length: expected >= 2, got {self.max_length}")
        _check_prompt(self.prompt, "model.prompt")


@dataclasses.dataclass
class VLMOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor


def _check_prompt(prompt: str, where: str) -> None:
    if not isinstance(prompt, str):
        raise TypeError(f"{where}: expected str, got {type(prompt).__name__}")
    if prompt.count(IMAGE_TOKEN) > 1:
        raise ValueError(f"{where}: at most one '{IMAGE_TOKEN}' per prompt (one image per sample), got {prompt!r}")


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding (left or right): 0 at each sample's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


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
        self._last_logits_only = {"logits_to_keep": 1} if "logits_to_keep" in forward_parameters(language_model) else {}
        self._prefix_ids: dict[str, list[int]] = {}

    # ------------------------------------------------------------------ construction, save, load

    @classmethod
    def from_config(cls, config: VLMConfig, corpus: Iterable[str] | None = None,
                    _lm_config=None, _tokenizer=None) -> "VisionLanguageModel":
        """Build the model; ``corpus`` (caption texts) trains the tokenizer when there is none to load."""
        if isinstance(config, dict):
            config = from_dict(VLMConfig, config)
        tokenizer = _tokenizer if _tokenizer is not None else load_tokenizer(config.language, corpus)
        language_model = build_language_model(config.language, tokenizer, model_config=_lm_config)
        vision = VisionEncoder(config.vision)
        lm_dim = base_causal_lm(language_model).get_input_embeddings().embedding_dim
        projector, num_image_tokens = build_projector(config.projector, vision.dim, lm_dim, vision.num_tokens)
        return cls(config, vision, projector, language_model, tokenizer, num_image_tokens)

    def save_pretrained(self, path: str | Path) -> None:
        """A folder: config.json, model.safetensors, tokenizer files, language/config.json. No pickles."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        language_model = self.language_model
        language = self.config.language
        if is_lora(language_model) and language.lora_merge_on_save:
            language_model = copy.deepcopy(language_model).merge_and_unload()
            language = dataclasses.replace(language, lora_rank=0)
        saved = dataclasses.replace(
            self.config, language=language,
            vision=dataclasses.replace(self.config.vision, pretrained=False, weights_path=None),
        )
        container = nn.Module()  # same attribute names as self, so the file loads into a VisionLanguageModel
        container.vision, container.projector, container.language_model = self.vision, self.projector, language_model
        save_model(container, str(path / WEIGHTS_NAME))
        (path / CONFIG_NAME).write_text(json.dumps({"model_class": type(self).__name__, "config": to_dict(saved)},
                                                   indent=2, ensure_ascii=False), encoding="utf-8")
        base_causal_lm(language_model).config.save_pretrained(path / LANGUAGE_DIR)
        self.tokenizer.save_pretrained(path)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None) -> "VisionLanguageModel":
        path = Path(path)
        config_file = path / CONFIG_NAME
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file}: not found; expected a folder written by save_pretrained")
        try:
            data = json.loads(config_file.read_text(encoding="utf-8"))
            config = from_dict(VLMConfig, data["config"], "config")
        except (json.JSONDecodeError, KeyError) as err:
            raise ConfigError(f"{config_file}: not a VisionLanguageModel config ({err})") from err
        config.language.tokenizer = None
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=config.language.trust_remote_code)
        lm_config = AutoConfig.from_pretrained(path / LANGUAGE_DIR,
                                               trust_remote_code=config.language.trust_remote_code)
        model = cls.from_config(config, _lm_config=lm_config, _tokenizer=tokenizer)
        load_model(model, str(path / WEIGHTS_NAME), strict=True)
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
        lm, kwargs = self.language_model, {"use_reentrant": False}
        if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.x name
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.vision.enable_gradient_checkpointing()

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(batch, 3, H, W) -> (batch, num_image_tokens, lm_dim)."""
        return self.projector(self.vision(pixel_values))

    # ------------------------------------------------------------------ tokenisation

    def _text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, prompt: str | None, with_image: bool = True) -> list[int]:
        """[start] + prompt tokens with the image placeholders spliced in (cached per prompt)."""
        prompt = self.config.prompt if prompt is None else prompt
        _check_prompt(prompt, "prompt")
        key = f"{with_image}|{prompt}"
        if key not in self._prefix_ids:
            if with_image:
                before, _, after = prompt.partition(IMAGE_TOKEN) if IMAGE_TOKEN in prompt else ("", "", prompt)
                ids = self._text_ids(before) + [self.image_token_id] * self.num_image_tokens + self._text_ids(after)
            else:
                if IMAGE_TOKEN in prompt:
                    raise ValueError(f"prompt: '{IMAGE_TOKEN}' given but there is no image: {prompt!r}")
                ids = self._text_ids(prompt)
            self._prefix_ids[key] = [self.start_token_id] + ids
        return self._prefix_ids[key]

    def _answer_ids(self, answer: str, index: int, eos: bool = True) -> list[int]:
        if not isinstance(answer, str) or not answer.strip():
            raise ValueError(f"captions[{index}]: expected a non-empty string, got {answer!r}")
        ids = self._text_ids(answer)
        return ids + [self.eos_token_id] if eos else ids

    def prepare_batch(self, pixel_values: torch.Tensor, captions: Sequence[str],
                      prompts: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Training tensors (right-padded): input_ids, attention_mask, labels, pixel_values.

        Raises ValueError when a sample would have no answer token left to learn from (its prompt
        fills ``max_length``): a silent all -100 label row is the LLaVA "loss 0.0" bug.
        """
        n = len(captions)
        if prompts is None:
            prompts = [self.config.prompt] * n
        if len(prompts) != n or pixel_values.shape[0] != n:
            raise ValueError(f"prepare_batch: {pixel_values.shape[0]} images, {n} captions and {len(prompts)} prompts; "
                             "expected one of each per sample")
        rows, label_rows = [], []
        for i, (caption, prompt) in enumerate(zip(captions, prompts)):
            prefix = self.prompt_ids(prompt)
            answer = self._answer_ids(caption, i)
            prefix_text = len(prefix) - self.num_image_tokens
            room = self.config.max_length - prefix_text
            if room <= 0:
                raise ValueError(f"sample {i}: the prompt takes {prefix_text} text tokens of max_length="
                                 f"{self.config.max_length}, leaving no answer tokens to train on; raise max_length")
            answer = answer[:room]
            rows.append(prefix + answer)
            label_rows.append([IGNORE_INDEX] * len(prefix) + answer)
        input_ids, attention_mask = tokens_to_tensor(rows, self.pad_token_id, left=False)
        labels, _ = tokens_to_tensor(label_rows, IGNORE_INDEX, left=False)
        device = pixel_values.device
        return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
                "labels": labels.to(device), "pixel_values": pixel_values}

    # ------------------------------------------------------------------ forward

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the image placeholders replaced by projected image tokens."""
        embeds = self.language_model.get_input_embeddings()(input_ids)
        image_mask = input_ids == self.image_token_id
        if pixel_values is None:
            if image_mask.any():
                raise ValueError("input_ids contain image placeholders but no pixel_values were given")
            return embeds
        counts = image_mask.sum(1)
        if (counts != self.num_image_tokens).any():
            raise ValueError(f"each sample needs exactly {self.num_image_tokens} '{IMAGE_TOKEN}' ids, "
                             f"got {counts.tolist()}; build inputs with prepare_batch")
        image_tokens = self.encode_images(pixel_values).to(embeds.dtype)
        return embeds.masked_scatter(image_mask.unsqueeze(-1), image_tokens)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None) -> VLMOutput:
        embeds = self.embed(input_ids, pixel_values)
        out = self.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                  position_ids=positions_from_mask(attention_mask), use_cache=False)
        loss = None
        if labels is not None:
            targets = labels[:, 1:]
            empty = (targets == IGNORE_INDEX).all(dim=1)
            if empty.any():
                raise ValueError(f"samples {empty.nonzero().flatten().tolist()} have no answer tokens in labels "
                                 "(all -100): the loss would silently ignore them")
            loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                   ignore_index=IGNORE_INDEX)
        return VLMOutput(loss=loss, logits=out.logits)

    # ------------------------------------------------------------------ generation

    def _pixel_values(self, images: Sequence[Any]) -> torch.Tensor:
        transform = self.image_transform(train=False)
        return torch.stack([transform(load_image(im)) for im in images]).to(self.device)

    def _lm_step(self, cache=None, **inputs):
        return self.language_model(use_cache=True, **{self._cache_arg: cache}, **inputs)

    def _decode(self, embeds: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, do_sample: bool,
                temperature: float, top_p: float) -> list[list[int]]:
        """KV-cached greedy / sampling loop (no generate(): its per-step bookkeeping costs more than the tiny LM)."""
        batch = embeds.shape[0]
        positions = positions_from_mask(attention_mask)
        padded = not bool(attention_mask.all())  # unpadded: no mask at all, the LM's causal kernel path is cheaper
        out = self._lm_step(inputs_embeds=embeds, attention_mask=attention_mask if padded else None,
                            position_ids=positions, **self._last_logits_only)
        next_position = positions[:, -1:] + 1
        warpers = []
        if do_sample:
            if temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(temperature))
            if top_p < 1.0:
                warpers.append(TopPLogitsWarper(top_p))
        finished = torch.zeros(batch, dtype=torch.bool, device=embeds.device)
        generated = []
        for step in range(max_new_tokens):
            logits = out.logits[:, -1].float()
            if do_sample:
                for warp in warpers:
                    logits = warp(None, logits)
                token = torch.multinomial(logits.softmax(-1), 1).squeeze(1)
            else:
                token = logits.argmax(-1)
            token = token.masked_fill(finished, self.pad_token_id)
            generated.append(token)
            finished |= token == self.eos_token_id
            if finished.all() or step == max_new_tokens - 1:
                break
            if padded:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
            out = self._lm_step(output_cache(out), input_ids=token[:, None],
                                attention_mask=attention_mask if padded else None, position_ids=next_position)
            next_position = next_position + 1
        tokens = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in range(batch)]
        return [row[: row.index(self.eos_token_id)] if self.eos_token_id in row else row for row in tokens]

    def _decode_with_generate(self, embeds, attention_mask, max_new_tokens: int, **kwargs) -> list[list[int]]:
        """transformers' generate() on inputs_embeds: beam search and other strategies."""
        out = self.language_model.generate(
            inputs_embeds=embeds, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
            eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id, **kwargs,
        )
        rows = out.tolist()
        return [row[: row.index(self.eos_token_id)] if self.eos_token_id in row else row for row in rows]

    @torch.inference_mode()  # returns token ids as lists: no inference tensor leaks out
    def _generate(self, prefix_rows: list[list[int]], pixel_values: torch.Tensor | None, max_new_tokens: int,
                  num_beams: int, do_sample: bool, temperature: float, top_p: float) -> list[str]:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
        if num_beams < 1:
            raise ValueError(f"num_beams: expected >= 1, got {num_beams}")
        input_ids, attention_mask = tokens_to_tensor(prefix_rows, self.pad_token_id, left=True)
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        embeds = self.embed(input_ids, pixel_values)
        if num_beams == 1:
            rows = self._decode(embeds, attention_mask, max_new_tokens, do_sample, temperature, top_p)
        else:
            rows = self._decode_with_generate(embeds, attention_mask, max_new_tokens, num_beams=num_beams,
                                              do_sample=do_sample, temperature=temperature, top_p=top_p)
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)

    def caption(self, images: Any, prompt: str | Sequence[str] | None = None, max_new_tokens: int = 32,
                num_beams: int = 1, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                batch_size: int = 32, progress: bool = False) -> list[str]:
        """Captions for ``images`` (PIL images, paths, arrays or tensors; a 4D tensor is a batch).

        ``prompt``: one for all images or one per image (left-padded when their lengths differ).
        """
        images = _as_image_list(images)
        prompts = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt] * len(images)
        if len(prompts) != len(images):
            raise ValueError(f"prompt: {len(prompts)} prompts for {len(images)} images; give one or one per image")
        captions: list[str] = []
        for start in _batch_starts(len(images), batch_size, progress, "caption"):
            captions += self.caption_pixels(self._pixel_values(images[start:start + batch_size]),
                                            prompts[start:start + batch_size], max_new_tokens, num_beams,
                                            do_sample, temperature, top_p)
        return captions

    def caption_pixels(self, pixel_values: torch.Tensor, prompt: str | Sequence[str] | None = None,
                       max_new_tokens: int = 32, num_beams: int = 1, do_sample: bool = False,
                       temperature: float = 1.0, top_p: float = 1.0) -> list[str]:
        """Captions for a batch already preprocessed by ``image_transform`` (what a DataLoader yields)."""
        n = pixel_values.shape[0]
        prompts = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt] * n
        with _eval_mode(self):
            return self._generate([self.prompt_ids(p) for p in prompts], pixel_values.to(self.device),
                                  max_new_tokens, num_beams, do_sample, temperature, top_p)

    def generate_text(self, prompt: str, max_new_tokens: int = 32, num_beams: int = 1, do_sample: bool = False,
                      temperature: float = 1.0, top_p: float = 1.0) -> str:
        """Text-only continuation of ``prompt`` (no image)."""
        with _eval_mode(self):
            rows = [self.prompt_ids(prompt, with_image=False)]
            return self._generate(rows, None, max_new_tokens, num_beams, do_sample, temperature, top_p)[0]

    # ------------------------------------------------------------------ classification by prompt

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
        images = _as_image_list(images)
        labels = _check_labels(labels)
        templates = _check_templates(prompt)
        probs = [self.classify_pixels(self._pixel_values(images[start:start + batch_size]), labels, templates,
                                      eos=eos, ensemble=ensemble)
                 for start in _batch_starts(len(images), batch_size, progress, "classify")]
        return torch.cat(probs)

    def classify_pixels(self, pixel_values: torch.Tensor, labels: Sequence[str],
                        prompt: str | Sequence[str] = "a photo of a {}", eos: bool = True,
                        ensemble: str = "mean") -> torch.Tensor:
        """``classify`` for a batch already preprocessed by ``image_transform``."""
        labels = _check_labels(labels)
        templates = _check_templates(prompt)
        if ensemble not in ("mean", "marginal"):
            raise ValueError(f"ensemble: expected 'mean' or 'marginal', got {ensemble!r}")
        reduce = "mean" if ensemble == "mean" else "sum"
        with _eval_mode(self):
            pixel_values = pixel_values.to(self.device)
            scores = torch.stack([self.label_log_likelihoods(pixel_values, labels, t, eos=eos, reduce=reduce).cpu()
                                  for t in templates])
        combined = scores.mean(0) if ensemble == "mean" else scores.logsumexp(0) - math.log(len(templates))
        return combined.softmax(dim=-1)

    @torch.no_grad()  # not inference_mode: callers may modify the scores in place
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
        stay under 2**26 floats.
        """
        if method == "auto":
            method = "tree" if self.language_model.config._attn_implementation in ("eager", "sdpa") else "expand"
        if method not in ("tree", "expand", "naive"):
            raise ValueError(f"method: expected 'auto', 'tree', 'expand' or 'naive', got {method!r}")
        if reduce not in ("mean", "sum"):
            raise ValueError(f"reduce: expected 'mean' or 'sum', got {reduce!r}")
        prefix_text, answer_texts = split_template(template, labels)
        if method == "naive":
            return self._label_scores_naive(pixel_values, prefix_text, answer_texts, eos, reduce)
        answers = [self._answer_ids(text, i, eos) for i, text in enumerate(answer_texts)]
        prefix = self.prompt_ids(prefix_text)
        n_img = pixel_values.shape[0]
        prefix_ids = torch.tensor([prefix] * n_img, device=self.device)
        prefix_mask = torch.ones_like(prefix_ids)  # one prompt for all images: no padding
        out = self._lm_step(inputs_embeds=self.embed(prefix_ids, pixel_values), attention_mask=prefix_mask,
                            position_ids=positions_from_mask(prefix_mask), **self._last_logits_only)
        first_logprobs = out.logits[:, -1].float().log_softmax(-1)  # predicts each answer's first token
        score_chunks = self._score_tree if method == "tree" else self._score_expanded
        scores = torch.empty(n_img, len(labels), device=self.device)
        if max_tokens is None:
            head = self.language_model.get_output_embeddings()
            vocab = head.weight.shape[0] if head is not None else len(self.tokenizer)
            max_tokens = min(8192, 2**26 // vocab)
        # <= 1024 trie nodes per call also bounds the [nodes, prompt + nodes] tree mask and its attention
        chunks = chunk_answers(answers, max(1, min(1024, max_tokens // n_img)))
        for c, group in enumerate(chunks):
            # The last chunk may extend the prompt's cache in place; earlier ones extend a copy.
            cache = output_cache(out) if c == len(chunks) - 1 else copy.deepcopy(output_cache(out))
            scores[:, group] = score_chunks(cache, len(prefix), first_logprobs, [answers[j] for j in group])
        if reduce == "mean":
            scores /= torch.tensor([len(ids) for ids in answers], device=scores.device, dtype=scores.dtype)
        return scores

    def _score_tree(self, cache, prefix_length: int, first_logprobs: torch.Tensor,
                    answers: list[list[int]]) -> torch.Tensor:
        tree = LabelTree.build(answers)
        if len(tree) == 0:  # single-token answers: the prompt's last position scores them all
            return tree.total_log_probs(first_logprobs, None)
        n_img = first_logprobs.shape[0]
        ids = torch.tensor(tree.tokens, device=self.device).expand(n_img, -1)
        positions = (torch.tensor(tree.depths, device=self.device) + prefix_length).expand(n_img, -1)
        dtype = next(self.language_model.parameters()).dtype
        mask = tree.attention_mask(prefix_length, dtype, self.device).expand(n_img, -1, -1, -1)
        logits = self._lm_step(cache, input_ids=ids, attention_mask=mask, position_ids=positions).logits
        return tree.total_log_probs(first_logprobs, logits.float().log_softmax(-1))

    def _score_expanded(self, cache, prefix_length: int, first_logprobs: torch.Tensor,
                        answers: list[list[int]]) -> torch.Tensor:
        n_img = first_logprobs.shape[0]
        scores = torch.empty(n_img, len(answers), device=self.device)
        by_length: dict[int, list[int]] = {}  # equal-length answers run together, unpadded
        for j, ids in enumerate(answers):
            by_length.setdefault(len(ids), []).append(j)
        for g, (length, group) in enumerate(sorted(by_length.items())):
            k = len(group)
            group_cache = cache if g == len(by_length) - 1 else copy.deepcopy(cache)
            group_cache.batch_repeat_interleave(k)  # image i's prefix repeated for its k labels
            ids = torch.tensor([answers[j] for j in group], device=self.device).repeat(n_img, 1)
            mask = torch.ones(n_img * k, prefix_length + length, dtype=torch.long, device=self.device)
            positions = (torch.arange(length, device=self.device) + prefix_length).expand_as(ids)
            logits = self._lm_step(group_cache, input_ids=ids, attention_mask=mask,
                                   position_ids=positions).logits.float()
            logprobs = torch.cat([first_logprobs.repeat_interleave(k, 0)[:, None], logits[:, :-1].log_softmax(-1)], 1)
            scores[:, group] = logprobs.gather(-1, ids[..., None]).squeeze(-1).sum(1).view(n_img, k)
        return scores

    def _label_scores_naive(self, pixel_values: torch.Tensor, prompt: str, answers: list[str], eos: bool,
                            reduce: str) -> torch.Tensor:
        n_img = pixel_values.shape[0]
        scores = torch.empty(n_img, len(answers), device=self.device)
        for j, answer in enumerate(answers):
            batch = self.prepare_batch(pixel_values, [answer] * n_img, [prompt] * n_img)
            logits = self(batch["pixel_values"], batch["input_ids"], batch["attention_mask"]).logits.float()
            targets = batch["labels"][:, 1:]
            mask = targets != IGNORE_INDEX
            if not eos:
                mask &= targets != self.eos_token_id
            lp = logits[:, :-1].log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
            total = (lp * mask).sum(1)
            scores[:, j] = total / mask.sum(1) if reduce == "mean" else total
        return scores


class _eval_mode:
    """Context manager: module in eval mode, previous mode restored afterwards."""

    def __init__(self, module: nn.Module):
        self.module, self.was_training = module, module.training

    def __enter__(self):
        self.module.eval()

    def __exit__(self, *exc):
        self.module.train(self.was_training)


def _batch_starts(n: int, batch_size: int, progress: bool, what: str):
    """Batch offsets, with a progress bar over the images when asked."""
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    starts = range(0, n, batch_size)
    if not progress:
        return starts
    from tqdm.auto import tqdm

    return tqdm(starts, desc=what, unit="batch", total=len(starts))


def _as_image_list(images: Any) -> list:
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        images = list(images)
    elif isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    elif not isinstance(images, (list, tuple)):
        images = [images]
    if len(images) == 0:
        raise ValueError("images: expected at least one image, got an empty list")
    return list(images)


def _check_labels(labels: Sequence[str]) -> list[str]:
    if isinstance(labels, str) or not isinstance(labels, Sequence):
        raise TypeError(f"labels: expected a list of strings, got {type(labels).__name__}")
    if len(labels) == 0:
        raise ValueError("labels: expected at least one label, got an empty list")
    for i, label in enumerate(labels):
        if not isinstance(label, str) or not label.strip():
            raise ValueError(f"labels[{i}]: expected a non-empty string, got {label!r}")
    seen: set[str] = set()
    duplicates = sorted({label for label in labels if label in seen or seen.add(label)})
    if duplicates:
        raise ValueError(f"labels: duplicates are ambiguous: {duplicates}")
    return list(labels)


def split_template(template: str, labels: Sequence[str]) -> tuple[str, list[str]]:
    """``"a photo of a {}"`` -> prompt ``"a photo of a"`` and answers ``[" red circle", ...]``.

    The whitespace before the slot moves to the answer, so prompt and answer tokenise separately
    exactly as the whole sentence does (byte-level BPE keeps a word's leading space in its token:
    "a small red" is "a", "Ġsmall", "Ġred", never "a", "Ġsmall", "Ġ", "red").
    """
    before, after = template.split("{}", 1)
    prompt = before.rstrip()
    space = before[len(prompt):]
    return prompt, [space + label + after for label in labels]


def _check_templates(prompt: str | Sequence[str]) -> list[str]:
    templates = [prompt] if isinstance(prompt, str) else list(prompt)
    if not templates:
        raise ValueError("prompt: expected a template or a non-empty list of templates")
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ValueError(f"prompt template {t!r}: expected a string with exactly one '{{}}' for the label")
        _check_prompt(t, "prompt template")
    return templates
