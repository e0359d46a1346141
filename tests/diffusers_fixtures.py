"""A tiny Stable-Diffusion-style pipeline built offline from configs (the shapes diffusers' own tests use)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# CLIP's byte-to-unicode table, so the tiny vocabulary covers every byte (character-level BPE, no merges).
_BYTES = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))


def _byte_chars() -> list[str]:
    chars, n = list(_BYTES), 0
    codes = list(_BYTES)
    for b in range(256):
        if b not in codes:
            codes.append(b)
            chars.append(256 + n)
            n += 1
    return [chr(c) for c in chars]


def tiny_clip_tokenizer(folder: Path, max_length: int = 12):
    """A CLIPTokenizer with a character vocabulary and no merges, written to ``folder``."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>"]
    for c in _byte_chars():
        tokens += [c, c + "</w>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length,
                              pad_token="<|endoftext|>")
    return tokenizer


def tiny_sd_pipeline(folder: Path, seed: int = 0, cross_attention_dim: int = 32, text_width: int = 32,
                     latent_channels: int = 4, prediction_type: str = "epsilon"):
    """Build and save_pretrained a tiny StableDiffusionPipeline (UNet (8, 16), CLIP 2 layers, AutoencoderKL,
    DDPMScheduler); returns the folder."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer(folder / "_tokenizer_src")
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, norm_num_groups=4, attention_head_dim=2,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
        layers_per_block=1, sample_size=16, scaling_factor=0.5,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length, projection_dim=text_width,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type, clip_sample=False,
                              steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder
