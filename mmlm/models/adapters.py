"""LoRA (peft) on any part of the VLM: the vision tower and the projector, next to the LM's own LoRA.

The LM keeps its keys in ``language.lora_*`` (a peft ``PeftModel`` around the causal LM). The vision
tower and the projector take ``model.vision_lora`` / ``model.projector_lora``: peft's LoRA layers are
injected in place (``inject_adapter_in_model``), so the part keeps its type and attribute names; only
the adapters train in that part. Saving merges them into the base weights (a saved model is plain).
"""

from __future__ import annotations

import copy
import dataclasses

from torch import nn

from mmlm.config import ConfigError


@dataclasses.dataclass
class AdapterConfig:
    """LoRA on one part. ``rank`` 0 = none; ``targets``: module names (or name suffixes) to adapt,
    [] = every ``nn.Linear`` and ``nn.Conv2d`` of the part (a CNN tower has only convolutions)."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if self.rank < 0:
            raise ConfigError(f"lora rank: expected >= 0, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora dropout: expected a value in [0, 1), got {self.dropout}")


def adaptable_layers(module: nn.Module) -> list[str]:
    """Full names of the ``nn.Linear`` / ``nn.Conv2d`` layers of ``module``."""
    return [name for name, m in module.named_modules() if name and isinstance(m, (nn.Linear, nn.Conv2d))]


def add_lora(module: nn.Module, config: AdapterConfig, key: str) -> nn.Module:
    """Inject LoRA into ``module`` in place (only the adapters of ``module`` stay trainable); ``key``
    names the config section in errors (e.g. ``model.vision_lora``)."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = list(config.targets) or adaptable_layers(module)
    if not targets:
        raise ConfigError(f"{key}: the part has no Linear or Conv2d layer to adapt; set {key}.rank to 0")
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets)
    try:
        return inject_adapter_in_model(lora, module)
    except ValueError as err:
        raise ConfigError(f"{key}.targets: {err}") from err


def has_lora(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in module.modules())


def merged_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every LoRA layer merged into its base layer and removed."""
    from peft.tuners.lora import LoraLayer

    module = copy.deepcopy(module)
    for name, layer in list(module.named_modules()):
        if isinstance(layer, LoraLayer):
            layer.merge()
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, child, layer.get_base_layer())
    return module
