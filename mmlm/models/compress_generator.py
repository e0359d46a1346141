"""int8 for a from-scratch generator (``TextToImage``): its denoiser, saved so ``mmlm.load`` runs it.

The denoiser's Linear layers become int8 as the VLM's do (:mod:`mmlm.models.compress`); torch.ao has no
dynamic int8 convolution, so its Conv weights are *stored* int8 (per output channel) and computed in fp32
after loading: the file shrinks, the convolutions' speed does not change.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmlm.models.compress import (
    CompressionConfig, CompressionError, ao_quantization, load_quantized_state, quantize_linear_layers, quantized_state,
)

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
DENOISER_WEIGHTS = "diffusion_pytorch_model.safetensors"  # diffusers' file name, as save_pretrained writes it


def int8_convolutions(module: nn.Module) -> dict[str, torch.Tensor]:
    """Round every convolution weight in ``module`` to int8 (per output channel, symmetric: torch.ao's
    per-channel weight observer), in place; returns the stored form (``{conv}.qweight/.qscale/.qzero``).

    Storage only, by hand: torch.ao has no dynamic int8 convolution, so the layers compute in fp32 on the
    rounded weights, the same values :func:`load_int8_convolutions` rebuilds from the file."""
    *_, linear_qconfig, _ = ao_quantization()
    stored = {}
    for name, conv in module.named_modules():
        if not isinstance(conv, CONVOLUTIONS):
            continue
        observer = linear_qconfig.weight()
        observer(conv.weight.detach())
        scales, zeros = observer.calculate_qparams()
        shape = (-1,) + (1,) * (conv.weight.dim() - 1)
        ints = torch.round(conv.weight.detach() / scales.view(shape)).add(zeros.view(shape)).clamp(-128, 127)
        stored.update({f"{name}.qweight": ints.to(torch.int8), f"{name}.qscale": scales.float(),
                       f"{name}.qzero": zeros.to(torch.int64)})
        with torch.no_grad():
            conv.weight.copy_(_dequantized(stored, name, conv.weight.dim()))
    return stored


def _dequantized(state: dict[str, torch.Tensor], name: str, dims: int) -> torch.Tensor:
    shape = (-1,) + (1,) * (dims - 1)
    ints, scales, zeros = (state[f"{name}.{k}"] for k in ("qweight", "qscale", "qzero"))
    return (ints.float() - zeros.view(shape).float()) * scales.view(shape)


def load_int8_convolutions(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """``state`` with each convolution's stored int8 weight turned back into its fp32 ``{conv}.weight``."""
    state = dict(state)
    for name, conv in module.named_modules():
        if isinstance(conv, CONVOLUTIONS):
            if f"{name}.qweight" not in state:
                raise CompressionError(f"{where}: no {name}.qweight for the int8-stored convolution {name}")
            state[f"{name}.weight"] = _dequantized(state, name, conv.weight.dim())
            for key in ("qweight", "qscale", "qzero"):
                del state[f"{name}.{key}"]
    return state


def quantize_denoiser(model: nn.Module, config: CompressionConfig | None = None) -> dict[str, torch.Tensor]:
    """A TextToImage's denoiser with int8 Linear layers and int8-rounded convolutions, in place (inference
    only); returns the convolutions' stored form (see :func:`int8_convolutions`)."""
    config = config or CompressionConfig(model="text_to_image")
    denoiser = model.denoiser.eval().requires_grad_(False)
    stored = int8_convolutions(denoiser)
    quantize_linear_layers(denoiser)
    model.compression = config
    return stored


def save_generator(model: nn.Module, out: Path, config: CompressionConfig) -> None:
    from mmlm.models.diffusion.pretrained import CUSTOM_PIPELINE

    if model.config.pipeline is not None:
        raise CompressionError(f"save_compressed: {model.config.pipeline} is a diffusers pipeline; its denoiser loads "
                               "through diffusers, which reads no int8 weights: compress a from-scratch generator")
    model.save_pretrained(out)
    stored = quantize_denoiser(model, config)
    replaced = {key.replace(".qweight", ".weight") for key in stored if key.endswith(".qweight")}
    state = {k: v for k, v in quantized_state(model.denoiser).items() if k not in replaced}
    save_file({**state, **stored}, str(out / "denoiser" / DENOISER_WEIGHTS),
              metadata={"format": "pt", "mmlm": config.scheme})
    for name in ("model_index.json", f"{CUSTOM_PIPELINE}.py"):  # DiffusionPipeline cannot read int8 weights
        (out / name).unlink(missing_ok=True)


def load_generator(path: Path, config: CompressionConfig) -> nn.Module:
    """The parts ``TextToImage.from_pretrained`` reads, with the denoiser built from its config (no weights) and
    filled from the int8 file."""
    from diffusers import AutoencoderKL, PixArtTransformer2DModel, UNet2DConditionModel

    from mmlm.config import from_dict
    from mmlm.models.diffusion import TextEncoder, TextToImage, TextToImageConfig
    from mmlm.models.diffusion.sampling import load_noise_scheduler

    meta = json.loads((path / "config.json").read_text(encoding="utf-8"))
    model_config = from_dict(TextToImageConfig, meta["config"], where="model")
    text_encoder = TextEncoder.from_folder(path / "text_encoder", path / "tokenizer", meta["text_encoder_class"],
                                           model_config.text_encoder)
    denoiser_class = PixArtTransformer2DModel if model_config.denoiser.kind == "transformer" else UNet2DConditionModel
    denoiser = denoiser_class.from_config(denoiser_class.load_config(path / "denoiser"))
    vae = AutoencoderKL.from_pretrained(path / "vae") if model_config.space == "latent" else None
    model = TextToImage(model_config, text_encoder, denoiser, load_noise_scheduler(model_config, path / "scheduler"),
                        vae, meta["latent_scale"])
    model.eval()
    quantize_denoiser(model, config)
    weights = path / "denoiser" / DENOISER_WEIGHTS
    state = load_int8_convolutions(denoiser, load_file(str(weights)), str(weights))
    load_quantized_state(denoiser, state, str(weights))
    return model
