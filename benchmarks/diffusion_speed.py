"""TextToImage speed side by side with plain diffusers, in one run (run it alone for real figures).

- Training steps/s: ``TextToImage.training_loss`` + AdamW against the plain diffusers training loop
  (as in diffusers' examples/text_to_image: VAE encode, noise, text encoder every step, UNet, MSE)
  on the same UNet, VAE and text encoder.
- Sampling seconds per image for each scheduler / step count: ``TextToImage.generate`` against a hand
  loop written the way diffusers' pipelines do it, and against diffusers' own StableDiffusionPipeline
  built from the same parts (in latent space, this script's default; the text encoder is a CLIPTextModel).

    python benchmarks/diffusion_speed.py                  # latent space, 32 px, default denoiser
    python benchmarks/diffusion_speed.py --space patch    # the default recipe (no SD-pipeline column)
    python benchmarks/diffusion_speed.py --quick    # small counts: checks the script runs
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from diffusers.utils import logging as diffusers_logging

from mmlm.models.diffusion import DenoiserConfig, TextToImage, TextToImageConfig, to_pil
from mmlm.models.diffusion import TextEncoderConfig

PROMPTS = ["a large red circle in the center", "a small blue square on the left", "a large green star at the top",
           "a small yellow triangle at the bottom"]


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def build(args) -> TextToImage:
    torch.manual_seed(0)
    # StableDiffusionPipeline cannot feed the pooled text (class_labels) to the UNet: leave it out in latent space.
    denoiser = DenoiserConfig(pooled_text=False) if args.space == "latent" else DenoiserConfig()
    config = TextToImageConfig(space=args.space, denoiser=denoiser, text_encoder=TextEncoderConfig(freeze=True),
                               caption_dropout=0.0)
    model = TextToImage.from_config(config, corpus=PROMPTS * 10)
    if model.needs_autoencoder_fit:  # weights do not matter for speed; just compute the scale
        model.fit_autoencoder(torch.rand(16, 3, config.image_size, config.image_size) * 2 - 1, steps=0)
    return model


def training_speed(model: TextToImage, batch: int, steps: int) -> tuple[float, float]:
    size = model.config.image_size
    pixels = torch.rand(batch, 3, size, size) * 2 - 1
    captions = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    unet, vae, scheduler = model.denoiser, model.vae, model.noise_scheduler
    text_model, tokenizer = model.text_encoder.model, model.text_encoder.tokenizer
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)

    def ours():
        loss = model.training_loss(pixels, captions)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def plain_diffusers():
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor if vae else None
            latents = model.encode_images(pixels) if latents is None else latents  # pixels or their patches
            ids = tokenizer(captions, padding="max_length", max_length=model.config.text_encoder.max_length,
                            truncation=True, return_tensors="pt").input_ids
            text = text_model(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,))
        noisy = scheduler.add_noise(latents, noise, t)
        target = scheduler.get_velocity(latents, noise, t)
        loss = F.mse_loss(unet(noisy, t, text, class_labels=pooled(unet, text)).sample, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    model.train()
    return 1 / timed(ours, steps), 1 / timed(plain_diffusers, steps)


def pooled(unet, text: torch.Tensor) -> torch.Tensor | None:
    """The pooled text for a UNet with a text projection in its timestep embedding (unmasked mean), else None."""
    return text.mean(1) if unet.config.class_embed_type == "projection" else None


def hand_pipeline(model: TextToImage, sampler_name: str, steps: int, guidance: float, prompts: list[str]):
    """The loop diffusers' text-to-image pipelines run, written out (unmasked text, like SD)."""
    te, unet = model.text_encoder, model.denoiser
    sampler = model.make_sampler(sampler_name)

    @torch.no_grad()
    def run():
        ids = te.tokenizer(prompts + [""] * len(prompts), padding="max_length", max_length=te.config.max_length,
                           truncation=True, return_tensors="pt").input_ids
        text = te.model(ids)[0]
        cond, uncond = text.chunk(2)
        size, channels = unet.config.sample_size, unet.config.in_channels
        latents = torch.randn(len(prompts), channels, size, size, generator=torch.Generator().manual_seed(0))
        sampler.set_timesteps(steps)
        latents = latents * sampler.init_noise_sigma
        for t in sampler.timesteps:
            inp = sampler.scale_model_input(torch.cat([latents] * 2), t)
            both = torch.cat([uncond, cond])
            out_u, out_c = unet(inp, t, both, class_labels=pooled(unet, both)).sample.chunk(2)
            latents = sampler.step(out_u + guidance * (out_c - out_u), t, latents).prev_sample
        return to_pil(model.decode(latents))

    return run


def diffusers_pipeline(model: TextToImage, sampler_name: str, steps: int, guidance: float, prompts: list[str]):
    """diffusers' own StableDiffusionPipeline on our parts (latent space, CLIP text encoder)."""
    te = model.text_encoder
    te.tokenizer.model_max_length = te.config.max_length
    model.vae.register_to_config(scaling_factor=float(model.latent_scale))
    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=te.model, tokenizer=te.tokenizer, unet=model.denoiser,
                                   scheduler=model.make_sampler(sampler_name), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    size = model.config.image_size
    return lambda: pipe(prompts, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                        generator=torch.Generator().manual_seed(0)).images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", choices=["latent", "pixel", "patch"], default="latent",
                        help="latent (default) also compares against StableDiffusionPipeline")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.train_steps, args.images, args.repeats = 8, 2, 4, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    diffusers_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # SD pipeline's notes on our scheduler config
    model = build(args)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; recipe: {model.config.space} "
          f"{model.config.image_size}px, denoiser {sum(p.numel() for p in model.denoiser.parameters()) / 1e6:.2f}M")

    ours, plain = training_speed(model, args.batch, args.train_steps)
    print(f"\ntraining, batch {args.batch}        steps/s   mmlm {ours:6.2f}   plain diffusers loop {plain:6.2f}"
          f"   ratio {ours / plain:.2f}")

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.images)]
    print(f"\nsampling, {args.images} images, CFG 2   s/image:  mmlm  | hand loop | StableDiffusionPipeline")
    for name, steps in (("ddpm", 50), ("ddim", 50), ("dpm++", 20)):
        mmlm_s = timed(lambda: model.generate(prompts, num_inference_steps=steps, scheduler=name, seed=0,
                                              batch_size=args.images), args.repeats)
        hand_s = timed(hand_pipeline(model, name, steps, 2.0, prompts), args.repeats)
        n = args.images
        pipe = "      n/a"  # StableDiffusionPipeline needs a VAE
        if model.vae is not None:
            pipe = f"{timed(diffusers_pipeline(model, name, steps, 2.0, prompts), args.repeats) / n:9.4f}"
        print(f"  {name:6s} {steps:3d} steps            {mmlm_s / n:7.4f} | {hand_s / n:9.4f} | {pipe}")


if __name__ == "__main__":
    main()
