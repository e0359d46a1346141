"""Where the captioner looks: relevance maps of caption tokens over the image.

For each caption token (generated, or given as ``text``) the LM's attention from the position that
predicts it is followed back to the image tokens, through every layer:

* ``rollout``: attention rollout (Abnar & Zuidema, 2020): head-averaged attention plus the residual
  identity, rows renormalised, multiplied through the layers;
* ``gradient``: gradient x attention (Chefer et al., 2021): the positive part of
  d log p(token) / d attention * attention, head-averaged, accumulated as ``R += A R``;
* ``saliency``: the pixels' gradient (Simonyan et al., 2014), |d log p(token) / d pixel| summed over the
  colour channels and box-smoothed over 1/8 of the image side (``_smooth``): the whole stack, tower included, at the
  input's resolution (the attention maps stop at the LM's image tokens, 16 px each in the shapes recipe).
  Measured on the shapes captioner it points best (benchmarks/pointing.py); gradient x activation at the
  tower's output was tried and pointed worse than rollout.

transformers returns attention weights only from its eager kernel, so the LM is switched to
``eager`` for the call and back afterwards. Image-token relevance is then spread back to the grid
of the tower's tokens (a pixel-shuffle token covers r x r patches; a perceiver latent covers the
patches its cross-attention looked at) and upsampled to the image's resolution. Written by hand:
none of the field's libraries explains a timm tower -> projector -> HF LM stack.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmlm.models.inference import as_image_list, eval_mode
from mmlm.models.language import base_causal_lm
from mmlm.models.projector import PerceiverResampler, PixelShuffleProjector
from mmlm.models.rendering import encode_caption
from mmlm.models.sequence import IGNORE_INDEX

METHODS = ("rollout", "gradient", "saliency")
STOP_WORDS = frozenset("a an the on in at of to and is are with that this it its or".split())


@dataclasses.dataclass
class Explanation:
    """Relevance maps of one caption's tokens over one image; maps are (tokens, H, W), each scaled to max 1."""

    caption: str
    tokens: list[str]  # the caption's tokens as text
    words: list[tuple[str, list[int]]]  # each whitespace-delimited word and the indices of its tokens
    maps: dict[str, torch.Tensor]  # method -> (len(tokens), H, W)

    def word_map(self, index: int, method: str = "rollout") -> torch.Tensor:
        """The map of word ``index`` (the sum of its tokens' maps), scaled to max 1."""
        if method not in self.maps:
            raise ValueError(f"method: expected one of {', '.join(self.maps)}, got {method!r}")
        return _unit(self.maps[method][self.words[index][1]].sum(0))

    def content_words(self) -> list[int]:
        """Indices of the words worth a panel: not a stop word, holding a letter."""
        return [i for i, (w, _) in enumerate(self.words)
                if re.search(r"\w", w) and w.lower().strip(".,;:!?") not in STOP_WORDS]


def _unit(m: torch.Tensor) -> torch.Tensor:
    peak = m.max()
    return m / peak if peak > 0 else m


@contextlib.contextmanager
def eager_attention(lm: nn.Module):
    """The LM with transformers' eager attention (the kernel that returns weights), restored afterwards."""
    base = base_causal_lm(lm)
    old = base.config._attn_implementation
    if old != "eager":
        base.set_attn_implementation("eager")
    try:
        yield
    finally:
        if old != "eager":
            base.set_attn_implementation(old)


@contextlib.contextmanager
def perceiver_attention(projector: nn.Module, store: list):
    """Record each perceiver block's head-averaged cross-attention (latents x inputs) into ``store``."""
    if not isinstance(projector, PerceiverResampler):
        yield
        return
    busy = []

    def hook(module, args, kwargs, output):
        if busy:
            return
        busy.append(1)
        try:
            store.append(module(*args[:3], need_weights=True, average_attn_weights=True)[1].detach())
        finally:
            busy.clear()

    handles = [block.attn.register_forward_hook(hook, with_kwargs=True) for block in projector.blocks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def token_grid(model) -> tuple[int, int]:
    """(rows, cols) of the tower's spatial tokens (prefix tokens excluded)."""
    vision = model.vision
    n = vision.num_tokens - _prefix_count(model)
    grid = getattr(getattr(vision.backbone, "patch_embed", None), "grid_size", None)
    if grid is not None and grid[0] * grid[1] == n:
        return int(grid[0]), int(grid[1])
    _, height, width = vision.data_config["input_size"]
    rows = max(1, round(math.sqrt(n * height / width)))
    if n % rows:
        raise ValueError(f"explain: cannot lay {n} image tokens of '{vision.config.name}' on a grid for a "
                         f"{height}x{width} input")
    return rows, n // rows


def _prefix_count(model) -> int:
    vision = model.vision
    return vision.num_prefix_tokens if vision.config.keep_prefix_tokens else 0


def to_patch_relevance(model, relevance: torch.Tensor, cross_attention: list[torch.Tensor]) -> torch.Tensor:
    """(k, num_image_tokens) relevance of the LM's image tokens -> (k, rows, cols) over the tower's token grid."""
    projector = model.projector
    rows, cols = token_grid(model)
    if isinstance(projector, PixelShuffleProjector):
        r, side = projector.factor, projector.side // projector.factor
        grid = relevance.reshape(-1, side, side)
        return grid.repeat_interleave(r, 1).repeat_interleave(r, 2) / (r * r)
    if isinstance(projector, PerceiverResampler):
        if not cross_attention:
            raise RuntimeError("explain: no perceiver cross-attention was recorded")
        mix = torch.stack(cross_attention).mean(0)[0]  # (latents, inputs), batch of one
        relevance = relevance @ mix
    relevance = relevance[:, _prefix_count(model):]
    return relevance.reshape(-1, rows, cols)


def _smooth(maps: torch.Tensor) -> torch.Tensor:
    """(k, H, W) maps box-averaged over a window of about 1/8 of the shorter side (odd, centred), zeros beyond
    the border: that damps the edge pixels, whose gradients the tower's own zero padding inflates (on the
    shapes val split: 92.0% pointing with zeros, 83.3% averaging only inside; windows 9-17 px of 64 all >= 92%)."""
    half = max(1, round(min(maps.shape[-2:]) / 16))
    return F.avg_pool2d(maps[:, None], 2 * half + 1, stride=1, padding=half, count_include_pad=True)[:, 0]


def _rollout(attentions: list[torch.Tensor]) -> torch.Tensor:
    eye = torch.eye(attentions[0].shape[-1])
    rolled = eye
    for a in attentions:
        a = 0.5 * a.mean(0) + 0.5 * eye
        rolled = (a / a.sum(-1, keepdim=True)) @ rolled
    return rolled


def _gradient_relevance(attentions: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
    relevance = torch.eye(attentions[0].shape[-1])
    for a, g in zip(attentions, grads):
        relevance = relevance + (g * a).clamp(min=0).mean(0) @ relevance
    return relevance


def _words(tokenizer, ids: list[int]) -> list[tuple[str, list[int]]]:
    """Group tokens by the whitespace-delimited words of their decoded text (token k spans the characters
    ``decode(ids[:k])`` adds to ``decode(ids[:k + 1])``): the tokens as the LM saw them, in any tokenizer."""
    ends = [len(tokenizer.decode(ids[: k + 1])) for k in range(len(ids))]
    starts = [0] + ends[:-1]
    words: list[tuple[str, list[int]]] = []
    for match in re.finditer(r"\S+", tokenizer.decode(ids)):
        members = [k for k, (s, e) in enumerate(zip(starts, ends)) if s < match.end() and e > match.start()]
        if members:
            words.append((match.group(), members))
    return words


def explain_one(model, pixel_values: torch.Tensor, text: str, prompt: str | None = None,
                image_size: tuple[int, int] | None = None) -> Explanation:
    """Maps for ``text`` as the answer to ``prompt`` about one preprocessed image (1, 3, H, W)."""
    sample = encode_caption(model, prompt, text, eos=False)  # the answer's tokens as training and caption see them
    positions = [t for t, label in enumerate(sample.labels) if label != IGNORE_INDEX]
    if not positions:
        raise ValueError(f"explain: text {text!r} has no tokens")
    answer = [sample.input_ids[t] for t in positions]
    ids = torch.tensor([sample.input_ids], device=model.device)
    image_positions = (ids[0] == model.image_token_id).nonzero().flatten().cpu()
    queries = torch.tensor(positions) - 1  # the position predicting each token
    cross: list[torch.Tensor] = []
    with eval_mode(model), eager_attention(model.language_model), perceiver_attention(model.projector, cross), \
            torch.enable_grad():
        pixels = pixel_values.to(model.device).detach().requires_grad_(True)  # a frozen tower passes gradients too
        embeds = model.embed(ids, pixels)
        if not embeds.requires_grad:  # a frozen model: gradients w.r.t. the attention still flow from the inputs
            embeds = embeds.detach().requires_grad_(True)
        mask = torch.ones_like(ids)
        out = model.language_model(inputs_embeds=embeds, attention_mask=mask, output_attentions=True,
                                   position_ids=torch.arange(ids.shape[1], device=ids.device)[None], use_cache=False)
        attentions = list(out.attentions)  # (1, heads, S, S) each; grads are taken w.r.t. these very tensors
        if not attentions or attentions[0] is None:
            raise RuntimeError("explain: the LM returned no attention weights with eager attention")
        log_probs = out.logits[0, queries.to(model.device)].float().log_softmax(-1)
        targets = torch.tensor(answer, device=model.device)
        chosen = log_probs.gather(1, targets[:, None])[:, 0]
        weights = [a.detach()[0].float().cpu() for a in attentions]
        rolled = _rollout(weights)
        rollout_rows = rolled[queries][:, image_positions]
        gradient_rows, saliency_rows = [], []
        for t in range(len(answer)):
            grads = torch.autograd.grad(chosen[t], attentions + [pixels], retain_graph=t < len(answer) - 1,
                                        allow_unused=True)
            grads = [torch.zeros_like(a) if g is None else g for a, g in zip(attentions + [pixels], grads)]
            rel = _gradient_relevance(weights, [g[0].float().cpu() for g in grads[:-1]])
            gradient_rows.append(rel[queries[t], image_positions])
            saliency_rows.append(grads[-1][0].float().abs().sum(0).cpu())
    maps = {}
    size = image_size or tuple(pixel_values.shape[-2:])
    grids = {"rollout": to_patch_relevance(model, rollout_rows, [c.float().cpu() for c in cross]),
             "gradient": to_patch_relevance(model, torch.stack(gradient_rows), [c.float().cpu() for c in cross]),
             "saliency": _smooth(torch.stack(saliency_rows))}
    for method, grid in grids.items():
        up = F.interpolate(grid[:, None], size=size, mode="bilinear", align_corners=False)[:, 0].clamp(min=0)
        maps[method] = torch.stack([_unit(m) for m in up])
    tokens = [model.tokenizer.decode([i]) for i in answer]
    return Explanation(caption=text, tokens=tokens, words=_words(model.tokenizer, answer), maps=maps)


def explain(model, images: Any, text: str | Sequence[str] | None = None, prompt: str | None = None,
            max_new_tokens: int = 32) -> list[Explanation]:
    """One :class:`Explanation` per image: for ``text`` (one for all, or one per image), or for the greedy caption."""
    from mmlm.images import load_image

    images = as_image_list(images)
    if text is None:
        texts = model.caption(images, prompt=prompt, max_new_tokens=max_new_tokens)
    else:
        texts = list(text) if isinstance(text, (list, tuple)) else [text] * len(images)
    if len(texts) != len(images):
        raise ValueError(f"text: {len(texts)} texts for {len(images)} images; give one or one per image")
    results = []
    for image, caption in zip(images, texts):
        pixels = image[None] if isinstance(image, torch.Tensor) and image.ndim == 3 else model.pixel_values([image])
        size = None if isinstance(image, torch.Tensor) else load_image(image).size[::-1]
        results.append(explain_one(model, pixels, caption, prompt, size))
    return results


def overlay(image, explanation: Explanation, method: str = "rollout", words: Sequence[int] | None = None,
            panel: int = 128):
    """A PIL strip: the image, then one heat-map overlay per content word, each labelled with its word."""
    import numpy as np
    from PIL import Image, ImageDraw

    from mmlm.images import load_image

    base = load_image(image).convert("RGB").resize((panel, panel))
    indices = explanation.content_words() if words is None else list(words)
    strip = Image.new("RGB", (panel * (1 + len(indices)), panel + 16), "white")
    draw = ImageDraw.Draw(strip)
    strip.paste(base, (0, 16))
    draw.text((2, 2), "image", fill="black")
    for k, index in enumerate(indices, start=1):
        m = explanation.word_map(index, method)[None, None]
        m = F.interpolate(m, size=(panel, panel), mode="bilinear", align_corners=False)[0, 0].clamp(0, 1).numpy()
        heat = np.stack([m, 1 - np.abs(2 * m - 1), 1 - m], -1) * 255  # blue (0) -> green -> red (1)
        blended = 0.5 * np.asarray(base, dtype=np.float32) + 0.5 * heat
        strip.paste(Image.fromarray(blended.clip(0, 255).astype("uint8")), (panel * k, 16))
        draw.text((panel * k + 2, 2), explanation.words[index][0], fill="black")
    return strip
