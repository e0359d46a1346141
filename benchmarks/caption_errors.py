"""Which attribute a shapes captioner gets wrong, on held-out colour-kind pairs and on seen ones.

Exact match says a caption is wrong; this says how. Each true shape is looked up by its position in the
parsed caption and its kind, colour and size compared, separately for shapes of a held-out pair
(``HELD_OUT_PAIRS``: the compositional split's point) and for seen pairs. A kind error on held-out shapes
means the tower ties kind to colour; a colour error means the LM, having named the kind, picks a colour it
saw with that kind (the word order decides which comes first).

    python benchmarks/caption_errors.py runs/shapes_captioner/model
    python benchmarks/caption_errors.py runs/shapes_captioner/model --split test --samples 500
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import torch

from mmlm.config import load_config
from mmlm.data.shapes import HELD_OUT_PAIRS, make_shapes_record
from mmlm.data.shapes_captions import parse_caption
from mmlm.models import VisionLanguageModel
from mmlm.tasks.captioning import CAPTION_TOKENS

ATTRIBUTES = ("kind", "colour", "size")


def attribute_errors(captions: list[str], scenes: list[list[dict]], language: str = "en") -> Counter:
    """Counts: ``held`` / ``seen`` shapes, ``<group>:<attribute>`` wrong, ``<group>:missing`` (no shape named at
    that position) and ``unparsed`` captions (their shapes are not counted)."""
    counts = Counter()
    for caption, shapes in zip(captions, scenes, strict=True):
        parsed = parse_caption(caption, language)
        if parsed is None:
            counts["unparsed"] += 1
            continue
        named = {shape["position"]: shape for shape in parsed}
        for shape in shapes:
            group = "held" if (shape["colour"], shape["kind"]) in HELD_OUT_PAIRS else "seen"
            counts[group] += 1
            said = named.get(shape["position"])
            if said is None:
                counts[f"{group}:missing"] += 1
                continue
            for attribute in ATTRIBUTES:
                counts[f"{group}:{attribute}"] += said[attribute] != shape[attribute]
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a saved shapes captioner folder (a run's model/, with its recipe.yaml)")
    p.add_argument("--split", default="compositional", choices=["test", "compositional"])
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = VisionLanguageModel.from_pretrained(args.model).eval()
    shapes = load_config(Path(args.model) / "recipe.yaml").data.shapes  # the word order and seed it trained on
    records = [make_shapes_record(i, split=args.split, config=shapes) for i in range(args.samples)]
    # The evaluation's own token budget: a three-shape caption is cut short under caption()'s default of 32.
    captions = model.caption([r.image for r in records], max_new_tokens=CAPTION_TOKENS, batch_size=args.batch_size)
    counts = attribute_errors(captions, [r.attributes["shapes"] for r in records], shapes.language)
    print(f"{args.model}: {args.samples} {args.split} images, {counts['unparsed']} captions did not parse")
    for group in ("held", "seen"):
        total = counts[group]
        wrong = ", ".join(f"{a} {counts[f'{group}:{a}'] / max(total, 1):.1%}" for a in (*ATTRIBUTES, "missing"))
        print(f"  {group} pairs: {total} shapes; wrong: {wrong}")


if __name__ == "__main__":
    main()
