"""The LM head on label positions only, and the loss on them in fp32.

A causal LM's ``forward`` projects every position onto the vocabulary; in a VLM most positions are
image tokens and prompt (label -100), so for Qwen2's 151,936 words x 729 SigLIP tokens nearly all of
those logits are thrown away. Here the decoder gives the hidden states, and the head runs on the
positions that predict a label (transformers has no per-sample ``logits_to_keep``: written here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmlm.models.language import base_causal_lm
from mmlm.models.sequence import IGNORE_INDEX


def decoder_of(language_model: nn.Module) -> nn.Module:
    """The causal LM's body (``LlamaModel``, ``GPT2Model``, ...): hidden states after the final norm."""
    return base_causal_lm(language_model).base_model


def head_logits(language_model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The LM's logits for ``hidden`` (final-norm hidden states), with the output transforms some
    architectures apply after the head: Gemma-2/3 soft-capping, Cohere's ``logit_scale``, Granite's
    ``logits_scaling``."""
    lm = base_causal_lm(language_model)
    logits = lm.get_output_embeddings()(hidden)
    config = lm.config
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale != 1:
        logits = logits * scale
    scaling = getattr(config, "logits_scaling", None)
    if isinstance(scaling, (int, float)) and scaling != 1:
        logits = logits / scaling
    return logits


def label_loss(language_model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
               num_items_in_batch: int | torch.Tensor | None, reduction: str):
    """(loss, logits at the label positions [n, vocab] in fp32, n): next-token cross-entropy of
    ``labels`` (unshifted, -100 = no label) from ``hidden`` [batch, length, dim]."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logits = head_logits(language_model, hidden[:, :-1][keep]).float()
    total = F.cross_entropy(logits, targets[keep], reduction="sum")
    count = keep.sum()
    if reduction == "sum":
        return total, logits, count
    denominator = count if num_items_in_batch is None else num_items_in_batch
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(total.device, total.dtype)
    return total / denominator, logits, count
