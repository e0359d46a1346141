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

    def model_inputs(self, model: nn.Module, batch: dict) -> dict:
        """The tokenised training tensors of ``batch`` (built once, kept in the batch), rendered as ``caption`` and
        ``classify`` render their prompts (plain, or a user turn in the LM's chat template: ``models.rendering``)."""
        if "model_inputs" not in batch:
            from mmlm.models.rendering import prepare_captions

            prompts, targets = self.prompts_and_targets(batch)
            batch["model_inputs"] = prepare_captions(unwrap(model), batch["pixel_values"], targets, prompts)
        return batch["model_inputs"]

    def num_items(self, model: nn.Module, batch: dict) -> int:
        """The label tokens the loss sums over: the trainer normalises by their count over a whole step."""
        from mmlm.models.sequence import count_label_tokens

        return count_label_tokens(self.model_inputs(model, batch)["labels"])

    def training_loss(self, model: nn.Module, batch: dict, num_items_in_batch: float | None = None) -> torch.Tensor:
        return model(**self.model_inputs(model, batch), num_items_in_batch=num_items_in_batch).loss


class CaptioningTask(VisionLanguageTask):
    name = "captioning"

    def predict(self, model, dataset, split: str) -> list[dict]:
        """Each sample's generated caption, references, attributes (and its image, for the first examples)."""
        rows = []
        for batch in iterate_dataset(dataset, self.config.data.eval_batch_size, self.config.eval.max_samples):
            predictions = model.caption_pixels(batch["pixel_values"], max_new_tokens=CAPTION_TOKENS)
            for i, prediction in enumerate(predictions):
                show = len(rows) < self.config.eval.num_examples
                rows.append({"prediction": prediction, "references": batch["captions"][i],
                             "attributes": batch["attributes"][i],
                             "image": vlm_display_image(batch["pixel_values"][i], model) if show else None})
        return rows

    def evaluate(self, model, dataset, out_dir: Path, split: str) -> dict[str, float]:
        return self.score(self.predict(model, dataset, split), dataset, out_dir, split)

    def score(self, rows: list[dict], dataset, out_dir: Path, split: str) -> dict[str, float]:
        cfg = self.config
        if not rows:
            raise ValueError(f"split '{split}' is empty: nothing to evaluate")
        predictions = [r["prediction"] for r in rows]
        references = [r["references"] for r in rows]
        attributes = [r["attributes"] for r in rows]
        images = [r["image"] for r in rows[: cfg.eval.num_examples] if r["image"] is not None]
        metrics = caption_scores(predictions, references)
        if cfg.data.source == "shapes":
            from mmlm.data.shapes import captions_match

            language = cfg.data.shapes.language
            hits = [captions_match(p, a, language) for p, a in zip(predictions, attributes)]
            metrics["exact_match"] = sum(hits) / len(hits)
        metrics["num_samples"] = len(predictions)
        write_caption_examples(out_dir, split, images, predictions, references)
        return metrics


def write_caption_examples(out_dir: Path, split: str, images: list, predictions: list[str],
                           references: list[list[str]]) -> None:
    """A grid of the first images ([0, 1] CHW tensors) with their predicted captions, and the same as JSONL."""
    import json

    from mmlm.eval.plots import image_grid

    out_dir.mkdir(parents=True, exist_ok=True)
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
