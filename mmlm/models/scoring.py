"""Classification by prompt for VisionLanguageModel: every label scored as the answer to a template.

Prompt and label are rendered as training renders them (plain, or the prompt as a user turn in the LM's chat
template and the label as the reply: ``mmlm.models.rendering``). Three ways to score, equal up to float error:
``tree`` feeds the image + prompt once and then each distinct label prefix once (``LabelTree``, tree attention);
``expand`` repeats the prompt's KV cache per label (for kernels without a dense mask); ``naive`` runs one full
forward pass per label.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any, Sequence

import torch

from mmlm.models.inference import as_image_list, batch_starts, eval_mode
from mmlm.models.label_tree import LabelTree, chunk_answers
from mmlm.models.language import output_cache
from mmlm.models.rendering import encode_caption
from mmlm.models.sequence import IGNORE_INDEX, check_prompt, positions_from_mask

if TYPE_CHECKING:  # pragma: no cover
    from mmlm.models.vlm import VisionLanguageModel


def check_labels(labels: Sequence[str]) -> list[str]:
    """A non-empty list of distinct, non-empty strings."""
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


def check_templates(prompt: str | Sequence[str]) -> list[str]:
    """One template or a non-empty list, each with exactly one ``{}`` for the label."""
    templates = [prompt] if isinstance(prompt, str) else list(prompt)
    if not templates:
        raise ValueError("prompt: expected a template or a non-empty list of templates")
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ValueError(f"prompt template {t!r}: expected a string with exactly one '{{}}' for the label")
        check_prompt(t, "prompt template")
    return templates


def split_template(template: str, labels: Sequence[str]) -> tuple[str, list[str]]:
    """``"a photo of a {}"`` -> prompt ``"a photo of a"`` and answers ``[" red circle", ...]``.

    The whitespace before the slot moves to the answer: the answer's first token carries it, as in
    the whole sentence ("a small red" is "a", "Ġsmall", "Ġred" / "▁a", "▁small", "▁red"). Prompt and
    answer are then tokenised together (``rendering.encode_caption``, as training does), so the scored
    tokens are exactly the label's tokens inside the whole sentence (in a chat template: the reply's).
    """
    before, after = template.split("{}", 1)
    prompt = before.rstrip()
    space = before[len(prompt):]
    return prompt, [space + label + after for label in labels]


def classify(model: VisionLanguageModel, images: Any, labels: Sequence[str], prompt: str | Sequence[str],
             batch_size: int, progress: bool, eos: bool, ensemble: str) -> torch.Tensor:
    """``VisionLanguageModel.classify``: images in batches of ``batch_size``."""
    images = as_image_list(images)
    labels = check_labels(labels)
    templates = check_templates(prompt)
    probs = [classify_pixels(model, model.pixel_values(images[start:start + batch_size]), labels, templates,
                             eos=eos, ensemble=ensemble)
             for start in batch_starts(len(images), batch_size, progress, "classify")]
    return torch.cat(probs)


def classify_pixels(model: VisionLanguageModel, pixel_values: torch.Tensor, labels: Sequence[str],
                    prompt: str | Sequence[str], eos: bool, ensemble: str) -> torch.Tensor:
    """``VisionLanguageModel.classify_pixels``: label probabilities for one preprocessed batch."""
    labels = check_labels(labels)
    templates = check_templates(prompt)
    if ensemble not in ("mean", "marginal"):
        raise ValueError(f"ensemble: expected 'mean' or 'marginal', got {ensemble!r}")
    reduce = "mean" if ensemble == "mean" else "sum"
    with eval_mode(model):
        pixel_values = pixel_values.to(model.device)
        scores = torch.stack([label_log_likelihoods(model, pixel_values, labels, t, eos=eos, reduce=reduce).cpu()
                              for t in templates])
    combined = scores.mean(0) if ensemble == "mean" else scores.logsumexp(0) - math.log(len(templates))
    return combined.softmax(dim=-1)


@torch.no_grad()  # not inference_mode: callers may modify the scores in place
def label_log_likelihoods(model: VisionLanguageModel, pixel_values: torch.Tensor, labels: Sequence[str],
                          template: str, method: str = "auto", max_tokens: int | None = None, eos: bool = True,
                          reduce: str = "mean") -> torch.Tensor:
    """``VisionLanguageModel.label_log_likelihoods`` (documented there)."""
    if method == "auto":
        method = "tree" if model.language_model.config._attn_implementation in ("eager", "sdpa") else "expand"
    if method not in ("tree", "expand", "naive"):
        raise ValueError(f"method: expected 'auto', 'tree', 'expand' or 'naive', got {method!r}")
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce: expected 'mean' or 'sum', got {reduce!r}")
    prefix_text, answer_texts = split_template(template, labels)
    if method == "naive":
        return score_naive(model, pixel_values, prefix_text, answer_texts, eos, reduce)
    if max_tokens is None:
        head = model.language_model.get_output_embeddings()
        vocab = getattr(head, "out_features", None) or len(model.tokenizer)  # an int8 head has no .weight tensor
        max_tokens = min(8192, 2**26 // vocab)
    scores = torch.empty(pixel_values.shape[0], len(labels), device=model.device)
    lengths = torch.empty(len(labels), device=model.device)
    for prefix, members in encode_labels(model, prefix_text, answer_texts, eos).items():
        answers = [answer for _, answer in members]
        group = [j for j, _ in members]
        scores[:, group] = score_prefix_group(model, pixel_values, list(prefix), answers, method, max_tokens)
        lengths[group] = torch.tensor([len(a) for a in answers], device=model.device, dtype=lengths.dtype)
    if reduce == "mean":
        scores /= lengths
    return scores


def encode_labels(model: VisionLanguageModel, prompt: str, answers: Sequence[str],
                  eos: bool) -> dict[tuple[int, ...], list[tuple[int, list[int]]]]:
    """prompt + each answer tokenised as one sentence (as training sees it: ``rendering.encode_caption``), split
    where the answer's tokens begin: {prefix ids: [(answer index, answer ids), ...]}. Every label shares one
    prefix unless a token straddles the prompt/label boundary (scripts without spaces): such labels get their
    own group."""
    groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    for j, answer in enumerate(answers):
        sample = encode_caption(model, prompt, answer, eos=eos)
        start = sample.first_label
        if start is None:
            raise ValueError(f"labels[{j}]: {answer!r} gives no tokens to score")
        groups.setdefault(tuple(sample.input_ids[:start]), []).append((j, sample.input_ids[start:]))
    return groups


def score_prefix_group(model: VisionLanguageModel, pixel_values: torch.Tensor, prefix: list[int],
                       answers: list[list[int]], method: str, max_tokens: int) -> torch.Tensor:
    """[n_img, n_answers] summed log-probs of ``answers`` after the shared ``prefix`` (image + prompt ids)."""
    n_img = pixel_values.shape[0]
    prefix_ids = torch.tensor([prefix] * n_img, device=model.device)
    prefix_mask = torch.ones_like(prefix_ids)  # one prompt for all images: no padding
    out = model.lm_step(inputs_embeds=model.embed(prefix_ids, pixel_values), attention_mask=prefix_mask,
                        position_ids=positions_from_mask(prefix_mask), **model.last_logits_only)
    first_logprobs = out.logits[:, -1].float().log_softmax(-1)  # predicts each answer's first token
    score_chunk = score_tree if method == "tree" else score_expanded
    scores = torch.empty(n_img, len(answers), device=model.device)
    # <= 1024 trie nodes per call also bounds the [nodes, prompt + nodes] tree mask and its attention
    chunks = chunk_answers(answers, max(1, min(1024, max_tokens // n_img)))
    for c, group in enumerate(chunks):
        # The last chunk may extend the prompt's cache in place; earlier ones extend a copy.
        cache = output_cache(out) if c == len(chunks) - 1 else copy.deepcopy(output_cache(out))
        scores[:, group] = score_chunk(model, cache, len(prefix), first_logprobs, [answers[j] for j in group])
    return scores


def score_tree(model: VisionLanguageModel, cache, prefix_length: int, first_logprobs: torch.Tensor,
               answers: list[list[int]]) -> torch.Tensor:
    """[n_img, n_answers] summed log-probs: every distinct answer prefix fed once, as a trie."""
    tree = LabelTree.build(answers)
    if len(tree) == 0:  # single-token answers: the prompt's last position scores them all
        return tree.total_log_probs(first_logprobs, None)
    n_img = first_logprobs.shape[0]
    ids = torch.tensor(tree.tokens, device=model.device).expand(n_img, -1)
    positions = (torch.tensor(tree.depths, device=model.device) + prefix_length).expand(n_img, -1)
    dtype = next(model.language_model.parameters()).dtype
    mask = tree.attention_mask(prefix_length, dtype, model.device).expand(n_img, -1, -1, -1)
    logits = model.lm_step(cache, input_ids=ids, attention_mask=mask, position_ids=positions).logits
    return tree.total_log_probs(first_logprobs, logits.float().log_softmax(-1))


def score_expanded(model: VisionLanguageModel, cache, prefix_length: int, first_logprobs: torch.Tensor,
                   answers: list[list[int]]) -> torch.Tensor:
    """[n_img, n_answers] summed log-probs: the prompt's cache repeated per answer, equal lengths together."""
    n_img = first_logprobs.shape[0]
    scores = torch.empty(n_img, len(answers), device=model.device)
    by_length: dict[int, list[int]] = {}  # equal-length answers run together, unpadded
    for j, ids in enumerate(answers):
        by_length.setdefault(len(ids), []).append(j)
    for g, (length, group) in enumerate(sorted(by_length.items())):
        k = len(group)
        group_cache = cache if g == len(by_length) - 1 else copy.deepcopy(cache)
        group_cache.batch_repeat_interleave(k)  # image i's prefix repeated for its k labels
        ids = torch.tensor([answers[j] for j in group], device=model.device).repeat(n_img, 1)
        mask = torch.ones(n_img * k, prefix_length + length, dtype=torch.long, device=model.device)
        positions = (torch.arange(length, device=model.device) + prefix_length).expand_as(ids)
        logits = model.lm_step(group_cache, input_ids=ids, attention_mask=mask,
                               position_ids=positions).logits.float()
        logprobs = torch.cat([first_logprobs.repeat_interleave(k, 0)[:, None], logits[:, :-1].log_softmax(-1)], 1)
        scores[:, group] = logprobs.gather(-1, ids[..., None]).squeeze(-1).sum(1).view(n_img, k)
    return scores


def score_naive(model: VisionLanguageModel, pixel_values: torch.Tensor, prompt: str, answers: list[str], eos: bool,
                reduce: str) -> torch.Tensor:
    """[n_img, n_answers]: one full forward pass per answer, the reference the shared-prefix methods match."""
    n_img = pixel_values.shape[0]
    scores = torch.empty(n_img, len(answers), device=model.device)
    for j, answer in enumerate(answers):
        sample = encode_caption(model, prompt, answer, eos=eos)
        input_ids = torch.tensor([sample.input_ids] * n_img, device=model.device)  # one row per image, unpadded
        logits = model(pixel_values, input_ids, torch.ones_like(input_ids)).logits.float()
        targets = torch.tensor([sample.labels[1:]] * n_img, device=model.device)
        mask = targets != IGNORE_INDEX
        lp = logits[:, :-1].log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
        total = (lp * mask).sum(1)
        scores[:, j] = total / mask.sum(1) if reduce == "mean" else total
    return scores
