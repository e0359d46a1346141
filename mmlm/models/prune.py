"""Structured pruning of a VisionLanguageModel's LM: MLP channels and attention heads, saved as a smaller
*dense* model (unstructured masks change nothing on CPU).

For a gated MLP (``gate_proj``, ``up_proj``, ``down_proj``: Llama, Qwen2, Mistral, SmolLM, ...) every layer
keeps the same number of intermediate channels, the most important ones; for attention, the same number of
key/value groups per layer (a group is one K/V head and the query heads that share it, so grouped-query
attention stays valid), with ``head_dim`` written into the config since ``hidden_size / heads`` no longer
gives it. Importance:

* ``magnitude`` (no data): a channel's ``|gate row| * |up row| * |down column|``; a group's
  ``|V rows| * |O columns|`` (the path its values take to the residual stream);
* ``activation`` (calibration batches): the mean absolute input a channel (a group: its heads' outputs) feeds
  into ``down_proj`` (``o_proj``) over the batches' label tokens, times the norm of the weights it meets there.

The pruned LM is a new transformers model built from the shrunk config with the kept slices of every tensor;
the model folder is the ordinary one (``language/config.json`` holds the new sizes), so ``mmlm.load`` reads it
and ``mmlm train`` starts a recovery fine-tune from it with ``model.init_from``. Written by hand: transformers
has no structured pruning for causal LMs (its ``prune_heads`` covers a few encoder families only).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

CRITERIA = ("magnitude", "activation")


class PruningError(ValueError):
    """A fraction, criterion or LM the pruner cannot handle."""


@dataclasses.dataclass
class PruneConfig:
    mlp: float = 0.0  # fraction of each layer's MLP channels removed
    heads: float = 0.0  # fraction of each layer's key/value groups (and their query heads) removed
    criterion: str = "magnitude"  # magnitude | activation (needs calibration batches)

    def __post_init__(self):
        for name in ("mlp", "heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise PruningError(f"{name}: expected a fraction in [0, 1), got {value!r}")
        if self.criterion not in CRITERIA:
            raise PruningError(f"criterion: expected one of {', '.join(CRITERIA)}, got {self.criterion!r}")
        if not self.mlp and not self.heads:
            raise PruningError("nothing to prune: set mlp and/or heads to a fraction above 0")


def _layers(lm: nn.Module) -> list[nn.Module]:
    from mmlm.models.language import base_causal_lm

    base = base_causal_lm(lm)
    layers = getattr(getattr(base, "model", None), "layers", None)
    if layers is None or not all(hasattr(layer.mlp, n) for layer in layers for n in ("gate_proj", "up_proj",
                                                                                      "down_proj")):
        raise PruningError(f"{type(base).__name__}: structured pruning supports decoders with model.layers[i].mlp."
                           "gate_proj/up_proj/down_proj and self_attn.q/k/v/o_proj (Llama, Qwen2, Mistral, SmolLM)")
    return list(layers)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _kept(fraction: float, total: int) -> int:
    return max(1, round(total * (1.0 - fraction)))


def activation_statistics(model: nn.Module, batches: Iterable[dict]) -> list[dict[str, torch.Tensor]]:
    """Per layer: the mean absolute input of ``down_proj`` (per channel) and of ``o_proj`` (per feature) over
    the label tokens of ``batches`` (dicts ``model(**batch)`` takes, with labels)."""
    layers = _layers(model.language_model)
    sums = [{"mlp": 0.0, "attention": 0.0} for _ in layers]
    count = [0]
    mask: list[torch.Tensor] = []

    def hook(i, key):
        def record(_module, inputs):
            x = inputs[0].detach().abs().float()
            sums[i][key] = sums[i][key] + x[mask[0]].sum(0)  # the label positions only
        return record

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(hook(i, "mlp")))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(hook(i, "attention")))
    try:
        with torch.no_grad():
            for batch in batches:
                batch = dict(batch)
                labels = batch.pop("labels")
                mask[:] = [labels != -100]
                count[0] += int(mask[0].sum())
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    if not count[0]:
        raise PruningError("calibration: the batches hold no label tokens")
    return [{k: v / count[0] for k, v in s.items()} for s in sums]


def _scores(layer: nn.Module, config, stats: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(MLP channel importance [intermediate], key/value group importance [num_key_value_heads])."""
    mlp, attn = layer.mlp, layer.self_attn
    down = mlp.down_proj.weight.detach().float()
    d, kv = _head_dim(config), config.num_key_value_heads
    group = config.num_attention_heads // kv
    o_columns = attn.o_proj.weight.detach().float().norm(dim=0).view(kv, group, d)  # per query-head feature
    if stats is None:
        channel = (mlp.gate_proj.weight.detach().float().norm(dim=1) * mlp.up_proj.weight.detach().float().norm(dim=1)
                   * down.norm(dim=0))
        values = attn.v_proj.weight.detach().float().view(kv, d, -1).flatten(1).norm(dim=1)
        heads = values * o_columns.flatten(1).norm(dim=1)
    else:
        channel = stats["mlp"] * down.norm(dim=0)
        heads = (stats["attention"].view(kv, group, d) * o_columns).sum(dim=(1, 2))
    return channel, heads


def _rows(weight: torch.Tensor, index: torch.Tensor, block: int = 1) -> torch.Tensor:
    """Rows of ``weight`` (or a bias) in blocks of ``block`` rows: block ``i`` for each ``i`` in ``index``."""
    rows = (index[:, None] * block + torch.arange(block)).flatten()
    return weight.index_select(0, rows).clone()


def kept_indices(model: nn.Module, config: PruneConfig,
                 calibration: Iterable[dict] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per LM layer, the sorted indices of the MLP channels and key/value groups that pruning keeps."""
    from mmlm.models.language import base_causal_lm

    lm = base_causal_lm(model.language_model)
    layers = _layers(lm)
    if config.criterion == "activation" and calibration is None:
        raise PruningError("criterion 'activation' needs calibration batches (images with captions)")
    stats = activation_statistics(model, calibration) if config.criterion == "activation" else [None] * len(layers)
    channels = _kept(config.mlp, lm.config.intermediate_size) if config.mlp else lm.config.intermediate_size
    groups = _kept(config.heads, lm.config.num_key_value_heads) if config.heads else lm.config.num_key_value_heads
    kept = []
    for layer, layer_stats in zip(layers, stats):
        channel_score, group_score = _scores(layer, lm.config, layer_stats)
        kept.append((channel_score.topk(channels).indices.sort().values,
                     group_score.topk(groups).indices.sort().values))
    return kept


def pruned_language_model(model: nn.Module, config: PruneConfig, calibration: Iterable[dict] | None = None):
    """A new (dense, smaller) causal LM with the most important MLP channels and key/value groups of
    ``model.language_model``, by ``config.criterion``; the model itself is not changed."""
    from transformers import AutoModelForCausalLM

    from mmlm.models.language import base_causal_lm

    lm = base_causal_lm(model.language_model)
    kept = kept_indices(model, config, calibration)
    old = lm.config
    d, group = _head_dim(old), old.num_attention_heads // old.num_key_value_heads
    new = copy.deepcopy(old)
    new.intermediate_size, new.num_key_value_heads = len(kept[0][0]), len(kept[0][1])
    new.num_attention_heads, new.head_dim = len(kept[0][1]) * group, d
    state = {k: v.detach() for k, v in lm.state_dict().items()}
    first = next(k for k in state if k.endswith("layers.0.mlp.gate_proj.weight"))
    prefix = first.removesuffix("0.mlp.gate_proj.weight")  # "model.layers."
    for i, (keep, keep_groups) in enumerate(kept):
        keep_heads = (keep_groups[:, None] * group + torch.arange(group)).flatten()
        p = f"{prefix}{i}."
        for name, index, block in (("mlp.gate_proj", keep, 1), ("mlp.up_proj", keep, 1),
                                   ("self_attn.q_proj", keep_heads, d), ("self_attn.k_proj", keep_groups, d),
                                   ("self_attn.v_proj", keep_groups, d)):
            for kind in ("weight", "bias"):
                if f"{p}{name}.{kind}" in state:
                    state[f"{p}{name}.{kind}"] = _rows(state[f"{p}{name}.{kind}"], index, block)
        for name, index, block in (("mlp.down_proj", keep, 1), ("self_attn.o_proj", keep_heads, d)):  # input columns
            state[f"{p}{name}.weight"] = _rows(state[f"{p}{name}.weight"].T, index, block).T.contiguous()
    pruned = AutoModelForCausalLM.from_config(new).to(next(lm.parameters()).dtype)
    missing, unexpected = pruned.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:  # a tied head has no tensor of its own
        raise PruningError(f"pruned {type(lm).__name__}: tensors missing {missing[:5]} / unexpected {unexpected[:5]}")
    if getattr(new, "tie_word_embeddings", False):
        pruned.tie_weights()
    pruned.generation_config = copy.deepcopy(lm.generation_config)
    return pruned.eval()


def save_pruned(model: nn.Module, out: str | Path, config: PruneConfig,
                calibration: Iterable[dict] | None = None) -> nn.Module:
    """Write ``model`` with a pruned LM as an ordinary model folder; returns the model loaded from it."""
    from mmlm.models.language import is_lora
    from mmlm.models.vlm import VisionLanguageModel

    if is_lora(model.language_model):
        raise PruningError("save_pruned: the LM carries LoRA adapters; save the model merged, load it, then prune")
    if getattr(model, "compression", None) is not None:
        raise PruningError("save_pruned: the model is quantised; prune the fp32 model, fine-tune, then compress")
    lm = pruned_language_model(model, config, calibration)
    language = model.config.language
    sizes = {"intermediate_size": lm.config.intermediate_size, "num_attention_heads": lm.config.num_attention_heads,
             "num_key_value_heads": lm.config.num_key_value_heads, "head_dim": lm.config.head_dim}
    if language.config:  # a from-scratch LM: keep the recipe's sizes in step with language/config.json
        language = dataclasses.replace(language, config={**language.config, **sizes})
    shell = copy.copy(model)  # the same vision tower, projector and tokenizer around the pruned LM
    shell._modules = dict(model._modules, language_model=lm)
    shell.config = dataclasses.replace(model.config, language=language)
    shell.save_pretrained(out)
    return VisionLanguageModel.from_pretrained(out)


def calibration_batches(model: nn.Module, images: list, batch_size: int = 8) -> list[dict]:
    """Batches of ``images`` with the model's own greedy captions as labels (the activation criterion's data)."""
    batches = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        captions = model.caption(chunk)
        batches.append(model.prepare_batch(model.pixel_values(chunk), [c or "." for c in captions]))
    return batches


def parameter_count(model: nn.Module) -> int:
    """Distinct parameters (a tied head counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
