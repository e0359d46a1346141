"""Rectified flow (model.objective: flow): interpolation, target, logit-normal times, loss, samplers, save/load."""

import json
import math
import subprocess
import sys

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from test_diffusers_pipeline import SCRATCH_PIPELINE
from test_diffusion import CORPUS, random_images, tiny_config

from mmlm.config import ConfigError, from_dict, to_dict
from mmlm.models.diffusion import DenoiserConfig, TextToImage, TextToImageConfig, flow
from mmlm.models.diffusion.config import FlowConfig

PROMPTS = ["a red circle", "a blue square"]


def flow_model(seed=0, **overrides) -> TextToImage:
    torch.manual_seed(seed)
    base = dict(objective="flow", space="patch", denoiser=DenoiserConfig(
        block_out_channels=(8, 16), attention=(False, True), norm_num_groups=4, pooled_text=True))
    return TextToImage.from_config(tiny_config(**{**base, **overrides}), corpus=CORPUS)


# ------------------------------------------------------------------ the objective
def test_the_path_runs_from_the_image_at_t0_to_the_noise_at_t1_and_the_target_is_its_velocity():
    x0, noise = torch.randn(3, 12, 4, 4), torch.randn(3, 12, 4, 4)
    torch.testing.assert_close(flow.interpolate(x0, noise, torch.zeros(3)), x0)
    torch.testing.assert_close(flow.interpolate(x0, noise, torch.ones(3)), noise)
    t = torch.tensor([0.25, 0.5, 0.9])
    mid = flow.interpolate(x0, noise, t)
    torch.testing.assert_close(mid[1], (x0[1] + noise[1]) / 2)
    # d x_t / d t by finite differences is the target, at every t
    step = 1e-3
    derivative = (flow.interpolate(x0, noise, t + step) - mid) / step
    torch.testing.assert_close(derivative, flow.velocity(x0, noise), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(flow.timestep_input(t, 1000), t * 1000)


def test_training_times_follow_the_logit_normal_and_the_shift():
    generator = torch.Generator().manual_seed(0)
    t = flow.sample_times(200_000, FlowConfig(logit_mean=0.5, logit_std=0.8), generator=generator)
    assert 0 < t.min() and t.max() < 1
    logit = torch.logit(t.double())
    assert logit.mean().item() == pytest.approx(0.5, abs=0.01)
    assert logit.std().item() == pytest.approx(0.8, abs=0.01)
    # shift 3 moves every time towards the noise, as FlowMatchEulerDiscreteScheduler(shift=3) moves its sigmas
    plain = flow.sample_times(1000, FlowConfig(), generator=torch.Generator().manual_seed(1))
    shifted = flow.sample_times(1000, FlowConfig(shift=3.0), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(shifted, 3 * plain / (1 + 2 * plain))
    assert (shifted > plain).all()
    training_sigmas = FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas  # before set_timesteps: all 1000
    torch.testing.assert_close(training_sigmas, flow.shift_times(torch.linspace(1, 1e-3, 1000), 3.0))


def test_the_loss_is_the_velocity_mse_at_the_drawn_times_with_timestep_t_x_1000():
    seen = {}

    def predict(sample, timestep, text, text_mask):
        seen["sample"], seen["timestep"] = sample, timestep
        return torch.zeros_like(sample)

    x0, noise, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([0.2, 0.7])
    loss = flow.loss(predict, x0, noise, t, None, None, 1000)
    torch.testing.assert_close(seen["sample"], flow.interpolate(x0, noise, t))
    torch.testing.assert_close(seen["timestep"], torch.tensor([200.0, 700.0]))
    torch.testing.assert_close(loss, ((noise - x0) ** 2).mean())


def test_a_few_training_steps_lower_the_loss():
    model = flow_model()
    model.config.caption_dropout = 0.0
    images = torch.full((8, 3, 16, 16), -0.6)
    images[:, 0, 4:12, 4:12] = 0.9  # a red square on grey: something to learn (random pixels leave little)
    captions = ["a red square"] * 8
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def fixed_loss():
        torch.manual_seed(123)  # the same times and noise each time
        with torch.no_grad():
            return model.training_loss(images, captions).item()

    before = fixed_loss()
    for _ in range(30):
        optimizer.zero_grad()
        model.training_loss(images, captions).backward()
        optimizer.step()
    assert math.isfinite(before) and fixed_loss() < 0.75 * before


# ------------------------------------------------------------------ sampling and saving
@pytest.mark.parametrize("scheduler", ["euler", "heun", "dpm++"])
def test_sampling_is_deterministic_for_a_seed(scheduler):
    model = flow_model()
    first = model.generate(PROMPTS, num_inference_steps=3, seed=7, scheduler=scheduler, output_type="pt")
    again = model.generate(PROMPTS, num_inference_steps=3, seed=7, scheduler=scheduler, output_type="pt",
                           batch_size=1)
    other = model.generate(PROMPTS, num_inference_steps=3, seed=8, scheduler=scheduler, output_type="pt")
    torch.testing.assert_close(first, again)
    assert not torch.allclose(first, other)


def test_euler_takes_the_straight_path_in_one_step_when_the_velocity_is_exact():
    """A denoiser that returns noise - x0 for a known x0: one Euler step from the noise lands on x0."""
    model = flow_model()
    sampler = model.make_sampler("euler")
    sampler.set_timesteps(1)
    noise, x0 = torch.randn(1, 12, 8, 8), torch.zeros(1, 12, 8, 8)
    out = sampler.step(flow.velocity(x0, noise), sampler.timesteps[0], noise).prev_sample
    torch.testing.assert_close(out, x0, atol=1e-6, rtol=0)


def test_save_and_reload_give_the_same_images_and_the_flow_scheduler(tmp_path):
    model = flow_model(flow=FlowConfig(logit_mean=0.2, shift=1.5))
    model.save_pretrained(tmp_path / "gen")
    scheduler = json.loads((tmp_path / "gen" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler" and scheduler["shift"] == 1.5
    assert json.loads((tmp_path / "gen" / "model_index.json").read_text())["sampler"] == "euler"
    reloaded = TextToImage.from_pretrained(tmp_path / "gen")
    assert reloaded.config == model.config and isinstance(reloaded.noise_scheduler, FlowMatchEulerDiscreteScheduler)
    for scheduler in ("euler", "dpm++"):
        expected = model.generate(PROMPTS, num_inference_steps=3, seed=5, scheduler=scheduler, output_type="pt")
        torch.testing.assert_close(reloaded.generate(PROMPTS, num_inference_steps=3, seed=5, scheduler=scheduler,
                                                     output_type="pt"), expected)


def test_the_saved_folder_samples_the_same_through_diffusers_without_mmlm(tmp_path):
    model = flow_model()
    model.save_pretrained(tmp_path / "gen")
    expected = model.generate(PROMPTS, num_inference_steps=3, guidance_scale=2.5, seed=5, output_type="pt")
    subprocess.run([sys.executable, "-c", SCRATCH_PIPELINE, str(tmp_path / "gen"), str(tmp_path / "out.pt")],
                   check=True, capture_output=True, text=True, timeout=600)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, atol=1e-4, rtol=0)


# ------------------------------------------------------------------ config
def test_the_flow_config_round_trips_and_defaults_to_euler():
    config = tiny_config(objective="flow", flow=FlowConfig(logit_mean=-0.5, logit_std=1.2, shift=2.0))
    assert config.scheduler == "euler"
    assert from_dict(TextToImageConfig, to_dict(config)) == config
    assert tiny_config().scheduler == "dpm++" and tiny_config().flow is None
    assert from_dict(TextToImageConfig, {"objective": "flow"}).flow == FlowConfig()


@pytest.mark.parametrize(
    "data, message",
    [
        ({"objective": "score"}, r"model\.objective: expected one of \('diffusion', 'flow'\), got 'score'"),
        ({"objective": "flow", "scheduler": "ddim"}, r"model\.scheduler: .*'euler', 'heun', 'dpm\+\+'.*'ddim'"),
        ({"scheduler": "heun"}, r"model\.scheduler: .*'ddpm'.*objective 'diffusion'"),
        ({"flow": {"shift": 2.0}}, r"model\.flow: set only with model\.objective: flow"),
        ({"objective": "flow", "flow": {"logit_std": 0.0}}, r"model\.flow\.logit_std: expected .*> 0, got 0\.0"),
        ({"objective": "flow", "flow": {"shift": -1.0}}, r"model\.flow\.shift: expected .*> 0, got -1\.0"),
        ({"objective": "flow", "noise_shift": 2.0}, r"model\.noise_shift: .*model\.flow\.shift"),
        ({"objective": "flow", "pipeline": "some/sd-folder"}, r"model\.objective: flow .*from-scratch.*some/sd-folder"),
    ],
)
def test_bad_flow_config_names_the_key_and_the_value(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(TextToImageConfig, data, where="model")


def test_a_flow_model_refuses_ddpm_samplers_by_name():
    with pytest.raises(ValueError, match=r"a flow model samples with one of \['euler', 'heun', 'dpm\+\+'\]"):
        flow_model().generate(PROMPTS, num_inference_steps=2, scheduler="ddim")
