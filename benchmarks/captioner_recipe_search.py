"""Recipe search for the shapes captioner: exact attribute match vs training steps and seconds.

A deliberately minimal loop (the shared Trainer replaces it in real runs): a pool of shapes
images is generated and preprocessed once, then AdamW with per-module learning rates and
warmup + cosine trains a VisionLanguageModel; every ``--eval-every`` steps greedy captions on
the test (and compositional) split are scored with ``captions_match``.

    python benchmarks/captioner_recipe_search.py --minutes 5                       # default recipe
    python benchmarks/captioner_recipe_search.py --projector pixel_shuffle --minutes 5
    python benchmarks/captioner_recipe_search.py --quick                            # smoke run
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time

import torch

from mmlm.config import ShapesConfig
from mmlm.data import captions_match, generate_shapes
from mmlm.models import LanguageConfig, ProjectorConfig, VisionConfig, VisionLanguageModel, VLMConfig


def recipe(args) -> VLMConfig:
    return VLMConfig(
        vision=VisionConfig(name=args.vision, features_only_stage=args.stage, image_size=64, pos_embed_2d=True),
        projector=ProjectorConfig(type=args.projector, reduce_factor=args.reduce_factor),
        language=LanguageConfig(config={
            "model_type": "llama", "hidden_size": args.width, "intermediate_size": 4 * args.width,
            "num_hidden_layers": args.layers, "num_attention_heads": max(1, args.width // 64),
            "num_key_value_heads": max(1, args.width // 64), "max_position_embeddings": 256,
            "tie_word_embeddings": True,
        }, vocab_size=args.vocab),
        max_length=48,
    )


def lr_factor(step: int, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def exact_match(model: VisionLanguageModel, pixels: torch.Tensor, records, batch_size: int = 64) -> float:
    model.eval()
    hits = 0
    for start in range(0, len(records), batch_size):
        rows = [model.prompt_ids(None)] * len(records[start:start + batch_size])
        preds = model._generate(rows, pixels[start:start + batch_size], 40, 1, False, 1.0, 1.0)
        hits += sum(captions_match(p, r.attributes) for p, r in zip(preds, records[start:start + batch_size]))
    model.train()
    return hits / len(records)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vision", default="resnet10t")
    p.add_argument("--stage", type=int, default=2, help="features_only stage (resnet10t: 2 = stride 8, 8x8 map)")
    p.add_argument("--projector", default="mlp", choices=["linear", "mlp", "pixel_shuffle", "perceiver"])
    p.add_argument("--reduce-factor", type=int, default=2)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--vision-lr", type=float, default=2e-3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--steps", type=int, default=2000, help="schedule length (the run stops earlier at --minutes)")
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--n-eval", type=int, default=200)
    p.add_argument("--pool", type=int, default=8000, help="training images generated up front")
    p.add_argument("--max-shapes", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.pool, args.n_eval, args.steps, args.eval_every, args.minutes = 64, 16, 6, 3, 1.0
        args.width, args.layers, args.batch = 64, 1, 8
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    shapes = ShapesConfig(min_shapes=1, max_shapes=args.max_shapes, image_size=64)
    train = generate_shapes(args.pool, split="train", config=shapes)
    test = generate_shapes(args.n_eval, split="test", config=shapes)
    comp = generate_shapes(args.n_eval, split="compositional", config=shapes)
    corpus = [c for r in train for c in r.captions]
    model = VisionLanguageModel.from_config(recipe(args), corpus)
    transform = model.image_transform()
    pool = torch.stack([transform(r.image) for r in train]).half()  # preprocessed once; fp16 halves the memory
    test_px = torch.stack([transform(r.image) for r in test])
    comp_px = torch.stack([transform(r.image) for r in comp])
    captions = [r.captions[0] for r in train]

    groups = model.trainable_groups()
    lrs = {"vision": args.vision_lr, "projector": args.lr, "language": args.lr}
    optimizer = torch.optim.AdamW([{"params": [q for q in groups[k].parameters() if q.requires_grad], "lr": lrs[k],
                                    "base_lr": lrs[k]} for k in groups], weight_decay=0.01)
    n_params = sum(q.numel() for q in model.parameters()) / 1e6
    print(f"recipe: {args.vision}@stage{args.stage} + {args.projector} ({model.num_image_tokens} image tokens) + "
          f"llama {args.width}x{args.layers}, {n_params:.2f}M params; lr {args.lr} vision {args.vision_lr} "
          f"batch {args.batch}; threads {args.threads}")
    print(f"{'step':>6s} {'seconds':>8s} {'loss':>7s} {'test_exact':>10s} {'comp_exact':>10s}")
    model.train()
    start, train_time, losses = time.perf_counter(), 0.0, []
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        idx = random.sample(range(len(train)), args.batch)
        batch = model.prepare_batch(pool[idx].float(), [captions[i] for i in idx])
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(step - 1, args.warmup, args.steps)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_time += time.perf_counter() - t0
        losses.append(loss.item())
        out_of_time = train_time > args.minutes * 60
        if step % args.eval_every == 0 or out_of_time or step == args.steps:
            test_em, comp_em = exact_match(model, test_px, test), exact_match(model, comp_px, comp)
            recent = sum(losses[-20:]) / len(losses[-20:])
            print(f"{step:6d} {train_time:8.1f} {recent:7.3f} {test_em:10.3f} {comp_em:10.3f}", flush=True)
        if out_of_time:
            break
    print(f"done: {step} steps, {train_time:.0f} s training ({step / train_time:.2f} steps/s), "
          f"{time.perf_counter() - start:.0f} s wall")


if __name__ == "__main__":
    main()
