"""One training step and one caption batch at a realistic shape: mmlm vs transformers' Llava, same run.

Shapes (random init, fp32, CPU): a SigLIP-B/16 tower at 224 px (196 image tokens; timm's
``vit_base_patch16_siglip_224`` for mmlm, ``SiglipVisionConfig`` of the same size for Llava), a 2-layer
GELU MLP projector, and an LM with SmolLM2-135M's config (576 wide, 30 layers, 9 heads / 3 KV heads)
at its 49,152-word vocabulary and at Qwen2's 151,936; batch 4, a 12-token prompt and a 40-token caption.

Measured per (model, vocabulary) in its own subprocess, one after another (so neither inherits the
other's heap):
* step memory: the peak resident memory of one forward + backward above the resident memory before it,
  when the weights and the optimizer state already exist (a warm-up step has run; the AdamW update itself
  is the same for both models and left out). Peak RSS is the kernel's VmHWM, reset through /proc/self/clear_refs just
  before the step; glibc's mmap threshold is fixed at 128 kB (MALLOC_MMAP_THRESHOLD_) so large tensors
  are returned to the system when freed and RSS follows live memory. This is activations, logits,
  their gradients and temporaries, plus the parameter gradients (equal for both; shown, and taken out in
  the second ratio).
* step time: the median of the timed steps. caption: greedy decoding of ``--new-tokens`` tokens for the
  batch (mmlm.caption_pixels vs LlavaForConditionalGeneration.generate), seconds.

    python benchmarks/real_shapes.py            # the real shapes (about 20 GB peak, minutes per model)
    python benchmarks/real_shapes.py --quick    # 2-layer tower and LM, batch 2: checks the script runs

Run it alone on the machine: timings collapse when another process shares the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

VOCABS = (49152, 151936)
PROMPT_TOKENS, CAPTION_TOKENS = 12, 40


def smollm2_config(vocab: int, layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                       rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
                       pad_token_id=0)


def rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def token_batch(batch: int, image_id: int, start_id: int, image_tokens: int, seed: int = 0):
    """input_ids [start, image x N, prompt, caption, eos], labels on caption + eos; all rows the same length.
    Text ids come from 1000-1999 (clear of both models' image and special ids): the same text for both."""
    import torch

    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1000, 2000, (batch, PROMPT_TOKENS), generator=g)
    caption = torch.randint(1000, 2000, (batch, CAPTION_TOKENS), generator=g)
    start = torch.full((batch, 1), start_id)
    images = torch.full((batch, image_tokens), image_id)
    eos = torch.zeros((batch, 1), dtype=torch.long)
    ids = torch.cat([start, images, prompt, caption, eos], 1)
    labels = torch.full_like(ids, -100)
    labels[:, -CAPTION_TOKENS - 1:] = ids[:, -CAPTION_TOKENS - 1:]
    prefix = torch.cat([start, images, prompt], 1)
    return ids, torch.ones_like(ids), labels, prefix


def build_mmlm(vocab: int, tower_depth: int, lm_layers: int):
    from mmlm.models import LanguageConfig, ProjectorConfig, VisionConfig, VisionLanguageModel, VLMConfig
    from mmlm.models.language import train_tokenizer

    tokenizer = train_tokenizer(["a red circle on the left", "a blue square at the top"], 300)
    kwargs = {} if tower_depth == 12 else {"depth": tower_depth}
    config = VLMConfig(vision=VisionConfig(name="vit_base_patch16_siglip_224", kwargs=kwargs),
                       projector=ProjectorConfig(type="mlp"), language=LanguageConfig(name_or_path="unused"),
                       max_length=PROMPT_TOKENS + CAPTION_TOKENS + 2)
    return VisionLanguageModel.from_config(config, _lm_config=smollm2_config(vocab, lm_layers), _tokenizer=tokenizer)


def build_llava(vocab: int, tower_depth: int, lm_layers: int, image_id: int):
    from transformers import LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=tower_depth,
                                num_attention_heads=12, image_size=224, patch_size=16)
    config = LlavaConfig(vision_config=vision, text_config=smollm2_config(vocab, lm_layers),
                         image_token_index=image_id, projector_hidden_act="gelu", vision_feature_layer=-1,
                         vision_feature_select_strategy="full", image_seq_length=196)
    return LlavaForConditionalGeneration(config)


def worker(kind: str, vocab: int, quick: bool) -> dict:
    """Build one model, time and measure its training step and a caption batch."""
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("REAL_SHAPES_THREADS", "2")))
    tower_depth, lm_layers, batch, steps = (2, 2, 2, 1) if quick else (12, 30, 4, 3)
    new_tokens = 4 if quick else 16
    if kind == "mmlm":
        model = build_mmlm(vocab, tower_depth, lm_layers)
        image_id, start_id = model.image_token_id, model.start_token_id
    else:
        image_id, start_id = 5, 1
        model = build_llava(vocab, tower_depth, lm_layers, image_id)
    ids, mask, labels, prefix = token_batch(batch, image_id, start_id, 196)
    pixels = torch.randn(batch, 3, 224, 224)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def forward_backward() -> None:
        if kind == "mmlm":
            loss = model(pixels, ids, mask, labels).loss
        else:
            loss = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss
        loss.backward()

    def step() -> float:
        began = time.perf_counter()
        forward_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - began

    step()  # warm-up: optimizer state allocated
    base = rss_kb("VmRSS")
    reset_peak()
    forward_backward()  # the memory window: forward and backward (the optimizer step is the same for both)
    peak = rss_kb("VmHWM") - base
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None) / 2**20
    optimizer.zero_grad(set_to_none=True)
    times = [step() for _ in range(steps)]
    model.eval()
    began = time.perf_counter()
    with torch.inference_mode():
        if kind == "mmlm":  # the same prefix rows as Llava's (start, image, prompt), greedy
            from mmlm.models.generation import generate

            generate(model, prefix.tolist(), pixels, new_tokens, 1, False, 1.0, 1.0)
        else:
            model.generate(input_ids=prefix, attention_mask=torch.ones_like(prefix), pixel_values=pixels,
                           max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    caption = time.perf_counter() - began
    return {"kind": kind, "vocab": vocab, "params_M": round(sum(p.numel() for p in params) / 1e6, 1),
            "step_peak_MB": round(peak / 1024), "grads_MB": round(grads), "step_s": round(statistics.median(times), 3),
            "caption_s": round(caption, 3), "batch": batch, "new_tokens": new_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2-layer tower and LM, batch 2 (a smoke run)")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "VOCAB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.quick)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "TOKENIZERS_PARALLELISM": "false"}
    rows = []
    for vocab in VOCABS:
        for kind in ("mmlm", "llava"):
            command = [sys.executable, __file__, "--worker", kind, str(vocab)] + (["--quick"] if args.quick else [])
            out = subprocess.run(command, env=env, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{kind} at vocabulary {vocab} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'model':6} {'vocab':>7} {'params M':>9} {'step peak MB':>13} {'of it grads MB':>15} {'step s':>8} "
          f"{'caption s':>10}")
    for r in rows:
        print(f"{r['kind']:6} {r['vocab']:>7} {r['params_M']:>9} {r['step_peak_MB']:>13} {r['grads_MB']:>15} "
              f"{r['step_s']:>8} {r['caption_s']:>10}")
    for vocab in VOCABS:
        ours, theirs = (next(r for r in rows if r["kind"] == k and r["vocab"] == vocab) for k in ("mmlm", "llava"))
        extra = [r["step_peak_MB"] - r["grads_MB"] for r in (ours, theirs)]
        print(f"vocab {vocab}: mmlm / Llava step memory {ours['step_peak_MB'] / max(theirs['step_peak_MB'], 1):.2f}x "
              f"({extra[0] / max(extra[1], 1):.2f}x without the parameter gradients),"
              f" step time {ours['step_s'] / theirs['step_s']:.2f}x, caption time "
              f"{ours['caption_s'] / theirs['caption_s']:.2f}x (batch {ours['batch']}, {ours['new_tokens']} tokens)")


if __name__ == "__main__":
    main()
