"""The demo's optional VQA stage (``mmlm demo --vqa``): the demo captioner, fine-tuned to answer questions.

The two-stage recipe of ``configs/shapes_vqa.yaml``: the trained captioner (``model.init_from``) learns the
question families on the shapes images (colour of a kind, kind at a position, counting, existence,
relations) in its chat format; evaluated on test and on the held-out colour-kind pairs, with a few
questions per test image shown under the images in the report.
"""

from __future__ import annotations

from pathlib import Path

# The captioner's tokenizer never saw the question words, so it spells some in bytes: prompts up to ~73 tokens.
MAX_LENGTH = 80
QUICK_VQA = ["train.max_steps=100", "train.max_minutes=0.3", "train.warmup_steps=10", "data.shapes.n_test=32",
             "data.shapes.n_compositional=32", "data.shapes.n_val=16", "eval.max_samples=32"]
QUESTIONS_PER_IMAGE = 3
SHOWN_IMAGES = 8


def vqa_overrides(captioner_dir: Path, quick: bool) -> list[str]:
    """Overrides of ``configs/shapes_vqa.yaml`` for the demo: start from the demo's captioner."""
    return [f"model.init_from={captioner_dir}", f"model.max_length={MAX_LENGTH}"] + (QUICK_VQA if quick else [])


def shown_questions(cfg, n_images: int = SHOWN_IMAGES) -> tuple[list, list[list[tuple[str, str]]]]:
    """``n_images`` test images and, per image, ``QUESTIONS_PER_IMAGE`` (question, answer) pairs of distinct
    families where the scene allows (the evaluation's own question draw; each image drawn once)."""
    from mmlm.data.vqa import ShapesVQADataset, render_answer, render_question

    dataset = ShapesVQADataset(n_images, split="test", config=cfg.data.shapes, questions_per_image=QUESTIONS_PER_IMAGE)
    images = [dataset.records[i].image for i in range(n_images)]
    pairs: list[list[tuple[str, str]]] = [[] for _ in range(n_images)]
    for index in range(len(dataset)):
        question, language, _ = dataset.question(index)  # without drawing the image again
        pair = (render_question(question, language), render_answer(question, language))
        if pair not in pairs[index // QUESTIONS_PER_IMAGE]:  # a small scene repeats its last question
            pairs[index // QUESTIONS_PER_IMAGE].append(pair)
    return images, pairs


def answered_texts(model, images: list, pairs: list[list[tuple[str, str]]]) -> tuple[list[str], int, int]:
    """One text per image, "question -> answer" for each of its questions (the truth beside a wrong answer), and
    (right, asked) over all of them."""
    from mmlm.eval.vqa_metrics import normalize_answer
    from mmlm.tasks.vqa import ANSWER_TOKENS

    flat_images = [image for image, qs in zip(images, pairs) for _ in qs]
    questions = [q for qs in pairs for q, _ in qs]
    predicted = iter(model.answer(flat_images, questions, max_new_tokens=ANSWER_TOKENS, do_sample=False,
                                  num_beams=1))
    texts, right, asked = [], 0, 0
    for qs in pairs:
        parts = []
        for question, truth in qs:
            answer = next(predicted).strip()
            ok = normalize_answer(answer) == normalize_answer(truth)
            right, asked = right + ok, asked + 1
            parts.append(f"{question} -> {answer}" + ("" if ok else f" (truth: {truth})"))
        texts.append("; ".join(parts))
    return texts, right, asked


def report_section(report, model, cfg, metrics: dict) -> None:
    """The VQA section: figures beside their bars, then test images with their questions and answers."""
    from mmlm.eval.bars import BARS

    report.section("Visual question answering")
    report.text("The captioner fine-tuned on questions about the shapes images (configs/shapes_vqa.yaml with "
                "model.init_from the demo's captioner), answering in its chat format; accuracy is VQAv2-style "
                "(normalised exact match), per family in metrics.json.")
    report.results(metrics, BARS["vqa"])
    images, pairs = shown_questions(cfg)
    texts, right, asked = answered_texts(model, images, pairs)
    report.image_grid(images, texts, name="vqa_answers", ncols=4, cell_size=200, full_captions=True,
                      caption=f"Test images, each with its questions and the model's answers ({right} of {asked} "
                              "right; the truth follows a wrong answer)")
