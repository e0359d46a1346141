"""One fine-tuning step of a tiny Stable-Diffusion-style pipeline: mmlm against a plain diffusers-style loop.

The peer is the loop of diffusers' ``train_text_to_image.py`` (and ``train_text_to_image_lora.py`` for LoRA),
written out here: VAE encode x scaling_factor, noise, random timesteps, ``add_noise``, the CLIP text encoder on
max-length-padded ids, the UNet, MSE with min-SNR weighting, backward, AdamW. The mmlm side is what the harness
runs per step: ``TextToImage.training_loss`` (model.pipeline = the same folder) + AdamW. Both in the same run,
alternating, on the same batch; prints steps/s of each, the ratio (target >= 1.0x) and the peak memory (CUDA's
allocator where a GPU is used; on CPU the process's resident-set growth, a rough figure).

    python benchmarks/pipeline_finetune.py --quick        # seconds: checks it runs
    python benchmarks/pipeline_finetune.py --steps 30     # the measurement: run it alone on the machine
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from diffusers_fixtures import tiny_sd_pipeline  # noqa: E402


def plain_parts(folder: Path, lora_rank: int | None, device):
    """The parts as diffusers' script loads them (frozen VAE and text encoder; UNet trained, or LoRA on it)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").to(device).requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").to(device).requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").to(device)
    if lora_rank:
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    return tokenizer, text_encoder, vae, unet, scheduler


def plain_step_fn(folder: Path, lora_rank: int | None, snr_gamma: float, device):
    from diffusers.training_utils import compute_snr

    tokenizer, text_encoder, vae, unet, scheduler = plain_parts(folder, lora_rank, device)
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-4)
    unet.train()

    def step(pixels, captions):
        ids = tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                        return_tensors="pt").input_ids.to(device)
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), device=device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        hidden = text_encoder(ids, return_dict=False)[0]
        target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise,
                                                                                                     timesteps)
        pred = unet(noisy, timesteps, hidden, return_dict=False)[0]
        snr = compute_snr(scheduler, timesteps)
        weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0] / snr
        loss = (F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3)) * weights).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    return step


def mmlm_step_fn(folder: Path, lora_rank: int | None, snr_gamma: float, device):
    from mmlm.models.diffusion import TextToImage, TextToImageConfig
    from mmlm.models.diffusion.config import LoraConfig

    config = TextToImageConfig(pipeline=str(folder), snr_gamma=snr_gamma, caption_dropout=0.0,
                               lora=LoraConfig(rank=lora_rank) if lora_rank else None)
    model = TextToImage.from_config(config).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step(pixels, captions):
        model(pixels, captions).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad()

    return step


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(step, pixels, captions, steps: int, device) -> tuple[float, float]:
    step(pixels, captions)  # warm-up (allocations, caches)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(pixels, captions)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - start), peak_memory_mb(device)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of mmlm and the plain loop")
    parser.add_argument("--quick", action="store_true", help="2 steps, 1 round: checks that it runs")
    args = parser.parse_args(argv)
    steps, rounds = (2, 1) if args.quick else (args.steps, args.rounds)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        folder = tiny_sd_pipeline(Path(tmp) / "tiny-sd")
        pixels = (torch.rand(args.batch_size, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1)
        pixels = pixels.to(device)
        captions = [f"a {c} square" for c in ("red", "blue", "green", "yellow")] * (args.batch_size // 4 + 1)
        captions = captions[: args.batch_size]
        print(f"{'mode':6} {'mmlm steps/s':>13} {'plain steps/s':>14} {'ratio':>6} {'mmlm peak MB':>13} "
              f"{'plain peak MB':>14}")
        for mode, rank in (("full", None), ("lora", 4)):
            torch.manual_seed(0)
            ours, theirs = mmlm_step_fn(folder, rank, 5.0, device), plain_step_fn(folder, rank, 5.0, device)
            results = {"mmlm": [], "plain": []}
            for _ in range(rounds):  # alternate, so both see the same machine load
                results["mmlm"].append(measure(ours, pixels, captions, steps, device))
                results["plain"].append(measure(theirs, pixels, captions, steps, device))
            best = {k: (max(r[0] for r in v), max(r[1] for r in v)) for k, v in results.items()}
            print(f"{mode:6} {best['mmlm'][0]:13.2f} {best['plain'][0]:14.2f} "
                  f"{best['mmlm'][0] / best['plain'][0]:5.2f}x {best['mmlm'][1]:13.1f} {best['plain'][1]:14.1f}")
        if device.type == "cpu":
            print("peak memory on CPU: the process's peak resident set so far (grows across rows; rough)")


if __name__ == "__main__":
    main()
