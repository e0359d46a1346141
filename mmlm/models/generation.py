"""Text generation for VisionLanguageModel: captions and text-only continuations.

Greedy decoding and sampling run in an own KV-cached loop (``decode``); beam search and other
strategies go through transformers' ``generate`` on ``inputs_embeds`` (``decode_with_generate``).
Prompts are left-padded; positions come from the attention mask.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from mmlm.models.inference import as_image_list, batch_starts, eval_mode
from mmlm.models.language import output_cache, tokens_to_tensor
from mmlm.models.sequence import positions_from_mask

if TYPE_CHECKING:  # pragma: no cover
    from mmlm.models.vlm import VisionLanguageModel


def strip_eos(rows: list[list[int]], eos_token_id: int) -> list[list[int]]:
    """Each row cut before its first EOS (rows without one are kept whole)."""
    return [row[: row.index(eos_token_id)] if eos_token_id in row else row for row in rows]


def decode(model: VisionLanguageModel, embeds: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
           do_sample: bool, temperature: float, top_p: float) -> list[list[int]]:
    """KV-cached greedy / sampling loop (no generate(): its per-step bookkeeping costs more than the tiny LM)."""
    batch = embeds.shape[0]
    positions = positions_from_mask(attention_mask)
    padded = not bool(attention_mask.all())  # unpadded: no mask at all, the LM's causal kernel path is cheaper
    out = model.lm_step(inputs_embeds=embeds, attention_mask=attention_mask if padded else None,
                        position_ids=positions, **model.last_logits_only)
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
        token = token.masked_fill(finished, model.pad_token_id)
        generated.append(token)
        finished |= token == model.eos_token_id
        if finished.all() or step == max_new_tokens - 1:
            break
        if padded:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
        out = model.lm_step(output_cache(out), input_ids=token[:, None],
                            attention_mask=attention_mask if padded else None, position_ids=next_position)
        next_position = next_position + 1
    tokens = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in range(batch)]
    return strip_eos(tokens, model.eos_token_id)


def decode_with_generate(model: VisionLanguageModel, embeds: torch.Tensor, attention_mask: torch.Tensor,
                         max_new_tokens: int, **kwargs) -> list[list[int]]:
    """transformers' generate() on inputs_embeds: beam search and other strategies."""
    out = model.language_model.generate(
        inputs_embeds=embeds, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
        eos_token_id=model.eos_token_id, pad_token_id=model.pad_token_id, **kwargs,
    )
    return strip_eos(out.tolist(), model.eos_token_id)


@torch.inference_mode()  # returns token ids as lists: no inference tensor leaks out
def generate(model: VisionLanguageModel, prefix_rows: list[list[int]], pixel_values: torch.Tensor | None,
             max_new_tokens: int, num_beams: int, do_sample: bool, temperature: float, top_p: float) -> list[str]:
    """Decoded continuations of the token rows ``prefix_rows`` (with their images when ``pixel_values``)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
    if num_beams < 1:
        raise ValueError(f"num_beams: expected >= 1, got {num_beams}")
    input_ids, attention_mask = tokens_to_tensor(prefix_rows, model.pad_token_id, left=True)
    input_ids, attention_mask = input_ids.to(model.device), attention_mask.to(model.device)
    embeds = model.embed(input_ids, pixel_values)
    if num_beams == 1:
        rows = decode(model, embeds, attention_mask, max_new_tokens, do_sample, temperature, top_p)
    else:
        rows = decode_with_generate(model, embeds, attention_mask, max_new_tokens, num_beams=num_beams,
                                    do_sample=do_sample, temperature=temperature, top_p=top_p)
    return model.tokenizer.batch_decode(rows, skip_special_tokens=True)


def caption(model: VisionLanguageModel, images: Any, prompt: str | Sequence[str] | None, max_new_tokens: int,
            num_beams: int, do_sample: bool, temperature: float, top_p: float, batch_size: int,
            progress: bool) -> list[str]:
    """``VisionLanguageModel.caption``: images in batches of ``batch_size``."""
    images = as_image_list(images)
    prompts = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt] * len(images)
    if len(prompts) != len(images):
        raise ValueError(f"prompt: {len(prompts)} prompts for {len(images)} images; give one or one per image")
    captions: list[str] = []
    for start in batch_starts(len(images), batch_size, progress, "caption"):
        captions += caption_pixels(model, model.pixel_values(images[start:start + batch_size]),
                                   prompts[start:start + batch_size], max_new_tokens, num_beams,
                                   do_sample, temperature, top_p)
    return captions


def caption_pixels(model: VisionLanguageModel, pixel_values: torch.Tensor, prompt: str | Sequence[str] | None,
                   max_new_tokens: int, num_beams: int, do_sample: bool, temperature: float,
                   top_p: float) -> list[str]:
    """``VisionLanguageModel.caption_pixels``: one batch of preprocessed images."""
    n = pixel_values.shape[0]
    prompts = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt] * n
    with eval_mode(model):
        return generate(model, [model.prompt_ids(p) for p in prompts], pixel_values.to(model.device),
                        max_new_tokens, num_beams, do_sample, temperature, top_p)


def generate_text(model: VisionLanguageModel, prompt: str, max_new_tokens: int, num_beams: int, do_sample: bool,
                  temperature: float, top_p: float) -> str:
    """``VisionLanguageModel.generate_text``: a text-only continuation."""
    with eval_mode(model):
        rows = [model.prompt_ids(prompt, with_image=False)]
        return generate(model, rows, None, max_new_tokens, num_beams, do_sample, temperature, top_p)[0]
