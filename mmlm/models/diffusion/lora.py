"""LoRA on a pretrained pipeline's parts (peft adapters), and the files a trained adapter is saved in.

Stable-Diffusion-style pipelines (``unet/``, CLIP): diffusers' LoRA format, ``pytorch_lora_weights.safetensors``
beside the untouched base weights, which ``pipe.load_lora_weights(folder)`` takes. PixArt-style pipelines
(``transformer/``, T5): diffusers 0.42 has no LoRA loader for them (neither ``PixArtAlphaPipeline.load_lora_weights``
nor ``PixArtTransformer2DModel.load_lora_adapter`` exists), so their adapters are in peft's own format,
``transformer_lora/`` (and ``text_encoder_lora/``: ``adapter_config.json`` + ``adapter_model.safetensors``), as
PixArt's own LoRA guide loads them::

    pipe.transformer = PeftModel.from_pretrained(pipe.transformer, folder / "transformer_lora").merge_and_unload()
"""

from __future__ import annotations

from pathlib import Path

import diffusers
import torch
import transformers
from safetensors.torch import save_file
from torch import nn

from mmlm.config import ConfigError
from mmlm.models.diffusion.config import LoraConfig

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
PEFT_WEIGHTS = "adapter_model.safetensors"  # peft's SAFETENSORS_WEIGHTS_NAME (beside adapter_config.json)
PEFT_PREFIX = "base_model.model."  # what PeftModel's keys start with


def add_lora(model: nn.Module, lora: LoraConfig, target_modules) -> None:
    """Freeze ``model`` and add a trainable peft LoRA adapter on ``target_modules`` (diffusers' own
    ``add_adapter`` where the model has one, as diffusers' LoRA training scripts do; peft's injection otherwise)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    _check_targets(model, target_modules)
    model.requires_grad_(False)
    config = PeftLoraConfig(r=lora.rank, lora_alpha=lora.scale_alpha, lora_dropout=lora.dropout,
                            init_lora_weights="gaussian", target_modules=list(target_modules))
    if isinstance(model, transformers.PreTrainedModel) or not hasattr(model, "add_adapter"):
        # transformers' add_adapter asks for a newer peft than diffusers and our pin need, and diffusers'
        # PixArtTransformer2DModel has none: inject the adapter and record its config where peft looks for it.
        inject_adapter_in_model(config, model, "default")
        model.peft_config = {"default": config}
    else:
        model.add_adapter(config)


def _check_targets(model: nn.Module, target_modules) -> None:
    """A ConfigError naming the key and the model's own linear layers when no target module is in ``model``."""
    names = [name for name, _ in model.named_modules()]
    if any(name == t or name.endswith("." + t) for name in names for t in target_modules):
        return
    key = "text_encoder_target_modules" if isinstance(model, transformers.PreTrainedModel) else "target_modules"
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
    raise ConfigError(f"model.lora.{key}: none of {list(target_modules)} is a layer of {type(model).__name__}; "
                      f"its linear layers are named {linear}")


def has_lora(model: nn.Module) -> bool:
    return bool(getattr(model, "peft_config", None))


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights in diffusers' LoRA format (the keys ``load_lora_weights`` takes)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(model))


def lora_metadata(model: nn.Module) -> dict:
    """The adapter's LoraConfig as saved beside the weights (so rank and alpha load as trained)."""
    config = model.peft_config["default"].to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights without the LoRA adapter (peft's ``base_layer`` renamed back), contiguous, for safetensors;
    a tied weight once, under its first name (T5's ``shared.weight``, not ``encoder.embed_tokens.weight``), as
    ``save_pretrained`` writes it."""
    state, seen = {}, set()
    for key, value in model.state_dict().items():
        where = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if "lora_" in key or (value.numel() and where in seen):
            continue
        seen.add(where)
        state[key.replace(".base_layer.", ".")] = value.detach().contiguous()
    return state


def save_part(model: nn.Module, folder: Path, weights_name: str) -> None:
    """``save_pretrained`` for a plain part; for a part with a LoRA adapter, its base weights and config."""
    if not has_lora(model):
        model.save_pretrained(folder, safe_serialization=True)
        return
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "save_config"):  # diffusers
        model.save_config(folder)
    else:  # transformers
        model.config.save_pretrained(folder)
    save_file(base_state_dict(model), folder / weights_name, metadata={"format": "pt"})



def save_peft_adapters(model, path: Path) -> None:
    """A PixArt pipeline's adapters in peft's format: ``transformer_lora/`` and ``text_encoder_lora/``, each
    ``adapter_config.json`` + ``adapter_model.safetensors``, what ``PeftModel.from_pretrained(part, folder)`` reads."""
    from peft.utils import get_peft_model_state_dict

    for name, module in (("transformer", model.denoiser), ("text_encoder", model.text_encoder.model)):
        if not has_lora(module):
            continue
        folder = path / f"{name}_lora"
        module.peft_config["default"].save_pretrained(folder)
        state = {PEFT_PREFIX + k: v.detach().contiguous() for k, v in get_peft_model_state_dict(module).items()}
        save_file(state, folder / PEFT_WEIGHTS, metadata={"format": "pt"})


def save_lora(model, path: Path) -> None:
    """``pytorch_lora_weights.safetensors`` in diffusers' format when the denoiser or text encoder has LoRA."""
    denoiser, text_model = model.denoiser, model.text_encoder.model
    if not has_lora(denoiser) and not has_lora(text_model):
        return
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(
        path,
        unet_lora_layers=lora_state_dict(denoiser) if has_lora(denoiser) else None,
        text_encoder_lora_layers=lora_state_dict(text_model) if has_lora(text_model) else None,
        unet_lora_adapter_metadata=lora_metadata(denoiser) if has_lora(denoiser) else None,
        text_encoder_lora_adapter_metadata=lora_metadata(text_model) if has_lora(text_model) else None,
        weight_name=LORA_WEIGHTS,
    )


def load_lora(model, path: Path) -> None:
    """Put the adapters of ``path``'s LoRA file (or a PixArt folder's peft adapters) back on ``model`` (built with
    the same ``config.lora``)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from safetensors.torch import load_file

    if not isinstance(model.denoiser, diffusers.UNet2DConditionModel):
        load_peft_adapters(model, path)
        return
    state = load_file(str(path / LORA_WEIGHTS))
    for prefix, module in (("unet.", model.denoiser), ("text_encoder.", model.text_encoder.model)):
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not part:
            continue
        if not has_lora(module):
            raise ValueError(f"{path / LORA_WEIGHTS} has {prefix.rstrip('.')} LoRA weights but model.lora does not "
                             "put an adapter there")
        if prefix == "unet.":
            part = convert_unet_state_dict_to_peft(part)
        else:
            from diffusers.utils import convert_state_dict_to_peft

            part = convert_state_dict_to_peft(part)
        _set_adapter(module, part, path / LORA_WEIGHTS)


def _set_adapter(module: nn.Module, state: dict, source: Path) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(module, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"{source}: weights the adapter does not have: {unexpected[:5]}")


def load_peft_adapters(model, path: Path) -> None:
    """Read back what ``save_peft_adapters`` wrote; a part with an adapter but no folder is an error naming it."""
    from safetensors.torch import load_file

    for name, module in (("transformer", model.denoiser), ("text_encoder", model.text_encoder.model)):
        weights = path / f"{name}_lora" / PEFT_WEIGHTS
        if not has_lora(module):
            if weights.is_file():
                raise ValueError(f"{weights}: {name} LoRA weights but model.lora does not put an adapter there")
            continue
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} not found: model.lora puts an adapter on the {name}")
        state = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in load_file(str(weights)).items()}
        _set_adapter(module, state, weights)
