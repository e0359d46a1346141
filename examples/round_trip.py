"""A CV+LLM pipeline in a few lines: prompts -> images -> captions -> labels.

    python examples/round_trip.py runs/demo/generator runs/demo/captioner
"""

import argparse

import mmlm
from mmlm.eval.plots import image_grid

PROMPTS = ["a large red circle in the center", "a small blue square on the left", "a large green star at the top"]
LABELS = ["red circle", "blue square", "green star", "yellow triangle"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("generator")
    parser.add_argument("captioner")
    parser.add_argument("--out", default="round_trip.png")
    args = parser.parse_args()

    generator, captioner = mmlm.load(args.generator), mmlm.load(args.captioner)
    images = generator.generate(PROMPTS, seed=0)                      # text -> image
    captions = captioner.caption(images)                              # image -> text
    probs = captioner.classify(images, LABELS, prompt=["a small {}", "a large {}"])  # image -> label
    for prompt, caption, row in zip(PROMPTS, captions, probs):
        label = LABELS[int(row.argmax())]
        print(f"prompt: {prompt!r}\n  caption: {caption!r}\n  label: {label} ({float(row.max()):.2f})")
    image_grid(images, captions, path=args.out)
    print(f"grid -> {args.out}")


if __name__ == "__main__":
    main()
