"""Captioning: image -> text with a VisionLanguageModel, scored by BLEU/ROUGE-L/CIDEr (+ exact match on shapes)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mmlm.eval import caption_scores
from mmlm.tasks.common import ImageTextTask, caption_corpus, iterate_dataset, unwrap

CAPTION_TOKENS = 48  # new tokens per generated caption in evaluation


class VisionLanguageTask(ImageTextTask):
    """What captioning and classification by prompt share: the model, the data, the loss."""

    def build_model(self) -> nn.Module:
        from mmlm.models import VisionLanguageModel

        return VisionLanguageModel.from_config(self.config.model, corpus=self.corpus())

    def corpus(self) -> list[str]:
        """Texts for a tokenizer trained from scratch."""
        return caption_corpus(self.splits()["train"])

    def prompts_and_targets(self, batch: dict) -> tuple[list[str] | None, list[str]]:
        """The prompt each sample gets (None: the model's default) and the text it is trained to produce."""
        return None, self.training_captions(batch)

    def training_loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        prompts, targets = self.prompts_and_targets(batch)
        inputs = unwrap(model).prepare_batch(batch["pixel_values"], targets, prompts)
        return model(**inputs).loss


class CaptioningTask(VisionLanguageTask):
    name = "captioning"

    def evaluate(self, model, dataset, out_dir: Path, split: str) -> dict[str, float]:
        cfg = self.config
        predictions, references, attributes, images = [], [], [], []
        for batch in iterate_dataset(dataset, cfg.data.eval_batch_size, cfg.eval.max_samples):
            predictions += model.caption_pixels(batch["pixel_values"], max_new_tokens=CAPTION_TOKENS)
            references += batch["captions"]
            attributes += batch["attributes"]
            if len(images) < cfg.eval.num_examples:
                images += list(batch["pixel_values"][: cfg.eval.num_examples - len(images)])
        if not predictions:
            raise ValueError(f"split '{split}' is empty: nothing to evaluate")
        metrics = caption_scores(predictions, references)
        if cfg.data.source == "shapes":
            from mmlm.data.shapes import captions_match

            language = cfg.data.shapes.language
            hits = [captions_match(p, a, language) for p, a in zip(predictions, attributes)]
            metrics["exact_match"] = sum(hits) / len(hits)
        metrics["num_samples"] = len(predictions)
        write_caption_examples(out_dir, split, images, predictions, references, model)
        return metrics


def write_caption_examples(out_dir: Path, split: str, pixel_values: list, predictions: list[str],
                           references: list[list[str]], model) -> None:
    """A grid of the first images with their predicted captions, and the same as JSONL."""
    import json

    from mmlm.eval.plots import image_grid

    out_dir.mkdir(parents=True, exist_ok=True)
    images = [vlm_display_image(p, model) for p in pixel_values]
    n = len(images)
    if n:
        image_grid(images, captions=predictions[:n], path=out_dir / f"{split}_captions.png")
    with open(out_dir / f"{split}_captions.jsonl", "w", encoding="utf-8") as f:
        for pred, refs in zip(predictions[:n], references[:n]):
            f.write(json.dumps({"prediction": pred, "references": refs}, ensure_ascii=False) + "\n")


def vlm_display_image(pixel_values: torch.Tensor, model) -> torch.Tensor:
    """Undo the encoder's mean/std normalisation: a [0, 1] CHW tensor for pictures."""
    config = model.vision.data_config
    mean = torch.tensor(config["mean"]).view(-1, 1, 1)
    std = torch.tensor(config["std"]).view(-1, 1, 1)
    return (pixel_values.cpu() * std + mean).clamp(0, 1)
