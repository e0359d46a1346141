"""Caption and classify prompts in the LM's own format: one rendering for training, ``caption`` and ``classify``.

A caption prompt with its caption, or a classify template's text before the slot with a label, is rendered one
of two ways, chosen by ``caption_template``:

* **plain**, ``[start] <image> prompt answer [eos]`` (``VisionLanguageModel.encode_sample`` / ``prompt_ids``):
  under ``model.chat_template: none``, and under ``auto`` for a tokenizer without a chat template of its own
  (the small ones we train), so the shapes recipes and the models saved with them keep their prompts;
* **chat**: one user turn (``<image>\\n`` + prompt; a prompt with its own ``<image>`` marker places the image
  itself) and the answer as the assistant's reply, ended by the template's end-of-turn token
  (``<|im_end|>``, ``<|eot_id|>``) where the plain layout has EOS. The generation prompt is exactly
  ``apply_chat_template([user turn], add_generation_prompt=True)``. Under ``auto`` for a tokenizer with its own
  template (an instruct LM's), and for a Jinja template given as ``model.chat_template``.

Training (``prepare_captions``), generation (``caption_prompt_ids``, ``caption_stop_ids``) and label scoring
(``encode_caption``) all go through here, so they see the same tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from mmlm.models import chat
from mmlm.models.language import IMAGE_TOKEN
from mmlm.models.sequence import EncodedSequence, check_prompt

if TYPE_CHECKING:  # pragma: no cover
    from mmlm.models.vlm import VisionLanguageModel


def caption_template(model: VisionLanguageModel) -> str | None:
    """The chat template caption and classify prompts render with; None: the plain layout."""
    return tokenizer_caption_template(model.tokenizer, getattr(model.config, "chat_template", "auto"))


def tokenizer_caption_template(tokenizer, setting: str | None) -> str | None:
    """:func:`caption_template` from a tokenizer and the ``model.chat_template`` setting (a saved folder's processor)."""
    if setting is None or setting == "auto":
        return getattr(tokenizer, "chat_template", None) or None
    return chat.resolve_template(tokenizer, setting)


def caption_messages(prompt: str, answer: str | None = None) -> list[dict[str, str]]:
    """The prompt as one user turn with its image (and ``answer``, stripped, as the assistant's reply)."""
    check_prompt(prompt, "prompt")
    user = prompt if IMAGE_TOKEN in prompt else IMAGE_TOKEN + ("\n" + prompt if prompt else "")
    messages = [{"role": "user", "content": user}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer.strip()})
    return messages


def encode_caption(model: VisionLanguageModel, prompt: str | None, answer: str, eos: bool = True
                   ) -> EncodedSequence:
    """``prompt`` + ``answer`` with the answer trained, as training and label scoring see them; ``eos=False``
    leaves out the EOS (plain) or end-of-turn token (chat) after the answer."""
    prompt = model.config.prompt if prompt is None else prompt
    if caption_template(model) is None:
        return model.encode_sample(prompt, answer, eos=eos)
    sample = chat.encode_conversation(model, caption_messages(prompt, answer), 1)
    if not eos and sample.input_ids[-1] in caption_stop_ids(model):
        sample = sample.truncate(len(sample) - 1)
    return sample


def caption_prompt_ids(model: VisionLanguageModel, prompt: str | None) -> list[int]:
    """The generation prompt of a caption (image placeholders spliced in): what ``caption`` continues."""
    prompt = model.config.prompt if prompt is None else prompt
    if caption_template(model) is None:
        return model.prompt_ids(prompt)
    return chat.encode_prompt(model, caption_messages(prompt), 1)


def caption_stop_ids(model: VisionLanguageModel) -> list[int]:
    """Token ids that end a generated caption besides EOS: the template's end of turn (none for plain)."""
    if caption_template(model) is None:
        return []
    return chat.stop_token_ids(model.tokenizer, getattr(model.config, "chat_template", "auto"))


def prepare_captions(model: VisionLanguageModel, pixel_values: torch.Tensor, captions: Sequence[str],
                     prompts: Sequence[str | None] | None = None) -> dict[str, torch.Tensor]:
    """Training tensors of captions (or classify targets) after their prompts (``None``: ``model.prompt``): the
    plain layout through ``model.prepare_batch`` (unchanged), the chat one through ``chat.prepare_conversations``
    (labels on the reply and its end-of-turn token only)."""
    if caption_template(model) is None:
        return model.prepare_batch(pixel_values, captions, prompts)
    n = len(captions)
    prompts = [None] * n if prompts is None else list(prompts)
    if len(prompts) != n or pixel_values.shape[0] != n:
        raise ValueError(f"prepare_captions: {pixel_values.shape[0]} images, {n} captions and {len(prompts)} "
                         "prompts; expected one of each per sample")
    for i, caption in enumerate(captions):
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"captions[{i}]: expected a non-empty string, got {caption!r}")
    conversations = [caption_messages(model.config.prompt if p is None else p, c) for p, c in zip(prompts, captions)]
    return chat.prepare_conversations(model, pixel_values, conversations)
