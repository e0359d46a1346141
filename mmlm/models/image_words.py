"""Image-word loss: a training-only objective that asks the image tokens to carry the answer's words.

A from-scratch captioner trained on 20 of 24 colour-kind pairs learns conjoined features ("green square")
and names a green circle by a pair it has seen. Here each word ``w`` of a sample's answer is scored against
that sample's image tokens (the projector's output, as the LM receives them) under the LM's own input
embedding ``E_w``::

    s_w = max_t cos(token_t, E_w) * scale + bias_w        (multi-instance: some token must hold the word)

with binary cross-entropy against "w is in the answer", over the words of the whole batch (the other
samples' words are the negatives: no [tokens x vocabulary] scores for a 150k-word LM). One score per word,
linear in the features of one token, must find "circle" in circles of every colour: it pulls kind and colour
apart in the tower, and gives the tower a dense signal from the first step. ``E`` is read detached (the
image side moves to the words, the LM's embeddings stay where the LM put them). Scale and bias are the
head's only parameters; they are not part of a saved model (inference never reads them).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmlm.models.sequence import IGNORE_INDEX

PARAMETER_PREFIX = "image_words."


class ImageWordHead(nn.Module):
    def __init__(self, vocab_size: int, ignore_ids: list[int]):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        self.register_buffer("ignore_ids", torch.tensor(sorted(set(ignore_ids)), dtype=torch.long), persistent=False)

    def forward(self, embeds: torch.Tensor, image_mask: torch.Tensor, labels: torch.Tensor,
                word_embeddings: torch.Tensor) -> torch.Tensor | None:
        """Mean BCE over (samples with an image) x (words of the batch); None when no such pair exists.

        ``embeds`` [batch, length, dim] with the image tokens in place, ``image_mask`` [batch, length] marks
        them, ``labels`` [batch, length] (-100 = not an answer token), ``word_embeddings`` [vocab, dim].
        """
        rows = image_mask.any(dim=1)
        answer = (labels != IGNORE_INDEX) & ~torch.isin(labels, self.ignore_ids.to(labels.device))
        answer = answer & rows[:, None]
        if not answer.any():
            return None
        present = torch.zeros(labels.shape[0], word_embeddings.shape[0], dtype=torch.bool, device=labels.device)
        present[answer.nonzero()[:, 0], labels[answer]] = True
        words = present.any(dim=0).nonzero().flatten()
        target = present[rows][:, words].float()

        image_mask = image_mask[rows]
        columns = image_mask.any(dim=0)  # only the positions that hold an image token somewhere
        tokens = F.normalize(embeds[rows][:, columns].float(), dim=-1)
        vectors = F.normalize(word_embeddings[words].detach().float(), dim=-1)
        similarity = (tokens @ vectors.T).masked_fill(~image_mask[:, columns, None], float("-inf"))
        scores = similarity.max(dim=1).values * self.log_scale.exp() + self.bias[words]
        return F.binary_cross_entropy_with_logits(scores, target)


def token_share(count: torch.Tensor, num_items_in_batch, reduction: str):
    """The factor that weighs a per-batch mean term like the LM loss: per label token for ``"sum"``; with
    ``num_items_in_batch``, this micro-batch's share of the step's label tokens (so that over gradient
    accumulation and processes the term adds up to one mean per step); else 1."""
    if reduction == "sum":
        return count
    if num_items_in_batch is not None:
        return count / torch.as_tensor(num_items_in_batch, device=count.device)
    return 1.0
