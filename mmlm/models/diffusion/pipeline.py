"""MmlmTextToImagePipeline: a diffusers pipeline for the generators mmlm trains from scratch (own text encoder,
pixel / patch / latent space, pooled text on the timestep embedding).

Self-contained on purpose (torch, diffusers and transformers only, never mmlm): ``TextToImage.save_pretrained``
copies this file into the saved folder as ``mmlm_pipeline.py`` and names it in ``model_index.json``, so
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` loads and samples the model without mmlm,
the same images as ``TextToImage.generate`` for the same seed, steps and guidance (one generator per image).
Rectified-flow models (``scheduler/`` a ``FlowMatchEulerDiscreteScheduler``) sample with ``euler``, ``heun`` or
``dpm++`` on flow sigmas, as ``mmlm.models.diffusion.flow.make_sampler`` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
)
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

SAMPLERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler}
FLOW_SAMPLERS = {"euler": FlowMatchEulerDiscreteScheduler, "heun": FlowMatchHeunDiscreteScheduler}


def make_sampler(scheduler, name: str):
    """The sampler ``name`` from the training scheduler: DDPM-trained ones with "trailing" spacing (starts at the last
    training step), flow-trained ones with the same shift."""
    if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return SAMPLERS[name].from_config(scheduler.config, timestep_spacing="trailing")
    steps, shift = scheduler.config.num_train_timesteps, scheduler.config.shift
    if name == "dpm++":
        return DPMSolverMultistepScheduler(num_train_timesteps=steps, prediction_type="flow_prediction",
                                           use_flow_sigmas=True, flow_shift=shift)
    return FLOW_SAMPLERS[name](num_train_timesteps=steps, shift=shift)


class MmlmTextToImagePipeline(DiffusionPipeline):
    """denoiser (UNet2DConditionModel or PixArtTransformer2DModel) + text encoder + tokenizer + scheduler (+ vae)."""

    model_cpu_offload_seq = "text_encoder->denoiser->vae"
    _optional_components = ["vae"]  # pixel and patch space have none

    def __init__(self, denoiser, text_encoder, tokenizer, scheduler, vae, space: str = "patch",
                 patch_size: int = 2, latent_scale: float = 1.0, max_length: int = 16, sampler: str = "dpm++",
                 num_inference_steps: int = 20, guidance_scale: float = 2.0):
        super().__init__()
        self.register_modules(denoiser=denoiser, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                              vae=vae)
        self.register_to_config(space=space, patch_size=patch_size, latent_scale=latent_scale, max_length=max_length,
                                sampler=sampler, num_inference_steps=num_inference_steps,
                                guidance_scale=guidance_scale)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids and mask at ``max_length`` (never an all-padding row), then the text model's states."""
        length, tok = self.config.max_length, self.tokenizer
        encoded = tok(prompts, add_special_tokens=True, truncation=True, max_length=length)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        filler = tok.bos_token_id if tok.bos_token_id is not None else pad
        ids = torch.full((len(prompts), length), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for row, seq in enumerate(encoded["input_ids"]):
            seq = list(seq) or [filler]
            ids[row, : len(seq)], mask[row, : len(seq)] = torch.tensor(seq), 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        return self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state, mask

    def predict(self, sample, timestep, text, mask):
        extra = {}
        if getattr(self.denoiser.config, "class_embed_type", None) == "projection":  # the masked mean of the text
            weights = mask.to(text.dtype).unsqueeze(-1)
            extra["class_labels"] = (text * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        timesteps = timestep.expand(sample.shape[0]) if torch.is_tensor(timestep) else timestep
        return self.denoiser(sample, timestep=timesteps, encoder_hidden_states=text, encoder_attention_mask=mask,
                             **extra).sample

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.config.space == "patch":
            return F.pixel_shuffle(latents, self.config.patch_size)
        if self.config.space == "latent":
            return self.vae.decode(latents / self.config.latent_scale).sample
        return latents

    @torch.no_grad()
    def __call__(self, prompt, negative_prompt=None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, generator=None, output_type: str = "pil", return_dict=True):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [""] * len(prompts) if negative_prompt is None else (
            [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt))
        steps = num_inference_steps or self.config.num_inference_steps
        scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        sampler = make_sampler(self.scheduler, self.config.sampler)
        text, mask = self.encode(prompts)
        uncond = self.encode(negatives) if scale != 1.0 else None
        size, channels = self.denoiser.config.sample_size, self.denoiser.config.in_channels
        sample = randn_tensor((len(prompts), channels, size, size), generator=generator, device=self.device,
                              dtype=text.dtype)
        sampler.set_timesteps(steps, device=self.device)
        sample = sample * getattr(sampler, "init_noise_sigma", 1.0)  # flow schedulers have neither
        for t in sampler.timesteps:
            model_input = sampler.scale_model_input(sample, t) if hasattr(sampler, "scale_model_input") else sample
            if uncond is None:
                output = self.predict(model_input, t, text, mask)
            else:
                both = self.predict(torch.cat([model_input, model_input]), t, torch.cat([uncond[0], text]),
                                    torch.cat([uncond[1], mask]))
                out_u, out_c = both.chunk(2)
                output = out_u + scale * (out_c - out_u)
            sample = sampler.step(output, t, sample, generator=generator).prev_sample
        images = (self.decode(sample).float().cpu() / 2 + 0.5).clamp(0, 1)
        if output_type == "pil":
            images = self.numpy_to_pil(images.permute(0, 2, 3, 1).numpy())
        return ImagePipelineOutput(images=images) if return_dict else (images,)
