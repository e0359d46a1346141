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


# ------------------------------------------------------------------------------------------ PixArt-style
# Captions the tiny T5 tokenizer is trained on (words the tests' prompts use, so they are a few pieces each).
T5_CORPUS = [f"a {size} {colour} {shape}" for size in ("small", "big")
             for colour in ("red", "blue", "green", "yellow") for shape in ("circle", "square", "triangle", "star")]


def tiny_t5_tokenizer(folder: Path, model_max_length: int = 120):
    """A T5Tokenizer (SentencePiece unigram as T5's: <pad>=0, </s>=1, <unk>=2, no BOS, 100 extra ids) trained
    offline on ``T5_CORPUS``, read from ``folder / spiece.model`` as transformers reads T5's own."""
    import io

    import sentencepiece as spm
    from transformers import T5Tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(T5_CORPUS), model_writer=out, vocab_size=96, model_type="unigram", pad_id=0,
        eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
    (folder / "spiece.model").write_bytes(out.getvalue())
    return T5Tokenizer.from_pretrained(folder, model_max_length=model_max_length)


def tiny_pixart_pipeline(folder: Path, seed: int = 0, caption_channels: int = 32, text_width: int = 32,
                         latent_channels: int = 4):
    """Build and save_pretrained a tiny PixArtAlphaPipeline (PixArtTransformer2DModel 2 layers of width 24 with
    learned sigma as PixArt's, T5EncoderModel 2 layers, AutoencoderKL, DPMSolverMultistepScheduler with PixArt's
    linear betas); returns the folder."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = tiny_t5_tokenizer(folder / "_tokenizer_src")
    transformer = PixArtTransformer2DModel(
        # Width 3 x 8 = 24: a multiple of 3 as PixArt's 1152 (the micro-conditions take a third each).
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        caption_channels=caption_channels, in_channels=4, out_channels=8,
        cross_attention_dim=24, attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
        layers_per_block=1, sample_size=16, scaling_factor=0.5,
    )
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=text_width, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.1,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, is_encoder_decoder=False,
    ))
    scheduler = DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                                            prediction_type="epsilon")
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                               scheduler=scheduler)
    pipe.save_pretrained(folder)
    return folder
