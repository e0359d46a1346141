"""Text-to-image: a TextToImage denoiser trained on image-text pairs, judged by prompt fidelity and FID/KID."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from mmlm.eval import (
    ShapesJudge,
    frechet_distance,
    kernel_inception_distance,
    prompt_fidelity,
    train_shapes_judge,
)
from mmlm.eval.plots import image_grid
from mmlm.tasks.common import ImageTextTask, caption_corpus, load_vision_language_model

AUTOENCODER_IMAGES = 4000  # training images for the VAE pre-stage
_MASK64 = (1 << 64) - 1


def mix_seed(*parts: int) -> int:
    """A 64-bit generator seed from integers (a splitmix64 round per part): the same in every process and run."""
    x = 0
    for part in parts:
        x = (x ^ (part & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
        x ^= x >> 31
    return x


class DiffusionTask(ImageTextTask):
    name = "diffusion"

    def build_model(self) -> nn.Module:
        from mmlm.models.diffusion import TextToImage

        return TextToImage.from_config(self.config.model, corpus=caption_corpus(self.splits()["train"]))

    def prepare_once(self, model) -> None:
        """The VAE pre-stage when it is due (the trainer runs it once, on the main process and its device)."""
        if model.needs_autoencoder_fit:
            self.fit_autoencoder(model)

    def fit_autoencoder(self, model) -> dict:
        """The latent-space pre-stage: train the VAE on training images, set its latent scale."""
        train = self.splits()["train"].with_transform(model.image_transform())
        n = min(len(train), AUTOENCODER_IMAGES)
        images = torch.stack([train[i]["pixel_values"] for i in range(n)])
        started = time.perf_counter()
        stats = model.fit_autoencoder(images, seed=self.config.train.seed)
        stats["seconds"] = time.perf_counter() - started
        self.autoencoder_stats = stats
        return stats

    def build_datasets(self, model: nn.Module) -> dict:
        datasets = super().build_datasets(model)
        self._train_split = datasets.get("train")  # its epoch keys the training draws (sample_generators)
        return datasets

    def sample_generators(self, batch: dict) -> list[torch.Generator] | None:
        """One CPU generator per sample, seeded by (``train.seed``, epoch, the sample's dataset index): a sample's
        caption dropout, noise and timestep are then the same however a step's samples are split over processes
        and micro-batches (2 x 4 trains like 1 x 8), differ from epoch to epoch and replay on resume. None
        (torch's global RNG) for batches without an ``index``."""
        if "index" not in batch:
            return None
        epoch = getattr(getattr(self, "_train_split", None), "epoch", None) or 0
        seed = self.config.train.seed
        return [torch.Generator().manual_seed(mix_seed(seed, epoch, int(i))) for i in batch["index"]]

    def prompts_and_targets(self, batch: dict) -> tuple[list[str], list[dict]]:
        """The prompt each sample's image is generated from and the attributes that image should show."""
        return self.training_captions(batch), batch["attributes"]

    def training_loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        prompts, _ = self.prompts_and_targets(batch)
        return model(batch["pixel_values"], prompts, generator=self.sample_generators(batch))

    def evaluation_prompts(self, dataset) -> tuple[list[str], list[dict]]:
        """``eval.prompts`` when given, else the first caption and the attributes of the split's first records."""
        cfg = self.config
        if cfg.eval.prompts:
            return list(cfg.eval.prompts), [{} for _ in cfg.eval.prompts]
        n = min(len(dataset), cfg.eval.max_samples or 64)
        records = [dataset.records[i] for i in range(n)]
        return [r.captions[0] for r in records], [r.attributes for r in records]

    def judge(self, out_dir: Path, image_size: int) -> tuple[ShapesJudge, dict]:
        """The independent shapes judge, trained once per run folder and cached next to the evaluations."""
        path = out_dir.parent / "shapes_judge.safetensors"
        if path.is_file():
            return ShapesJudge.load(path), {}
        judge, report = train_shapes_judge(steps=self.config.eval.judge_steps,
                                           image_size=image_size, seed=self.config.train.seed)
        judge.save(path)
        return judge, report

    def evaluate(self, model, dataset, out_dir: Path, split: str) -> dict[str, float]:
        cfg = self.config
        out_dir.mkdir(parents=True, exist_ok=True)
        prompts, targets = self.evaluation_prompts(dataset)
        metrics: dict = {}
        generated: dict[str, list] = {}
        for spec in cfg.eval.samplers:
            name, _, steps = spec.partition(":")
            started = time.perf_counter()
            images = model.generate(prompts, num_inference_steps=int(steps or 20), scheduler=name, seed=cfg.train.seed,
                                    guidance_scale=cfg.model.guidance_scale)  # the run's, overrides included
            generated[spec] = images
            metrics[f"seconds_per_image/{spec}"] = (time.perf_counter() - started) / len(images)
        main = generated[cfg.eval.samplers[0]]
        n_show = min(len(main), cfg.eval.num_examples)
        image_grid(main[:n_show], captions=prompts[:n_show], path=out_dir / f"{split}_generated.png")
        if cfg.data.source == "shapes" and all(targets):
            judge, judge_report = self.judge(out_dir, model.config.image_size)  # a pipeline's: known once built
            for judged_split in ("test", "compositional"):  # the judge's own accuracy on real images
                if judged_split in judge_report:
                    metrics[f"judge_accuracy/{judged_split}"] = judge_report[judged_split]["fidelity"]
            for spec, images in generated.items():
                fid = prompt_fidelity(images, targets, judge)
                metrics[f"fidelity/{spec}"] = fid["fidelity"]
                metrics[f"colour_accuracy/{spec}"] = fid["colour_accuracy"]
                metrics[f"kind_accuracy/{spec}"] = fid["kind_accuracy"]
            metrics["fidelity"] = metrics[f"fidelity/{cfg.eval.samplers[0]}"]
            real = [dataset.records[i].image for i in range(len(prompts))]
            real_feats, fake_feats = judge.features(real), judge.features(main)
            metrics["fid"] = frechet_distance(real_feats, fake_feats)
            metrics.update(kernel_inception_distance(real_feats, fake_feats, num_subsets=20))
            if cfg.eval.captioner:
                metrics["round_trip"] = self.round_trip(main, targets)
        metrics["num_images"] = len(main)
        return metrics

    def round_trip(self, images: list, targets: list[dict]) -> float:
        """Caption the generated images with a shapes captioner: the share whose main shape matches the prompt."""
        from mmlm.data.shapes import parse_caption

        captioner = load_vision_language_model(self.config.eval.captioner)
        hits = 0
        for caption, target in zip(captioner.caption(images), targets):
            shapes = parse_caption(caption, self.config.data.shapes.language) or []
            main = target["shapes"][0]
            hits += any(s["kind"] == main["kind"] and s["colour"] == main["colour"] for s in shapes)
        return hits / len(images)
