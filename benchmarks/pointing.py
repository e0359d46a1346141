"""The pointing game on a trained shapes captioner: does a word's relevance map peak inside the shape it names?

    python benchmarks/pointing.py                                  # runs/demo/captioner, 200 test images
    python benchmarks/pointing.py --captioner RUN/model --images 400
    python benchmarks/pointing.py --quick                          # an untrained tiny model: checks the script

Test images with 2-3 shapes (the demo's image size). For each method (attention rollout, gradient x attention,
pixel-gradient saliency):
* captions: the scene's canonical caption (every shape named) and the model's own greedy caption (shapes it
  does not name are counted as unnamed, not scored);
* classifier label tokens: the main shape's "<colour> <kind>" after the zero-shot template "a <size>", the
  tokens ``classify`` scores.
Each line prints the hit rate beside the chance rate (the mean box area fraction). Target (issue 17): >= 85%
on the captions of the demo captioner. 200 images hold ~500 shapes: a +-2-3 point estimate.
"""

from __future__ import annotations

import argparse
import time

import torch


def label_pointing(model, records, method: str):
    """The pointing game on the zero-shot label tokens of each image's main shape."""
    from mmlm.eval.pointing import PointingResult, score_maps, shape_box
    from mmlm.models.explain import explain

    hits = total = unnamed = 0
    chance = 0.0
    for record in records:
        main = record.attributes["shapes"][0]
        explanation = explain(model, [record.image], text=f"a {main['size']} {main['colour']} {main['kind']}")[0]
        h, n, u, c = score_maps(lambda i: explanation.word_map(i, method), [w for w, _ in explanation.words],
                                [main], [shape_box(record.image, main)], record.image.size[::-1])
        hits, total, unnamed, chance = hits + h, total + n, unnamed + u, chance + c
    return PointingResult(hits=hits, total=total, unnamed=unnamed, chance_rate=chance / total if total else 0.0)


def tiny_captioner():
    """The demo captioner's architecture at a tiny width, untrained (for --quick)."""
    from mmlm.models import LanguageConfig, ProjectorConfig, VisionConfig, VisionLanguageModel, VLMConfig

    config = VLMConfig(vision=VisionConfig(name="resnet10t", features_only_stage=2, image_size=64, pos_embed_2d=True),
                       projector=ProjectorConfig(type="pixel_shuffle", reduce_factor=2),
                       language=LanguageConfig(vocab_size=300, config={
                           "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                           "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64}),
                       max_length=24)
    corpus = ["a small red circle on the left", "a large blue star at the top and a small green square"]
    torch.manual_seed(0)
    return VisionLanguageModel.from_config(config, corpus).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captioner", default="runs/demo/captioner")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="an untrained tiny model and 4 images")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import mmlm
    from mmlm.data.shapes import ShapesConfig, generate_shapes
    from mmlm.eval.pointing import pointing_game
    from mmlm.models.explain import METHODS

    if args.quick:
        model, size, args.images = tiny_captioner(), 64, 4
    else:
        model = mmlm.load(args.captioner)
        size = model.config.vision.image_size or 64
    records = generate_shapes(args.images, split="test", config=ShapesConfig(image_size=size, min_shapes=2,
                                                                             max_shapes=3))
    print(f"pointing game: {args.captioner if not args.quick else 'untrained tiny model (--quick)'}, "
          f"{len(records)} test images of {size} px with 2-3 shapes")
    for method in METHODS:
        for name, play in (("canonical captions", lambda: pointing_game(model, records, method, "given")),
                           ("generated captions", lambda: pointing_game(model, records, method, "generated")),
                           ("label tokens", lambda: label_pointing(model, records, method))):
            began = time.perf_counter()
            result = play()
            print(f"  {method:8} {name:19} hit rate {100 * result.hit_rate:5.1f}% (chance "
                  f"{100 * result.chance_rate:4.1f}%) on {result.total} shapes, {result.unnamed} unnamed "
                  f"[{time.perf_counter() - began:.0f} s]")


if __name__ == "__main__":
    main()
