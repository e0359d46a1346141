"""Classification by prompt: the VisionLanguageModel scores label strings in a template ("a photo of a {}").

Training teaches the model to say ``template.format(label)`` about each image, so a classifier is
a captioner of its labels and the same model also works zero-shot on other label sets. With an LM's own chat
template the text before the slot is the user's turn and the label the reply, in training and in scoring alike
(``mmlm.models.rendering``).
"""

from __future__ import annotations

from pathlib import Path

from mmlm.eval import classification_report, save_confusion_matrix_png, write_metrics
from mmlm.tasks.captioning import VisionLanguageTask, vlm_display_image
from mmlm.tasks.common import caption_corpus, iterate_dataset


class ClassificationTask(VisionLanguageTask):
    name = "classification"

    @property
    def templates(self) -> list[str]:
        templates = self.config.eval.templates
        if not templates or any("{}" not in t for t in templates):
            raise ValueError(f"eval.templates: expected templates with a '{{}}' slot, got {templates!r}")
        return templates

    def corpus(self) -> list[str]:
        texts = caption_corpus(self.splits()["train"], texts_of=lambda r: [])
        labels = self.labels()
        return texts + [t.format(label) for t in self.templates for label in labels]

    def labels(self) -> list[str]:
        """Candidate labels: ``eval.labels`` when given, else every label of the training split, sorted."""
        if self.config.eval.labels:
            return list(self.config.eval.labels)
        if self.config.data.source == "shapes":
            return shapes_label_space(self.config.data.label_field)
        train = self.splits()["train"]
        records = getattr(train, "records", None)
        if records is None:
            raise ValueError("eval.labels: required for streamed data (labels cannot be listed without a full pass)")
        found = sorted({train.label_of(i) for i in range(len(records))} - {None})
        if not found:
            raise ValueError(f"data '{self.config.data.source}': no labels found for label_field "
                             f"'{self.config.data.label_field}'")
        return found

    def prompts_and_targets(self, batch: dict) -> tuple[list[str], list[str]]:
        """Prompt = the first template's text before the slot, target = the label (and the text after it),
        split exactly as ``classify`` splits them when it scores the labels."""
        from mmlm.models.vlm import split_template

        missing = [i for i, label in enumerate(batch["label"]) if label is None]
        if missing:
            raise ValueError(f"classification needs a label per sample; batch items {missing} have none "
                             f"(label_field '{self.config.data.label_field}')")
        prompt, targets = split_template(self.templates[0], batch["label"])
        return [prompt] * len(targets), targets

    def predict(self, model, dataset, split: str) -> list[dict]:
        """Each sample's true label, label probabilities (and its image, for the first examples)."""
        cfg = self.config
        labels = self.labels()
        rows = []
        for batch in iterate_dataset(dataset, cfg.data.eval_batch_size, cfg.eval.max_samples):
            probs = model.classify_pixels(batch["pixel_values"], labels, self.templates)
            for image, label, row in zip(batch["pixel_values"], batch["label"], probs):
                show = len(rows) < cfg.eval.num_examples
                rows.append({"label": label, "probs": row.float().cpu(),
                             "image": vlm_display_image(image, model) if show else None})
        return rows

    def evaluate(self, model, dataset, out_dir: Path, split: str) -> dict[str, float]:
        return self.score(self.predict(model, dataset, split), dataset, out_dir, split)

    def score(self, rows: list[dict], dataset, out_dir: Path, split: str) -> dict[str, float]:
        cfg = self.config
        labels = self.labels()
        if not rows:
            raise ValueError(f"split '{split}' is empty: nothing to evaluate")
        y_true = [r["label"] for r in rows]
        y_pred = [labels[int(r["probs"].argmax())] for r in rows]
        examples = []
        for r in rows[: cfg.eval.num_examples]:
            if r["image"] is not None:
                top = r["probs"].topk(min(3, len(labels)))
                text = ", ".join(f"{labels[i]} {p:.2f}" for p, i in zip(top.values.tolist(), top.indices.tolist()))
                examples.append((r["image"], text))
        report = classification_report(y_true, y_pred, labels)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_confusion_matrix_png(report["confusion_matrix"], labels, out_dir / f"{split}_confusion.png")
        from mmlm.eval.plots import image_grid

        if examples:
            image_grid([e[0] for e in examples], captions=[e[1] for e in examples],
                       path=out_dir / f"{split}_examples.png")
        write_metrics({"per_class": report["per_class"], "labels": labels,
                       "confusion_matrix": report["confusion_matrix"]}, out_dir / f"{split}_per_class.json")
        return {k: v for k, v in report.items() if isinstance(v, (int, float))}


def shapes_label_space(label_field: str) -> list[str]:
    """Every label the shapes dataset can produce for ``label_field`` ("kind", "colour", "colour+kind", ...)."""
    import itertools

    from mmlm.data.shapes import COLOURS, POSITIONS, SHAPE_KINDS, SIZES

    values = {"label": SHAPE_KINDS, "kind": SHAPE_KINDS, "colour": tuple(COLOURS), "size": SIZES,
              "position": POSITIONS, "count": ("1", "2", "3", "4", "5")}
    parts = label_field.split("+")
    unknown = [p for p in parts if p not in values]
    if unknown:
        raise ValueError(f"data.label_field: {unknown} are not shapes attributes; expected parts of {list(values)}")
    return [" ".join(combo) for combo in itertools.product(*(values[p] for p in parts))]
