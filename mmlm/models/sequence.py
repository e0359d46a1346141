"""The VLM's token sequences: text segments -> input ids and labels, tokenised as one whole text.

A sample is a list of :class:`Segment` s, each a piece of text flagged ``train`` (the model learns to
produce it: its tokens carry labels) or not (prompt, system text, chat scaffolding: label -100).
:func:`encode_segments` joins the texts, tokenises the WHOLE string once with the fast tokenizer's
offset mapping, and assigns every token to the segments its characters come from. Gluing
separately tokenised pieces instead goes wrong for SentencePiece ("▁red" inside a sentence, but
"▁" + "red" or a stray "▁" when " red" is tokenised alone) and loses the space between a prompt and
its answer; here a token is exactly what the LM sees inside the whole sentence. The model, label
scoring and the chat-template helper all build their sequences through this one function.
"""

from __future__ import annotations

import dataclasses
import unicodedata
from typing import Sequence

import torch

from mmlm.models.language import IMAGE_TOKEN

IGNORE_INDEX = -100  # label of every position that is not part of the answer


@dataclasses.dataclass(frozen=True)
class Segment:
    """A piece of a sample's text. ``train``: its tokens are labels (the answer / assistant turns).
    ``<image>`` markers may appear in untrained segments only; each becomes the image's placeholders."""

    text: str
    train: bool = False


@dataclasses.dataclass
class EncodedSequence:
    """``input_ids`` and ``labels`` line up position by position (labels unshifted: the forward shifts).
    ``segments[t]``: the index of the segment token t comes from (-1 for the start, image and EOS ids)."""

    input_ids: list[int]
    labels: list[int]
    segments: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    def truncate(self, length: int) -> "EncodedSequence":
        return EncodedSequence(self.input_ids[:length], self.labels[:length], self.segments[:length])

    @property
    def first_label(self) -> int | None:
        """Index of the first trained token (None when nothing is trained)."""
        return next((t for t, label in enumerate(self.labels) if label != IGNORE_INDEX), None)


def encode_segments(tokenizer, segments: Sequence[Segment], *, image_token_id: int, num_image_tokens: int,
                    start_token_id: int | None = None, eos_token_id: int | None = None,
                    image_first: bool = False) -> EncodedSequence:
    """Token ids and labels of ``segments``, tokenised as one text.

    * The texts are concatenated as given (no separators are added: see :func:`join_answer`) and
      tokenised once with ``add_special_tokens=False`` and ``return_offsets_mapping=True``; special
      tokens written in the text (``<|im_end|>``, ``<|eot_id|>``) become their single ids.
    * A token is trained (label = its id) when any of its characters lies in a ``train`` segment:
      a token that straddles a prompt/answer boundary (possible in scripts without spaces) belongs to
      the answer, since the model has to produce it.
    * Each ``<image>`` in the text becomes ``num_image_tokens`` placeholders ``image_token_id`` (label
      -100); ``image_first=True`` puts them right after the start token instead (for a prompt without
      a marker). ``start_token_id`` (BOS) is prepended, ``eos_token_id`` appended, trained when the
      last segment is.

    Raises ValueError for an ``<image>`` inside a trained segment and TypeError for a slow tokenizer
    (no offset mapping: use its fast version, ``use_fast=True``).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"encode_segments: {type(tokenizer).__name__} is not a fast tokenizer (no offset mapping); "
                        "load the tokenizer with use_fast=True or convert it with transformers' convert_slow_tokenizer")
    bounds, text, offset = [], [], 0
    for i, segment in enumerate(segments):
        if segment.train and IMAGE_TOKEN in segment.text:
            raise ValueError(f"segment {i}: '{IMAGE_TOKEN}' in a trained segment {segment.text!r}; "
                             "images are input only")
        bounds.append((offset, offset + len(segment.text)))
        text.append(segment.text)
        offset += len(segment.text)
    encoding = tokenizer("".join(text), add_special_tokens=False, return_offsets_mapping=True)
    ids, labels, owners = [], [], []
    if start_token_id is not None:
        ids, labels, owners = [start_token_id], [IGNORE_INDEX], [-1]
    if image_first:
        ids += [image_token_id] * num_image_tokens
        labels += [IGNORE_INDEX] * num_image_tokens
        owners += [-1] * num_image_tokens
    for token, (a, b) in zip(encoding["input_ids"], encoding["offset_mapping"]):
        if token == image_token_id:
            ids += [image_token_id] * num_image_tokens
            labels += [IGNORE_INDEX] * num_image_tokens
            owners += [-1] * num_image_tokens
            continue
        b = max(b, a + 1)  # a zero-width token (e.g. a prepended "▁") belongs to the character at its start
        overlapping = [i for i, (s, e) in enumerate(bounds) if a < e and s < b] or [len(bounds) - 1]
        trained = any(segments[i].train for i in overlapping)
        ids.append(token)
        labels.append(token if trained else IGNORE_INDEX)
        owners.append(overlapping[-1])
    if eos_token_id is not None:
        trained = bool(segments) and segments[-1].train
        ids.append(eos_token_id)
        labels.append(eos_token_id if trained else IGNORE_INDEX)
        owners.append(-1)
    return EncodedSequence(ids, labels, owners)


def _wide(char: str) -> bool:
    """Scripts written without spaces between words (CJK): no separator is inserted there."""
    return unicodedata.east_asian_width(char) in ("W", "F")


def join_answer(prompt: str, answer: str) -> str:
    """``answer`` as it follows ``prompt`` in the whole sentence: with one leading space when the prompt
    ends in text and neither side has whitespace at the boundary ("describe:" + "a red circle" ->
    " a red circle", so its first token is " a" as in "describe: a red circle"). No space after an
    empty prompt, after an ``<image>`` marker, or between two CJK characters."""
    prompt_text = prompt.rsplit(IMAGE_TOKEN, 1)[-1]
    if not prompt_text or not answer or prompt_text[-1].isspace() or answer[0].isspace():
        return answer
    if _wide(prompt_text[-1]) and _wide(answer[0]):
        return answer
    return " " + answer


def check_prompt(prompt: str, where: str) -> None:
    """A caption / classify prompt is a string with at most one ``<image>`` marker (one image per sample;
    conversations take several, ``mmlm.models.chat``)."""
    if not isinstance(prompt, str):
        raise TypeError(f"{where}: expected str, got {type(prompt).__name__}")
    if prompt.count(IMAGE_TOKEN) > 1:
        raise ValueError(f"{where}: at most one '{IMAGE_TOKEN}' per prompt (one image per sample), got {prompt!r}")


def check_image_counts(image_mask: torch.Tensor, num_images: int, num_image_tokens: int,
                       image_counts: Sequence[int] | torch.Tensor | None = None) -> None:
    """Check that a batch's image placeholders (``image_mask``: [batch, length]) fit its ``num_images`` images.

    ``image_counts=None``: one image per sample, each with ``num_image_tokens`` placeholders (the single-image
    path: no per-sample bookkeeping). Otherwise the images are the batch's in sample order, ``image_counts[i]``
    of them sample i's (0 allowed), and sample i holds ``image_counts[i] x num_image_tokens`` placeholders.
    Raises ValueError naming the first sample that does not fit.
    """
    batch = image_mask.shape[0]
    if image_counts is None:
        if num_images != batch:
            raise ValueError(f"pixel_values: {num_images} images for {batch} samples; pass image_counts "
                             "(images per sample) for several or no images per sample")
        counts = image_mask.sum(1)
        if (counts != num_image_tokens).any():
            raise ValueError(f"each sample needs exactly {num_image_tokens} '{IMAGE_TOKEN}' ids, "
                             f"got {counts.tolist()}; build inputs with prepare_batch")
        return
    expected = torch.as_tensor(image_counts, dtype=torch.long).cpu()
    if expected.shape != (batch,):
        raise ValueError(f"image_counts: expected one count per sample ({batch}), got {expected.tolist()}")
    if int(expected.sum()) != num_images:
        raise ValueError(f"image_counts {expected.tolist()} add up to {int(expected.sum())} images, but "
                         f"pixel_values holds {num_images}")
    found = image_mask.sum(1).cpu()
    bad = (found != expected * num_image_tokens).nonzero().flatten().tolist()
    if bad:
        i, n = bad[0], int(expected[bad[0]])
        raise ValueError(f"sample {i}: {int(found[i])} '{IMAGE_TOKEN}' ids for {n} image(s); expected {n} x "
                         f"{num_image_tokens} = {n * num_image_tokens} (one '{IMAGE_TOKEN}' marker per image)")


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding (left or right): 0 at each sample's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def count_label_tokens(labels: torch.Tensor) -> int:
    """The number of tokens a batch's loss sums over (labels shifted by one, as the forward does): what
    a trainer adds up over accumulation steps and processes and passes as ``num_items_in_batch``."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
