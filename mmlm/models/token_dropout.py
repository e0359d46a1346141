"""Answer-token dropout: a training-time lever against the LM's text prior.

A captioner trained on 20 of 24 colour-kind pairs learns "green" -> {square, triangle, star} from the text
alone and then says "green square" for a green circle. Replacing a random fraction of the answer tokens in
the LM's *input* (never in the targets) by the pad token makes the next word depend less on the words before
it and more on the image (word dropout, Bowman et al. 2016). Prompt and image tokens are never touched.
"""

from __future__ import annotations

import torch

from mmlm.models.sequence import IGNORE_INDEX


def drop_answer_tokens(input_ids: torch.Tensor, labels: torch.Tensor, rate: float, replacement_id: int,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """``input_ids`` with each answer token (a position whose label is not -100) replaced by ``replacement_id``
    with probability ``rate``; a new tensor, the input is left as it is."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"model.answer_token_dropout: expected a rate in [0, 1), got {rate}")
    if rate == 0.0:
        return input_ids
    answer = labels != IGNORE_INDEX
    draw = torch.rand(input_ids.shape, generator=generator, device=input_ids.device) < rate
    return torch.where(answer & draw, torch.full_like(input_ids, replacement_id), input_ids)
