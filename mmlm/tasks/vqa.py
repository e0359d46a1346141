"""Visual question answering: conversations about images, loss on the assistant turns only, VQA accuracy.

Data: ``data.source: shapes`` gives the embedded question families over the shapes scenes
(``mmlm.data.vqa.ShapesVQADataset``: train / val / test / compositional); a path gives conversation files (LLaVA
JSON / JSONL or the HF chat form, ``mmlm.data.conversations``; ``val_source`` / ``test_source`` for the other
splits, ``data.on_bad_row`` skipping bad rows when set to "skip"); a conversation holds up to
``model.max_images`` images, one ``<image>`` marker each, and a batch may mix counts (``collate_conversations``).
Every sample is rendered with the model's chat template (``mmlm.models.chat``), the same rendering ``vlm.chat``
and ``vlm.answer`` use. Evaluation asks each question (greedy), scores VQAv2-style accuracy
(``mmlm.eval.vqa_metrics``) overall and per family and language.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mmlm.eval.vqa_metrics import vqa_scores
from mmlm.tasks.captioning import VisionLanguageTask, vlm_display_image
from mmlm.tasks.common import CORPUS_RECORDS, unwrap

TRAIN_QUESTIONS_PER_IMAGE = 4  # shapes: distinct questions per training image (eval splits: one per image)
ANSWER_TOKENS = 8  # new tokens per generated answer in evaluation


def collate_vqa(samples: list[dict]) -> dict:
    """``collate_conversations``: one image per sample stacked as they come; a batch with any other number gets
    all its images in sample order and ``image_counts``."""
    from mmlm.data.conversations import collate_conversations

    return collate_conversations(samples)


def first_images(batch: dict) -> list:
    """Each sample's first image (None for a sample without one), for the example grid."""
    counts = batch.get("image_counts") or [1] * len(batch["answers"])
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [batch["pixel_values"][s] if k else None for s, k in zip(starts, counts)]


class ConversationEvalView(Dataset):
    """A conversation dataset seen as questions: the last assistant turn is the answer, the turns before it the
    prompt (family "conversation", language "en")."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def with_transform(self, transform):
        return ConversationEvalView(self.dataset.with_transform(transform))

    def __getitem__(self, index: int) -> dict:
        item = dict(self.dataset[index])
        messages = item["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        item.update(prompt_messages=messages[:last], answers=[messages[last]["content"]],
                    family="conversation", language="en")
        return item


class VQATask(VisionLanguageTask):
    name = "vqa"

    def splits(self) -> dict[str, Dataset]:
        if self._splits is None:
            self._splits = self._build_splits()
        return self._splits

    def _build_splits(self) -> dict[str, Dataset]:
        data = self.config.data
        if data.source == "shapes":
            from mmlm.data.vqa import build_vqa_datasets

            splits = build_vqa_datasets(data.shapes)
            splits["train"] = build_vqa_datasets(data.shapes, questions_per_image=TRAIN_QUESTIONS_PER_IMAGE)["train"]
            return splits
        from mmlm.data.conversations import ConversationDataset, read_conversations

        policy = getattr(data, "on_bad_row", "error")

        def read(path: str) -> Dataset:
            found = read_conversations(path, on_bad_row=policy, allow_absolute_paths=data.allow_absolute_paths)
            return _TransformableConversations(found.conversations, data, max_images=self.config.model.max_images)

        splits = {"train": read(data.source)}
        for split, path in (("val", data.val_source), ("test", data.test_source)):
            if path is not None:
                splits[split] = ConversationEvalView(read(path))
        return splits

    def corpus(self) -> list[str]:
        """Questions, answers and the default template's words, for a tokenizer trained from scratch."""
        from mmlm.models.chat import ROLES

        train = self.splits()["train"]
        texts = [f"{role}: " for role in ROLES]
        if hasattr(train, "question"):  # shapes: the questions without drawing the images
            from mmlm.data.vqa import render_answer, render_question

            for i in range(min(len(train), CORPUS_RECORDS)):
                question, language, _ = train.question(i)
                texts += [render_question(question, language), " " + render_answer(question, language)]
            return texts
        for conv in train.conversations[:CORPUS_RECORDS]:
            texts += [" " + m["content"].replace("<image>", "") for m in conv.messages]
        return texts

    def collate(self, samples: list) -> dict:
        return collate_vqa(samples)

    def model_inputs(self, model: nn.Module, batch: dict) -> dict:
        """The chat-rendered training tensors of ``batch`` (labels on the assistant turns; built once, kept in the
        batch); ``num_items`` and ``training_loss`` of the base class use them."""
        if "model_inputs" not in batch:
            from mmlm.models.chat import prepare_conversations

            batch["model_inputs"] = prepare_conversations(unwrap(model), batch["pixel_values"], batch["messages"],
                                                          batch.get("image_counts"))
        return batch["model_inputs"]

    def evaluate(self, model, dataset, out_dir: Path, split: str) -> dict[str, float]:
        from mmlm.models import chat

        cfg = self.config
        predictions, answers, families, languages, questions, images = [], [], [], [], [], []
        loader = DataLoader(dataset, batch_size=cfg.data.eval_batch_size, shuffle=False, collate_fn=collate_vqa)
        for batch in loader:
            if cfg.eval.max_samples is not None and len(predictions) >= cfg.eval.max_samples:
                break
            if "prompt_messages" in batch:
                counts = batch.get("image_counts")
                rows = [chat.encode_prompt(model, m, k) for m, k in
                        zip(batch["prompt_messages"], counts or [1] * len(batch["prompt_messages"]))]
                predictions += _generate(model, rows, batch["pixel_values"], counts)
                questions += [m[-1]["content"] for m in batch["prompt_messages"]]
            else:
                predictions += model.answer_pixels(batch["pixel_values"], batch["question"],
                                                   max_new_tokens=ANSWER_TOKENS, do_sample=False, num_beams=1)
                questions += batch["question"]
            answers += batch["answers"]
            families += batch["family"]
            languages += batch["language"]
            if len(images) < cfg.eval.num_examples:
                images += [im for im in first_images(batch) if im is not None][: cfg.eval.num_examples - len(images)]
        if cfg.eval.max_samples is not None:
            del predictions[cfg.eval.max_samples:], answers[cfg.eval.max_samples:]
            del families[cfg.eval.max_samples:], languages[cfg.eval.max_samples:]
        if not predictions:
            raise ValueError(f"split '{split}' is empty: nothing to evaluate")
        scores = vqa_scores(predictions, answers, families, languages)
        metrics = {"accuracy": scores["accuracy"], "num_samples": scores["num_samples"]}
        for group in ("per_family", "per_language"):
            for name, value in scores[group].items():
                metrics[f"accuracy_{name}"] = value["accuracy"]
        write_vqa_examples(out_dir, split, images, questions, predictions, answers, families, model)
        return metrics


def _generate(model, rows: list[list[int]], pixel_values: torch.Tensor | None, image_counts=None) -> list[str]:
    from mmlm.models import chat, generation

    config = generation.resolve_config(model, max_new_tokens=ANSWER_TOKENS, do_sample=False, num_beams=1)
    stops = chat.stop_token_ids(model.tokenizer, getattr(model.config, "chat_template", "auto"))
    pixels = None if pixel_values is None else pixel_values.to(model.device)
    rows = generation.generate_rows(model, rows, pixels, config, stops, image_counts=image_counts)
    return generation._texts(model, rows)


class _TransformableConversations(Dataset):
    """ConversationDataset over read conversations, rebuilt per image transform (the data policy applied)."""

    def __init__(self, conversations, data, transform=None, max_images: int | None = None):
        from mmlm.data.conversations import ConversationDataset

        self.conversations, self.data, self.max_images = conversations, data, max_images
        self.dataset = ConversationDataset(conversations, transform, on_bad_image=data.on_bad_image,
                                           max_pixels=data.max_image_pixels, max_images=max_images)

    def __len__(self) -> int:
        return len(self.dataset)

    def with_transform(self, transform):
        return _TransformableConversations(self.conversations, self.data, transform, self.max_images)

    def __getitem__(self, index: int) -> dict:
        return self.dataset[index]


def write_vqa_examples(out_dir: Path, split: str, pixel_values: list, questions: list[str], predictions: list[str],
                       answers: list, families: list[str], model) -> None:
    """A grid of the first images with question and predicted answer, and the same as JSONL."""
    from mmlm.eval.plots import image_grid

    out_dir.mkdir(parents=True, exist_ok=True)
    n = len(pixel_values)
    if n:
        labels = [f"{q}\n-> {p}" for q, p in zip(questions[:n], predictions[:n])]
        image_grid([vlm_display_image(p, model) for p in pixel_values], captions=labels,
                   path=out_dir / f"{split}_answers.png")
    with open(out_dir / f"{split}_answers.jsonl", "w", encoding="utf-8") as f:
        for q, p, a, fam in zip(questions, predictions, answers, families):
            f.write(json.dumps({"question": q, "prediction": p, "answers": a, "family": fam},
                               ensure_ascii=False) + "\n")
