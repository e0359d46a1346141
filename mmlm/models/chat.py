"""Chat rendering: conversations -> text segments (assistant turns trained), in the LM's own chat format.

``model.chat_template`` chooses the format:

* ``auto``: the tokenizer's own template (``tokenizer.chat_template``, rendered by ``apply_chat_template``), else
  ``DEFAULT_CHAT_TEMPLATE``, a small one for tokenizers we train (``user: ...\\nassistant: ...<eos>``);
* ``none``: no template: the turns' texts one after another, each assistant turn followed by EOS (the plain
  prompt + caption layout of captioning);
* any other string: a Jinja chat template, used as the tokenizer's would be.

The rendering finds the character span of each assistant turn in the whole rendered text: the text rendered for
the turns before it (with ``add_generation_prompt=True``) must be a prefix of the text rendered with it, and the
turn's content is located after that prefix; the span runs on over the special token that ends the turn
(``<|im_end|>``, ``<|eot_id|>``, EOS), so the model learns to stop. Training, ``chat`` and ``answer`` use the same
rendering; the generation prompt is exactly ``apply_chat_template(messages, add_generation_prompt=True)``.
Segments then go through ``mmlm.models.sequence.encode_segments`` (one whole-text tokenisation, labels by
offsets).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from mmlm.models.language import IMAGE_TOKEN, tokens_to_tensor
from mmlm.models.sequence import IGNORE_INDEX, EncodedSequence, Segment, encode_segments, join_answer

if TYPE_CHECKING:  # pragma: no cover
    from mmlm.models.vlm import VisionLanguageModel

ROLES = ("system", "user", "assistant")
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token if bos_token else eos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ 'assistant: ' + message['content'] + eos_token + '\\n' }}"
    "{% else %}{{ message['role'] + ': ' + message['content'] + '\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)  # the prompt ends at "assistant:": the space belongs to the answer's first token (" red"), as in training
_PROBE = "\u2063probe\u2063"  # content of the probe turn that finds the end-of-turn token


def resolve_template(tokenizer, setting: str | None) -> str | None:
    """The Jinja template ``setting`` names (``None`` for ``none``)."""
    setting = "auto" if setting is None else setting
    if not isinstance(setting, str) or not setting.strip():
        raise ValueError(f"model.chat_template: expected 'auto', 'none' or a Jinja template, got {setting!r}")
    if setting == "none":
        return None
    if setting == "auto":
        return getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    if "{" not in setting:
        raise ValueError(f"model.chat_template: {setting!r} is neither 'auto', 'none' nor a Jinja template")
    return setting


def check_messages(messages: Sequence[dict], where: str = "messages") -> list[dict[str, str]]:
    """Messages as ``[{"role", "content": str}]``; raises ValueError naming the turn for an unknown role or
    a non-string content (normalise LLaVA / HF content lists with ``mmlm.data.conversations``)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of {{'role', 'content'}} messages, got {messages!r:.80}")
    out = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise ValueError(f"{where}[{i}]: role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"{where}[{i}]: content must be a string with <image> markers, "
                             f"got {type(message.get('content')).__name__}")
        out.append({"role": role, "content": message["content"]})
    return out


def with_image_markers(messages: Sequence[dict], num_images: int) -> list[dict[str, str]]:
    """``messages`` with ``<image>`` markers for ``num_images`` images: as given when they have them all, else
    the missing markers put in front of the first user turn (``"<image>\\n" + text``). More markers than
    images is an error."""
    messages = [dict(m) for m in messages]
    found = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if found > num_images:
        raise ValueError(f"messages: {found} '{IMAGE_TOKEN}' markers for {num_images} image(s)")
    if found < num_images:
        first = next((m for m in messages if m["role"] == "user"), None)
        if first is None:
            raise ValueError("messages: no user turn to put the image in")
        first["content"] = (IMAGE_TOKEN + "\n") * (num_images - found) + first["content"]
    return messages


def render(tokenizer, messages: Sequence[dict], template: str, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def _special_tokens(tokenizer) -> tuple[str, ...]:
    added = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special]
    tokens = set(tokenizer.all_special_tokens) | set(added)
    tokens.discard(IMAGE_TOKEN)
    return tuple(sorted(tokens, key=len, reverse=True))


def _special_at(tokenizer, text: str, position: int) -> str:
    """The special token written at ``text[position:]`` ("" when there is none)."""
    return next((t for t in _special_tokens(tokenizer) if text.startswith(t, position)), "")


def assistant_spans(tokenizer, messages: Sequence[dict], template: str) -> tuple[str, list[tuple[int, int]]]:
    """(whole rendered text, [(start, end) of each assistant turn's content + its end-of-turn token])."""
    full = render(tokenizer, messages, template, add_generation_prompt=False)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if k == 0:
            raise ValueError("messages[0]: a conversation cannot start with an assistant turn")
        before = render(tokenizer, messages[:k], template, add_generation_prompt=True)
        upto = render(tokenizer, messages[:k + 1], template, add_generation_prompt=False)
        if not upto.startswith(before) or not full.startswith(upto):
            raise ValueError(f"chat template: the text rendered for messages[:{k}] is not a prefix of the whole "
                             "conversation's (the template rewrites earlier turns); its assistant turns cannot be "
                             "located for the label mask: set model.chat_template to a prefix-stable template")
        content = message["content"].strip()
        start = upto.find(content, len(before)) if content else -1
        if start < 0:
            raise ValueError(f"messages[{k}]: the assistant's content {content[:60]!r} is empty or not found in the "
                             "rendered text; the label mask would cover nothing")
        end = start + len(content)
        # Everything after the generation prompt is the model's to produce: a separator the template writes
        # before the content (" " after "assistant:", when the tokenizer has no " yes") is trained too.
        spans.append((len(before), end + len(_special_at(tokenizer, upto, end))))
    return full, spans


def conversation_segments(tokenizer, messages: Sequence[dict], setting: str | None = "auto"
                          ) -> list[Segment]:
    """The conversation as segments, assistant turns (+ their end-of-turn token) trained; nothing is kept
    after the last assistant turn. Raises ValueError for a conversation without an assistant turn."""
    messages = check_messages(messages)
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("messages: no assistant turn; nothing to train on")
    template = resolve_template(tokenizer, setting)
    if template is None:
        return _plain_segments(tokenizer, messages, final=False)
    text, spans = assistant_spans(tokenizer, messages, template)
    segments, at = [], 0
    for start, end in spans:
        if start > at:
            segments.append(Segment(text[at:start]))
        segments.append(Segment(text[start:end], train=True))
        at = end
    return segments


def prompt_segments(tokenizer, messages: Sequence[dict], setting: str | None = "auto") -> list[Segment]:
    """The generation prompt: the rendered text with ``add_generation_prompt=True`` (one untrained segment)."""
    messages = check_messages(messages)
    template = resolve_template(tokenizer, setting)
    if template is None:
        return _plain_segments(tokenizer, messages, final=True)
    return [Segment(render(tokenizer, messages, template, add_generation_prompt=True))]


def _plain_segments(tokenizer, messages: list[dict], final: bool) -> list[Segment]:
    """``none``: the contents in order; an assistant turn follows after a space (``join_answer``) and ends
    with EOS. ``final``: a prompt for the next assistant turn (everything up to it)."""
    segments, previous = [], ""
    for message in messages:
        if message["role"] == "assistant":
            content = join_answer(previous, message["content"].strip())
            segments.append(Segment(content + tokenizer.eos_token, train=True))
        else:
            content = message["content"] if not segments else " " + message["content"]
            segments.append(Segment(content))
        previous = content
    if not final:
        while segments and not segments[-1].train:
            segments.pop()
    return segments


@functools.lru_cache(maxsize=32)
def _end_of_turn(tokenizer, template: str) -> str:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    text = render(tokenizer, messages, template, add_generation_prompt=False)
    return _special_at(tokenizer, text, text.index(_PROBE) + len(_PROBE))


def stop_token_ids(tokenizer, setting: str | None = "auto") -> list[int]:
    """Token ids that end an assistant turn in this format (``<|im_end|>``, ``<|eot_id|>``; EOS is added by
    generation itself)."""
    template = resolve_template(tokenizer, setting)
    token = _end_of_turn(tokenizer, template) if template is not None else ""
    return [tokenizer.convert_tokens_to_ids(token)] if token else []


# ----------------------------------------------------------------------------------------- the model's side


def _setting(model: VisionLanguageModel) -> str:
    return getattr(model.config, "chat_template", "auto")


def _start_id(model: VisionLanguageModel) -> int | None:
    """A template writes its own BOS (or none); the plain layout starts with the model's start token."""
    return model.start_token_id if resolve_template(model.tokenizer, _setting(model)) is None else None


def encode_conversation(model: VisionLanguageModel, messages: Sequence[dict], num_images: int = 1
                        ) -> EncodedSequence:
    """Training ids and labels of a conversation with ``num_images`` images (markers added where missing)."""
    segments = conversation_segments(model.tokenizer, with_image_markers(check_messages(messages), num_images),
                                     _setting(model))
    return encode_segments(model.tokenizer, segments, image_token_id=model.image_token_id,
                           num_image_tokens=model.num_image_tokens, start_token_id=_start_id(model))


def encode_prompt(model: VisionLanguageModel, messages: Sequence[dict], num_images: int = 1) -> list[int]:
    """Generation-prompt ids of a conversation (the next assistant turn follows)."""
    return prompt_ids(model.tokenizer, messages, num_images, _setting(model), image_token_id=model.image_token_id,
                      num_image_tokens=model.num_image_tokens, start_token_id=_start_id(model))


def prompt_ids(tokenizer, messages: Sequence[dict], num_images: int, setting: str | None, *, image_token_id: int,
               num_image_tokens: int, start_token_id: int | None = None) -> list[int]:
    """:func:`encode_prompt` from a tokenizer alone (processors have no model)."""
    segments = prompt_segments(tokenizer, with_image_markers(check_messages(messages), num_images), setting)
    return encode_segments(tokenizer, segments, image_token_id=image_token_id, num_image_tokens=num_image_tokens,
                           start_token_id=start_token_id).input_ids


def prepare_conversations(model: VisionLanguageModel, pixel_values: torch.Tensor | None,
                          conversations: Sequence[Sequence[dict]], image_counts: Sequence[int] | None = None
                          ) -> dict[str, torch.Tensor]:
    """Training tensors (right-padded), loss on the assistant turns only. ``pixel_values``: one image per
    conversation, or with ``image_counts`` all the batch's images in conversation order (``image_counts[i]``, at
    most ``model.max_images``, of them conversation i's, placed by its ``<image>`` markers); the output then has
    ``image_counts`` too (not when every conversation has one image: the single-image path stays as it is).
    Each sample is cut to ``model.max_length`` text tokens; one with no trained token left, or cut inside its
    images, raises ValueError."""
    n, total = len(conversations), 0 if pixel_values is None else len(pixel_values)
    counts = [1] * n if image_counts is None else [int(c) for c in image_counts]
    if len(counts) != n or sum(counts) != total:
        raise ValueError(f"prepare_conversations: {total} images for {n} conversations with image_counts "
                         f"{image_counts}; expected one image per conversation or image_counts adding up to {total}")
    limit, rows, label_rows = model.config.max_images, [], []
    for i, (messages, k) in enumerate(zip(conversations, counts)):
        if k > limit:
            raise ValueError(f"conversation {i}: {k} images, more than model.max_images={limit}")
        sample = encode_conversation(model, messages, k)
        placeholders = sample.input_ids.count(model.image_token_id)
        sample = sample.truncate(model.config.max_length + placeholders)
        if sample.input_ids.count(model.image_token_id) != placeholders:
            raise ValueError(f"conversation {i}: max_length={model.config.max_length} text tokens end before its "
                             f"image(s) ({k}) all fit; raise model.max_length")
        if sample.first_label is None:
            raise ValueError(f"conversation {i}: no assistant token within max_length={model.config.max_length} "
                             "text tokens; raise model.max_length")
        rows.append(sample.input_ids)
        label_rows.append(sample.labels)
    input_ids, attention_mask = tokens_to_tensor(rows, model.pad_token_id, left=False)
    labels, _ = tokens_to_tensor(label_rows, IGNORE_INDEX, left=False)
    device = pixel_values.device if pixel_values is not None else model.device
    out = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
           "labels": labels.to(device), "pixel_values": pixel_values}
    if image_counts is not None and any(c != 1 for c in counts):
        out["image_counts"] = counts
    return out


def _generation(model: VisionLanguageModel, options: dict):
    from mmlm.models import generation

    config = generation.resolve_config(model, options.pop("generation_config", None), **options)
    return generation, config, stop_token_ids(model.tokenizer, _setting(model))


def chat(model: VisionLanguageModel, images: Any, messages: Sequence[dict], stream: bool = False,
         **options) -> str | Iterator[str]:
    """The next assistant reply to ``messages`` about ``images`` (one image, a list, or none); with
    ``stream=True`` an iterator of text pieces. ``options``: generation options (``generation.resolve_config``)."""
    from mmlm.models.inference import eval_mode

    images = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
    _check_image_limit(model, len(images), "chat")
    options.setdefault("max_new_tokens", 64)
    generation, config, stops = _generation(model, options)
    row = encode_prompt(model, messages, len(images))
    pixels = model.pixel_values(images) if images else None
    counts = None if len(images) == 1 else [len(images)]
    if stream:
        return generation.stream(model, row, pixels, config, stops, image_counts=counts)
    with eval_mode(model):
        rows = generation.generate_rows(model, [row], pixels, config, stops, image_counts=counts)
        return generation._texts(model, rows)[0]


def _check_image_limit(model: VisionLanguageModel, n: int, where: str) -> None:
    if n > model.config.max_images:
        raise ValueError(f"{where}: {n} images for one conversation, more than model.max_images="
                         f"{model.config.max_images}")


def answer_pixels(model: VisionLanguageModel, pixel_values: torch.Tensor, questions: Sequence[str],
                  image_counts: Sequence[int] | None = None, **options) -> list[str]:
    """Short answers to one question per preprocessed image, batched (greedy unless told otherwise). With
    ``image_counts``: ``pixel_values`` holds every question's images in order, ``image_counts[i]`` for question i
    (its ``<image>`` markers place them; missing ones go first)."""
    from mmlm.models.inference import eval_mode

    total = 0 if pixel_values is None else pixel_values.shape[0]
    counts = [1] * len(questions) if image_counts is None else [int(c) for c in image_counts]
    if len(counts) != len(questions) or sum(counts) != total:
        raise ValueError(f"answer: {len(questions)} questions for {total} images (image_counts "
                         f"{image_counts}); expected one image per question or image_counts adding up to the images")
    for k in counts:
        _check_image_limit(model, k, "answer")
    options.setdefault("max_new_tokens", 16)
    generation, config, stops = _generation(model, options)
    rows = [encode_prompt(model, [{"role": "user", "content": q}], k) for q, k in zip(questions, counts)]
    counts = None if all(k == 1 for k in counts) else counts
    pixels = None if pixel_values is None else pixel_values.to(model.device)
    with eval_mode(model):
        return generation._texts(model, generation.generate_rows(model, rows, pixels, config, stops,
                                                                 image_counts=counts))


def answer(model: VisionLanguageModel, images: Any, questions: str | Sequence[str], batch_size: int = 32,
           progress: bool = False, **options) -> list[str]:
    """``VisionLanguageModel.answer``: one question for all images or one per image; an item of ``images`` that
    is itself a list is one question's several images (``[[a, b], c]``: two images for the first question)."""
    from mmlm.models.inference import as_image_list, batch_starts

    groups = [list(g) if isinstance(g, (list, tuple)) else [g] for g in as_image_list(images)]
    questions = [questions] * len(groups) if isinstance(questions, str) else list(questions)
    if len(questions) != len(groups):
        raise ValueError(f"questions: {len(questions)} for {len(groups)} images; give one or one per image")
    out: list[str] = []
    for start in batch_starts(len(groups), batch_size, progress, "answer"):
        batch = groups[start:start + batch_size]
        counts, flat = [len(g) for g in batch], [im for g in batch for im in g]
        out += answer_pixels(model, model.pixel_values(flat) if flat else None,
                             questions[start:start + batch_size],
                             image_counts=None if all(k == 1 for k in counts) else counts, **dict(options))
    return out
