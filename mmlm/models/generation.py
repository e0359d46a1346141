"""Text generation for VisionLanguageModel: captions, chat replies and text-only continuations.

Every option of transformers' ``GenerationConfig`` passes through (``top_k``, ``repetition_penalty``,
``min_new_tokens``, ``stop_strings``, ``num_return_sequences``, ... or a whole ``generation_config``), over the
LM's own ``generation_config`` as the default (e.g. Qwen2.5-Instruct's ``repetition_penalty=1.05``), in every
path. Settings the own KV-cached loop (``decode``) is proven equal to ``generate()`` on (``uses_fast_loop``:
greedy, and sampling with temperature / top_k / top_p; tests/test_generation_options.py) run there: ``generate()``'s
per-step bookkeeping costs more than a tiny LM. Everything else goes through ``generate()`` on ``inputs_embeds``
(``decode_with_generate``). Prompts are left-padded; positions come from the attention mask. A ``streamer``
(transformers' ``TextStreamer`` / ``TextIteratorStreamer``) gets the tokens as they come in either path.
"""

from __future__ import annotations

import copy
import threading
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from transformers import GenerationConfig, TextIteratorStreamer
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from mmlm.models.inference import as_image_list, batch_starts, eval_mode
from mmlm.models.language import output_cache, tokens_to_tensor
from mmlm.models.rendering import caption_prompt_ids, caption_stop_ids
from mmlm.models.sequence import positions_from_mask

if TYPE_CHECKING:  # pragma: no cover
    from mmlm.models.vlm import VisionLanguageModel

DEFAULTS = GenerationConfig._get_default_generation_params()  # what generate() fills unset fields with
SAMPLING_KEYS = ("temperature", "top_k", "top_p")  # the fast loop applies these when sampling
# Fields that do not change which tokens come out (or that every path sets itself).
NEUTRAL_KEYS = {"max_length", "max_new_tokens", "min_length", "use_cache", "pad_token_id", "bos_token_id",
                "eos_token_id", "decoder_start_token_id", "transformers_version", "_from_model_config",
                "cache_implementation", "cache_config", "max_cache_len", "compile_config", "disable_compile",
                "prefill_chunk_size", "output_scores", "output_logits", "return_dict_in_generate",
                "output_attentions", "output_hidden_states", "num_assistant_tokens", "num_assistant_tokens_schedule",
                "assistant_confidence_threshold", "assistant_lookbehind", "target_lookbehind"}


def resolve_config(model: VisionLanguageModel, generation_config: GenerationConfig | None = None,
                   **options: Any) -> GenerationConfig:
    """``generation_config`` (default: the LM's own) updated with the options that are not None.

    Raises TypeError naming an option that is not a ``GenerationConfig`` field.
    """
    base = generation_config if generation_config is not None else getattr(model.language_model,
                                                                            "generation_config", None)
    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    unused = config.update(**{k: v for k, v in options.items() if v is not None})
    if unused:
        raise TypeError(f"unknown generation option(s) {', '.join(sorted(unused))}; expected fields of "
                        "transformers.GenerationConfig (max_new_tokens, do_sample, temperature, top_k, top_p, "
                        "repetition_penalty, min_new_tokens, stop_strings, num_beams, num_return_sequences, ...)")
    if config.max_new_tokens is not None and config.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected >= 1, got {config.max_new_tokens}")
    if config.num_beams is not None and config.num_beams < 1:
        raise ValueError(f"num_beams: expected >= 1, got {config.num_beams}")
    return config


def effective(config: GenerationConfig, key: str) -> Any:
    """The value generate() uses for ``key``: the config's, else transformers' default."""
    value = getattr(config, key, None)
    return DEFAULTS.get(key) if value is None else value


def uses_fast_loop(config: GenerationConfig) -> bool:
    """True when the own loop gives what ``generate()`` gives: one beam, one sequence, no logits processor
    beyond temperature / top_k / top_p (and those only matter when sampling)."""
    for key, value in config.to_dict().items():
        if key in NEUTRAL_KEYS or key == "do_sample" or key in SAMPLING_KEYS:  # the loop applies these
            continue
        if key == "min_new_tokens":
            if value not in (None, 0):
                return False
            continue
        if key in DEFAULTS:
            if effective(config, key) != DEFAULTS[key]:
                return False
        elif value is not None:
            return False
    return True


def strip_eos(rows: list[list[int]], stop_ids: int | Sequence[int]) -> list[list[int]]:
    """Each row cut before its first stop id (rows without one are kept whole)."""
    stops = {stop_ids} if isinstance(stop_ids, int) else set(stop_ids)
    return [next((row[:i] for i, t in enumerate(row) if t in stops), row) for row in rows]


def _stop_ids(model: VisionLanguageModel, extra: Sequence[int] = ()) -> list[int]:
    ids = [model.eos_token_id, *extra]
    return list(dict.fromkeys(i for i in ids if i is not None))


def decode(model: VisionLanguageModel, embeds: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
           do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, *, top_k: int | None = None,
           stop_token_ids: Sequence[int] = (), streamer=None) -> list[list[int]]:
    """KV-cached greedy / sampling loop; with sampling, the warpers and their order are generate()'s
    (temperature, top_k, top_p), then one ``torch.multinomial`` draw per step, as generate() draws."""
    batch = embeds.shape[0]
    stops = torch.tensor(_stop_ids(model, stop_token_ids), device=embeds.device)
    positions = positions_from_mask(attention_mask)
    padded = not bool(attention_mask.all())  # unpadded: no mask at all, the LM's causal kernel path is cheaper
    out = model.lm_step(inputs_embeds=embeds, attention_mask=attention_mask if padded else None,
                        position_ids=positions, **model.last_logits_only)
    next_position = positions[:, -1:] + 1
    warpers = []
    if do_sample:
        if temperature is not None and temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p is not None and top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
    if streamer is not None:
        streamer.put(torch.empty(batch, 0, dtype=torch.long))  # the prompt, as generate() sends it (embeds only)
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
        if streamer is not None:
            streamer.put(token.cpu())
        finished |= torch.isin(token, stops)
        if finished.all() or step == max_new_tokens - 1:
            break
        if padded:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
        out = model.lm_step(output_cache(out), input_ids=token[:, None],
                            attention_mask=attention_mask if padded else None, position_ids=next_position)
        next_position = next_position + 1
    if streamer is not None:
        streamer.end()
    tokens = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in range(batch)]
    return strip_eos(tokens, _stop_ids(model, stop_token_ids))


def decode_with_generate(model: VisionLanguageModel, embeds: torch.Tensor, attention_mask: torch.Tensor,
                         max_new_tokens: int | None = None, *, stop_token_ids: Sequence[int] = (),
                         **kwargs) -> list[list[int]]:
    """transformers' generate() on inputs_embeds (rows: the new tokens only, cut at the first stop id);
    ``kwargs`` go to generate() (a ``generation_config``, any of its fields, a ``streamer``)."""
    stops = _stop_ids(model, stop_token_ids)
    if kwargs.get("stop_strings") or getattr(kwargs.get("generation_config"), "stop_strings", None):
        kwargs.setdefault("tokenizer", model.tokenizer)  # generate() needs it to match stop strings
    if max_new_tokens is not None:
        kwargs["max_new_tokens"] = max_new_tokens
    out = model.language_model.generate(inputs_embeds=embeds, attention_mask=attention_mask,
                                        eos_token_id=stops, pad_token_id=model.pad_token_id, **kwargs)
    return strip_eos(out.tolist(), stops)


def _texts(model: VisionLanguageModel, rows: list[list[int]]) -> list[str]:
    texts = model.tokenizer.batch_decode(rows, skip_special_tokens=True)
    return [text[1:] if text.startswith(" ") else text for text in texts]  # the space sequence.join_answer adds


@torch.inference_mode()  # returns token ids as lists: no inference tensor leaks out
def generate_rows(model: VisionLanguageModel, prefix_rows: list[list[int]], pixel_values: torch.Tensor | None,
                  config: GenerationConfig, stop_token_ids: Sequence[int] = (), streamer=None,
                  image_counts: Sequence[int] | None = None) -> list[list[int]]:
    """New token ids after each of ``prefix_rows`` (with their images when ``pixel_values``: one per row, or
    ``image_counts[i]`` for row i, as ``VisionLanguageModel.embed`` takes them), under ``config`` (see
    ``resolve_config``); ``num_return_sequences`` rows per prompt, in order."""
    input_ids, attention_mask = tokens_to_tensor(prefix_rows, model.pad_token_id, left=True)
    input_ids, attention_mask = input_ids.to(model.device), attention_mask.to(model.device)
    embeds = model.embed(input_ids, pixel_values, image_counts)
    max_new_tokens = config.max_new_tokens if config.max_new_tokens is not None else 32
    if uses_fast_loop(config):
        return decode(model, embeds, attention_mask, max_new_tokens, bool(effective(config, "do_sample")),
                      effective(config, "temperature"), effective(config, "top_p"), top_k=effective(config, "top_k"),
                      stop_token_ids=stop_token_ids, streamer=streamer)
    return decode_with_generate(model, embeds, attention_mask, max_new_tokens, generation_config=config,
                                stop_token_ids=stop_token_ids, streamer=streamer)


def generate(model: VisionLanguageModel, prefix_rows: list[list[int]], pixel_values: torch.Tensor | None,
             max_new_tokens: int | None = None, num_beams: int | None = None, do_sample: bool | None = None,
             temperature: float | None = None, top_p: float | None = None, *, stop_token_ids: Sequence[int] = (),
             generation_config: GenerationConfig | None = None, **options) -> list[str]:
    """Decoded continuations of the token rows ``prefix_rows``; options as in ``resolve_config``."""
    config = resolve_config(model, generation_config, max_new_tokens=max_new_tokens, num_beams=num_beams,
                            do_sample=do_sample, temperature=temperature, top_p=top_p, **options)
    return _texts(model, generate_rows(model, prefix_rows, pixel_values, config, stop_token_ids))


def stream(model: VisionLanguageModel, prefix_row: list[int], pixel_values: torch.Tensor | None,
           config: GenerationConfig, stop_token_ids: Sequence[int] = (), timeout: float = 600.0,
           image_counts: Sequence[int] | None = None) -> Iterator[str]:
    """Text pieces of one continuation as they are generated (a worker thread decodes; transformers'
    ``TextIteratorStreamer`` hands the pieces over). An error in the worker is raised here."""
    if effective(config, "num_return_sequences") != 1 or effective(config, "num_beams") != 1:
        raise ValueError("stream=True: expected num_beams=1 and num_return_sequences=1 (one sequence to stream)")
    streamer = TextIteratorStreamer(model.tokenizer, skip_prompt=True, timeout=timeout, skip_special_tokens=True)
    failure: list[BaseException] = []

    def work():
        try:
            with eval_mode(model):
                generate_rows(model, [prefix_row], pixel_values, config, stop_token_ids, streamer, image_counts)
        except BaseException as err:  # noqa: BLE001  (re-raised in the consuming thread)
            failure.append(err)
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    first = True
    for piece in streamer:
        if first and piece:
            piece, first = (piece[1:] if piece.startswith(" ") else piece), False
        if piece:
            yield piece
    thread.join()
    if failure:
        raise failure[0]


def caption(model: VisionLanguageModel, images: Any, prompt: str | Sequence[str] | None,
            max_new_tokens: int | None = 32, num_beams: int | None = None, do_sample: bool | None = None,
            temperature: float | None = None, top_p: float | None = None, batch_size: int = 32,
            progress: bool = False, **options) -> list[str]:
    """``VisionLanguageModel.caption``: images in batches of ``batch_size``."""
    images = as_image_list(images)
    prompts = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt] * len(images)
    if len(prompts) != len(images):
        raise ValueError(f"prompt: {len(prompts)} prompts for {len(images)} images; give one or one per image")
    captions: list[str] = []
    for start in batch_starts(len(images), batch_size, progress, "caption"):
        captions += caption_pixels(model, model.pixel_values(images[start:start + batch_size]),
                                   prompts[start:start + batch_size], max_new_tokens, num_beams,
                                   do_sample, temperature, top_p, **options)
    return captions


def caption_pixels(model: VisionLanguageModel, pixel_values: torch.Tensor, prompt: str | Sequence[str] | None,
                   max_new_tokens: int | None = 32, num_beams: int | None = None, do_sample: bool | None = None,
                   temperature: float | None = None, top_p: float | None = None, **options) -> list[str]:
    """``VisionLanguageModel.caption_pixels``: one batch of preprocessed images, each prompt rendered as training
    renders it (plain, or a user turn in the LM's chat template: ``mmlm.models.rendering``)."""
    n = pixel_values.shape[0]
    prompts = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt] * n
    rows = {p: caption_prompt_ids(model, p) for p in dict.fromkeys(prompts)}
    with eval_mode(model):
        return generate(model, [rows[p] for p in prompts], pixel_values.to(model.device), max_new_tokens,
                        num_beams, do_sample, temperature, top_p, stop_token_ids=caption_stop_ids(model), **options)


def generate_text(model: VisionLanguageModel, prompt: str, max_new_tokens: int | None = 32,
                  num_beams: int | None = None, do_sample: bool | None = None, temperature: float | None = None,
                  top_p: float | None = None, **options) -> str:
    """``VisionLanguageModel.generate_text``: a text-only continuation."""
    with eval_mode(model):
        rows = [model.prompt_ids(prompt, with_image=False)]
        return generate(model, rows, None, max_new_tokens, num_beams, do_sample, temperature, top_p, **options)[0]
