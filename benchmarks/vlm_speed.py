"""Speed of mmlm's VisionLanguageModel next to transformers' LlavaForConditionalGeneration.

One run, same tiny sizes (Llama 256 x 4 layers, 64 image tokens at 64x64, 24 text tokens), fp32:

* training samples/s (forward + backward + AdamW step, batch 16);
* caption tokens/s at batch 1 and 16 (greedy, KV cache, a fixed number of new tokens);
* classification images/s with 10 and 100 labels: shared image+prompt KV cache vs naive per-label scoring.

Run it alone on the machine (timings collapse when other processes share the cores):

    python benchmarks/vlm_speed.py            # full
    python benchmarks/vlm_speed.py --quick    # smoke run, a few seconds
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from mmlm.models import LanguageConfig, ProjectorConfig, VisionConfig, VisionLanguageModel, VLMConfig
from mmlm.models.generation import generate

LLAMA = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 4, "max_position_embeddings": 512}
IMAGE_SIZE, IMAGE_TOKENS, TEXT_TOKENS = 64, 64, 24
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
KINDS = ["circle", "square", "triangle", "star"]
WHERE = ["", " on the left", " on the right", " at the top", " at the bottom"]
LABELS = [f"{size} {c} {k}{w}" for w, size, c, k in itertools.product(WHERE, ["small", "large"], COLOURS, KINDS)]


def build_ours(corpus: list[str], projector: str = "mlp") -> VisionLanguageModel:
    """resnet10t at stride 8 (8x8 map = 64 tokens); pixel_shuffle r=2 reduces them to 16."""
    config = VLMConfig(
        vision=VisionConfig(name="resnet10t", features_only_stage=2, image_size=IMAGE_SIZE, pos_embed_2d=True),
        projector=ProjectorConfig(type=projector, reduce_factor=2),
        language=LanguageConfig(config={"model_type": "llama", **LLAMA}, vocab_size=512),
    )
    return VisionLanguageModel.from_config(config, corpus)


def build_llava(vocab_size: int) -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=8, hidden_size=128, intermediate_size=512,
                              num_hidden_layers=4, num_attention_heads=4, projection_dim=128)
    text = LlamaConfig(vocab_size=vocab_size + 1, **LLAMA)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab_size,
                         vision_feature_select_strategy="default", vision_feature_layer=-2,
                         image_seq_length=IMAGE_TOKENS)
    return LlavaForConditionalGeneration(config)


def timed_pair(fn_a, fn_b, repeats: int, warmup: int = 1) -> tuple[float, float]:
    """Seconds per call of two functions, alternated call by call (median of each), so that a passing
    load on the shared cores hits both sides alike instead of skewing the ratio."""
    for _ in range(warmup):
        fn_a(), fn_b()
    times_a, times_b = [], []
    for _ in range(repeats):
        for fn, times in ((fn_a, times_a), (fn_b, times_b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return sorted(times_a)[len(times_a) // 2], sorted(times_b)[len(times_b) // 2]


def params_m(model) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def training_inputs(ours: VisionLanguageModel, batch: int):
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    text = torch.randint(10, 200, (batch, TEXT_TOKENS - 1), generator=g)
    ours_ids = torch.cat([torch.full((batch, 1), ours.start_token_id),
                          torch.full((batch, ours.num_image_tokens), ours.image_token_id), text], dim=1)
    labels = ours_ids.clone()
    labels[:, :1 + ours.num_image_tokens] = -100
    return pixels, ours_ids, labels


def bench_training(ours, llava, batch: int, steps: int) -> tuple[float, float]:
    pixels, ids, labels = training_inputs(ours, batch)
    mask = torch.ones_like(ids)
    text = ids[:, 1 + ours.num_image_tokens:]  # Llava: 64 image tokens then the same text, no start token
    llava_ids = torch.cat([torch.full((batch, IMAGE_TOKENS), llava.config.image_token_index), text], dim=1)
    llava_labels = torch.cat([torch.full((batch, IMAGE_TOKENS), -100), text], dim=1)
    llava_mask = torch.ones_like(llava_ids)

    def step(model, **inputs):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def run():
            model(**inputs).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    ours.train(), llava.train()
    t_ours, t_llava = timed_pair(
        step(ours, pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels),
        step(llava, pixel_values=pixels, input_ids=llava_ids, attention_mask=llava_mask, labels=llava_labels), steps)
    ours.eval(), llava.eval()
    return batch / t_ours, batch / t_llava


@torch.no_grad()
def bench_generation(ours, llava, batch: int, new_tokens: int, repeats: int) -> tuple[float, float]:
    pixels = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    rows = [ours.prompt_ids("")] * batch
    llava_ids = torch.full((batch, IMAGE_TOKENS), llava.config.image_token_index)
    eos = ours.eos_token_id
    ours.eos_token_id = -1  # never stop early: both models generate exactly new_tokens tokens
    try:
        t_ours, t_llava = timed_pair(
            lambda: generate(ours, rows, pixels, new_tokens, 1, False, 1.0, 1.0),
            lambda: llava.generate(input_ids=llava_ids, pixel_values=pixels, attention_mask=torch.ones_like(llava_ids),
                                   do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                   pad_token_id=0),
            repeats)
    finally:
        ours.eos_token_id = eos
    return batch * new_tokens / t_ours, batch * new_tokens / t_llava


@torch.no_grad()
def bench_classification(ours, images: int, n_labels: int, repeats: int) -> tuple[float, float]:
    pixels = torch.randn(images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(2))
    labels = LABELS[:n_labels]
    shared, naive = timed_pair(
        lambda: ours.label_log_likelihoods(pixels, labels, "a photo of a {}"),
        lambda: ours.label_log_likelihoods(pixels, labels, "a photo of a {}", method="naive"),
        max(1, repeats // 2))
    return images / shared, images / naive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny repeat counts: checks that everything runs")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    steps, repeats, new_tokens = (2, 1, 4) if args.quick else (10, 7, 32)

    ours = build_ours(LABELS, "mlp").eval()
    shuffled = build_ours(LABELS, "pixel_shuffle").eval()
    llava = build_llava(len(ours.tokenizer)).eval()
    print(f"threads={args.threads}  llava {params_m(llava):.2f}M params (CLIP 64px/8, 64 image tokens + MLP + Llama "
          f"256x4); mmlm: resnet10t stride 8 + Llama 256x4, 'mlp' {params_m(ours):.2f}M ({ours.num_image_tokens} "
          f"image tokens), 'ps' = pixel_shuffle r=2 {params_m(shuffled):.2f}M ({shuffled.num_image_tokens} tokens)")
    print(f"{'measure':48s} {'mmlm':>10s} {'peer':>10s} {'ratio':>7s}  target")

    def row(name, ours_v, peer_v, target=""):
        print(f"{name:48s} {ours_v:10.1f} {peer_v:10.1f} {ours_v / peer_v:6.2f}x  {target}", flush=True)

    for tag, model in (("mlp", ours), ("ps", shuffled)):
        row(f"[{tag}] train samples/s (batch 16) vs Llava", *bench_training(model, llava, 16, steps), ">= 1.2x")
        row(f"[{tag}] caption tokens/s batch 1 vs Llava", *bench_generation(model, llava, 1, new_tokens, repeats),
            ">= 1.0x")
        row(f"[{tag}] caption tokens/s batch 16 vs Llava", *bench_generation(model, llava, 16, new_tokens, repeats),
            ">= 1.5x")
    images = 4 if args.quick else 16
    for tag, model in (("mlp", ours), ("ps", shuffled)):
        row(f"[{tag}] classify images/s, 10 labels vs naive", *bench_classification(model, images, 10, repeats))
        row(f"[{tag}] classify images/s, 100 labels vs naive", *bench_classification(model, images, 100, repeats),
            ">= 10x")


if __name__ == "__main__":
    main()
