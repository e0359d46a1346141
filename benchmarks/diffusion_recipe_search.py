"""Which text-to-image recipe learns shapes fastest? Prompt fidelity against training steps and time.

A minimal loop (AdamW, warmup, grad clipping, EMA; the shared Trainer replaces it in real runs)
trains one recipe on one-shape shapes data and, at each checkpoint, generates one image per test
prompt and asks an independent judge whether the image shows the prompt's colour AND kind:

- colour: pixel measurement, the mean colour of the saturated (non-background) pixels, nearest palette entry;
- kind: a tiny 3-conv CNN trained on real shapes images before the run (its accuracy on real test
  images is printed: the ceiling of the measured fidelity).

Timings on a shared CPU are contended; compare recipes by steps, and by seconds only in the same run.

    python benchmarks/diffusion_recipe_search.py --recipe latent32 --minutes 2.5 5 10
    python benchmarks/diffusion_recipe_search.py --quick           # smoke test, about a minute
"""

from __future__ import annotations

import argparse
import copy
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mmlm.config import ShapesConfig, from_dict
from mmlm.data.shapes import COLOURS, SHAPE_KINDS, generate_shapes
from mmlm.models.diffusion import TextToImage, TextToImageConfig

UNET_SMALL = {"block_out_channels": [32, 64], "attention": [False, True], "num_heads": 1}
RECIPES = {
    # The measured reference: 16x16 pixels, one head of attention at 8x8 only.
    "pixel16": {"image_size": 16, "space": "pixel", "vae": None, "denoiser": UNET_SMALL},
    # 32x32 pixels, attention only at the lowest resolution (8x8).
    "pixel32": {"image_size": 32, "space": "pixel", "vae": None,
                "denoiser": {"block_out_channels": [32, 64, 64], "attention": [False, False, True], "num_heads": 1}},
    # 32x32 images through a 2x VAE: the reference denoiser on 16x16x4 latents.
    "latent32": {"image_size": 32, "space": "latent", "denoiser": UNET_SMALL,
                 "vae": {"block_out_channels": [32, 64], "train_steps": 600}},
    # 32x32 images through a 4x VAE: a wider denoiser on 8x8x4 latents.
    "latent32_f4": {"image_size": 32, "space": "latent",
                    "denoiser": {"block_out_channels": [64, 128], "attention": [False, True], "num_heads": 1},
                    "vae": {"block_out_channels": [32, 64, 64], "train_steps": 600}},
    # 32x32 through the 2x VAE with a DiT (PixArt blocks) on 2x2 patches of the 16x16x4 latents.
    "latent32_dit": {"image_size": 32, "space": "latent",
                     "denoiser": {"kind": "transformer", "hidden_size": 128, "num_layers": 4, "num_heads": 2},
                     "vae": {"block_out_channels": [32, 64], "train_steps": 600}},
}
TRAINING = {"lr": 2e-3, "batch_size": 64, "ema_decay": 0.999, "warmup_steps": 50}


# ----------------------------------------------------------------------------- the judge
def dominant_colour(image: np.ndarray) -> str | None:
    """Palette name nearest to the mean of the saturated pixels (the shape); None if there are too few."""
    pixels = image.reshape(-1, 3).astype(np.float32)
    saturated = pixels[(pixels.max(1) - pixels.min(1)) > 60]
    if len(saturated) < 3:
        return None
    mean = saturated.mean(0)
    return min(COLOURS, key=lambda name: float(((np.array(COLOURS[name]) - mean) ** 2).sum()))


class KindJudge(nn.Module):
    """Three convolutions and a linear layer: shape kind from a (colour-agnostic) grey image."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
            nn.Linear(64, len(SHAPE_KINDS)),
        )

    @staticmethod
    def prepare(images: list[np.ndarray]) -> torch.Tensor:
        """Saturation map: shape pixels bright, background dark, whatever the colour."""
        arrays = np.stack(images).astype(np.float32) / 255.0
        return torch.from_numpy(arrays.max(-1) - arrays.min(-1)).unsqueeze(1)

    def forward(self, x):
        return self.net(x)


def train_judge(size: int, seconds: float, seed: int = 0) -> tuple[KindJudge, float]:
    """Train the kind judge on real shapes; returns it and its accuracy on real test images."""
    config = ShapesConfig(image_size=size, min_shapes=1, max_shapes=1)
    train = generate_shapes(4000, split="train", config=config, seed=seed + 100)
    test = generate_shapes(500, split="test", config=config)
    x = KindJudge.prepare([np.asarray(r.image) for r in train])
    y = torch.tensor([SHAPE_KINDS.index(r.attributes["kind"]) for r in train])
    torch.manual_seed(seed)
    judge = KindJudge()
    optimizer = torch.optim.Adam(judge.parameters(), lr=3e-3)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        index = torch.randint(len(x), (128,))
        loss = F.cross_entropy(judge(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    judge.eval()
    return judge, judge_fidelity(judge, [np.asarray(r.image) for r in test], [r.attributes for r in test])


@torch.no_grad()
def judge_fidelity(judge: KindJudge, images: list[np.ndarray], attributes: list[dict]) -> float:
    """Fraction of images whose colour AND kind match the attributes."""
    kinds = judge(KindJudge.prepare(images)).argmax(1).tolist()
    hits = [dominant_colour(im) == a["colour"] and SHAPE_KINDS[k] == a["kind"]
            for im, k, a in zip(images, kinds, attributes)]
    return float(np.mean(hits))


# ----------------------------------------------------------------------------- the loop
class EMA:
    """Exponential moving average of the trainable weights, with the usual warmup of the decay."""

    def __init__(self, modules: list[nn.Module], decay: float):
        self.params = [p for m in modules for p in m.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self):
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - decay)

    @torch.no_grad()
    def swap(self):
        """Exchange live and EMA weights (call twice to restore)."""
        for p, s in zip(self.params, self.shadow):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)


def evaluate(model, judge, prompts, attributes, scheduler, steps, save: str | None = None) -> float:
    images = model.generate(prompts, num_inference_steps=steps, scheduler=scheduler, seed=0, batch_size=64)
    if save:
        grid = np.concatenate([np.concatenate([np.asarray(im) for im in images[r : r + 8]], 1)
                               for r in range(0, len(images) - 7, 8)], 0)
        Image.fromarray(grid).save(save)
    return judge_fidelity(judge, [np.asarray(im) for im in images], attributes)


def run(recipe: str, overrides: dict, minutes: list[float], at_steps: list[int], n_train: int, n_eval: int,
        judge_seconds: float, seed: int, final_ddim: bool, samples_dir: str | None = None,
        save_vae: str | None = None) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    spec = copy.deepcopy(RECIPES[recipe])
    train_cfg = {**TRAINING, **{k: v for k, v in overrides.items() if k in TRAINING}}
    spec.update({k: v for k, v in overrides.items() if k not in TRAINING})
    config = from_dict(TextToImageConfig, spec, where="model")
    size = config.image_size
    shapes = ShapesConfig(image_size=size, min_shapes=1, max_shapes=1)

    judge, ceiling = train_judge(size, judge_seconds, seed)
    print(f"recipe {recipe} {overrides or ''}; judge on real test images: {ceiling:.1%}", flush=True)

    records = generate_shapes(n_train, split="train", config=shapes, seed=seed)
    test = generate_shapes(n_eval, split="test", config=shapes)
    prompts, attributes = [r.captions[0] for r in test], [r.attributes for r in test]
    model = TextToImage.from_config(config, corpus=[c for r in records for c in r.captions])
    transform = model.image_transform(train=True)
    pixels = torch.stack([transform(r.image) for r in records])
    captions = [r.captions for r in records]

    clock = time.perf_counter()
    if model.needs_autoencoder_fit:
        stats = model.fit_autoencoder(pixels, seed=seed)
        print(f"  vae: {stats['steps']} steps {stats['seconds']:.0f}s mse {stats['mse']:.4f} "
              f"scale {stats['scaling_factor']:.3f}", flush=True)
        if save_vae:  # reuse in later runs with --set vae.name_or_path=DIR (its scale is in its config)
            model.vae.save_pretrained(save_vae)
    trainable = list(model.trainable_groups().values())
    params = [p for m in trainable for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train_cfg["lr"], weight_decay=0.0)
    warmup = train_cfg["warmup_steps"]
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    ema = EMA(trainable, train_cfg["ema_decay"])
    n_params = sum(p.numel() for p in model.denoiser.parameters())
    print(f"  denoiser {n_params / 1e6:.2f}M params; batch {train_cfg['batch_size']}", flush=True)

    step, spent = 0, time.perf_counter() - clock
    pending = sorted(at_steps) if at_steps else sorted(minutes)
    due = (lambda: step >= pending[0]) if at_steps else (lambda: spent >= 60 * pending[0])
    model.train()
    while pending:
        tick = time.perf_counter()
        index = torch.randint(len(pixels), (train_cfg["batch_size"],))
        batch_captions = [random.choice(captions[i]) for i in index.tolist()]
        loss = model.training_loss(pixels[index], batch_captions)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_schedule.step()
        ema.update()
        step += 1
        spent += time.perf_counter() - tick
        if due():
            pending.pop(0)
            ema.swap()
            save = f"{samples_dir}/{recipe}_step{step}.png" if samples_dir else None
            fid = evaluate(model, judge, prompts, attributes, "dpm++", 20, save)
            line = f"  {spent / 60:5.1f} min  step {step:5d}  loss {loss.item():.4f}  fidelity dpm++20 {fid:.1%}"
            if final_ddim and not pending:
                line += f"  ddim50 {evaluate(model, judge, prompts, attributes, 'ddim', 50):.1%}"
            ema.swap()
            model.train()
            print(line + f"  ({step / spent:.2f} steps/s, contended)", flush=True)


def parse_overrides(pairs: list[str]) -> dict:
    """``key=value`` with YAML-ish values; dotted keys for nested sections (denoiser.num_heads=2)."""
    import yaml

    out: dict = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="latent32")
    parser.add_argument("--set", nargs="*", default=[], help="overrides, e.g. lr=1e-3 denoiser.num_heads=2")
    parser.add_argument("--minutes", type=float, nargs="+", default=[2.5, 5.0, 10.0])
    parser.add_argument("--at-steps", type=int, nargs="*", default=[], help="evaluate at these steps instead")
    parser.add_argument("--n-train", type=int, default=5000)
    parser.add_argument("--n-eval", type=int, default=96)
    parser.add_argument("--judge-seconds", type=float, default=40.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--samples-dir", default=None, help="write a grid of the generated images at each checkpoint")
    parser.add_argument("--save-vae", default=None, help="save the trained VAE here for later runs")
    parser.add_argument("--quick", action="store_true", help="tiny budgets: checks the script runs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = parse_overrides(args.set)
    if args.quick:
        args.minutes, args.at_steps, args.n_train, args.n_eval, args.judge_seconds = [0.1, 0.2], [], 256, 16, 5.0
        if RECIPES[args.recipe]["space"] == "latent":
            overrides.setdefault("vae", {})["train_steps"] = 10
    if "vae" in overrides and isinstance(RECIPES[args.recipe].get("vae"), dict):
        overrides["vae"] = {**RECIPES[args.recipe]["vae"], **overrides["vae"]}
    if "denoiser" in overrides:
        overrides["denoiser"] = {**RECIPES[args.recipe]["denoiser"], **overrides["denoiser"]}
    run(args.recipe, overrides, args.minutes, args.at_steps, args.n_train, args.n_eval, args.judge_seconds, args.seed,
        final_ddim=True, samples_dir=args.samples_dir, save_vae=args.save_vae)


if __name__ == "__main__":
    main()
