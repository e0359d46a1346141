"""fp32 vs int8 (mmlm.models.compress), in one run: file size, peak memory, caption tokens/s, quality, images/s.

* a realistic LM shape: SmolLM2-135M's config (random init): weights file size, peak RSS, tokens/s at batch 1 and 16
  (greedy, a fixed number of new tokens, KV cache);
* the demo captioner (``--captioner``, default runs/demo/captioner): file size, peak RSS, tokens/s, exact match and
  zero-shot accuracy (size + colour + kind of the main shape, scored as the caption's start) on the shapes test split;
* the realistic shape with half its MLP channels pruned (``mmlm.models.prune``), fp32 and int8;
* the demo generator (``--generator``): weights size, images/s and pixel difference, fp32 vs its int8 folder.

Targets (issue 17): int8 at the realistic shape >= 1.5x fp32 tokens/s and <= 0.3x file size; <= 1 point of exact
match lost on the demo captioner. Run it alone on the machine; ``--quick`` is a smoke run (2 layers, few tokens).

    python benchmarks/compression.py --quick
    python benchmarks/compression.py --captioner runs/demo/captioner --generator runs/demo/generator
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SMOLLM2_135M = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                "max_position_embeddings": 8192, "rope_theta": 100000.0, "tie_word_embeddings": True,
                "rms_norm_eps": 1e-5}


def build_lm(layers: int, int8: bool, state_file: str | None = None, intermediate: int | None = None):
    """The SmolLM2-135M shape (``layers`` deep; ``intermediate``: a pruned MLP width), int8 or not, random init or
    filled from ``state_file``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mmlm.models.compress import load_quantized_state, quantize_language_model

    shape = {**SMOLLM2_135M, "num_hidden_layers": layers}
    config = AutoConfig.for_model(**{**shape, **({"intermediate_size": intermediate} if intermediate else {})})
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config).eval()
    if int8:
        quantize_language_model(lm)
    if state_file is not None:
        state = load_file(state_file)
        load_quantized_state(lm, state, state_file) if int8 else lm.load_state_dict(state, strict=False)
    return lm


def lm_tokens_per_s(lm, batch: int, new_tokens: int, prompt_len: int = 16) -> float:
    ids = torch.randint(0, 49152, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    run = lambda n: lm.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,  # noqa
                                min_new_tokens=n, pad_token_id=0)
    with torch.inference_mode():
        run(2)
        start = time.perf_counter()
        run(new_tokens)
        return batch * new_tokens / (time.perf_counter() - start)


def _peak_rss_child(kind: str, args: tuple, queue) -> None:
    """In a fresh process: load one form, run it once, report the peak resident memory (MB)."""
    torch.set_num_threads(1)
    if kind == "lm":
        layers, int8, state_file, intermediate = args
        lm_tokens_per_s(build_lm(layers, int8, state_file, intermediate), 1, 4)
    else:
        import mmlm
        from mmlm.data.shapes import generate_shapes

        mmlm.load(args[0]).caption([r.image for r in generate_shapes(16, split="test")], max_new_tokens=24)
    # VmHWM: this process's own high-water mark (ru_maxrss would carry the forking parent's over the exec).
    status = Path("/proc/self/status").read_text() if Path("/proc/self/status").is_file() else ""
    peaks = [int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")]
    queue.put(peaks[0] / 1024 if peaks else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def peak_rss_mb(kind: str, *args) -> float:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_rss_child, args=(kind, args, queue))
    proc.start()
    proc.join(timeout=1800)
    if proc.exitcode != 0:  # its traceback is on stderr; a child that died must not leave the run waiting
        raise RuntimeError(f"peak-memory child for {kind} {args} ended with exit code {proc.exitcode}")
    return queue.get(timeout=10)


def realistic(layers: int, new_tokens: int, tmp: Path) -> None:
    """fp32, int8, half the MLP channels pruned (mmlm.models.prune, magnitude) and pruned + int8."""
    import copy
    import types

    from mmlm.models.compress import quantize_language_model, quantized_state
    from mmlm.models.prune import PruneConfig, pruned_language_model

    print(f"\n== SmolLM2-135M shape, {layers} layers, random init (speed and size only) ==")
    fp32 = build_lm(layers, False)
    pruned = pruned_language_model(types.SimpleNamespace(language_model=fp32), PruneConfig(mlp=0.5))
    half = pruned.config.intermediate_size
    forms = {"fp32": (fp32, False, None), "int8": (quantize_language_model(copy.deepcopy(fp32)), True, None),
             "mlp50": (pruned, False, half), "mlp50+int8": (quantize_language_model(copy.deepcopy(pruned)), True, half)}
    rows = {}
    for name, (lm, int8, intermediate) in forms.items():
        path = tmp / f"lm_{name}.safetensors"
        state = quantized_state(lm) if int8 else {k: v.contiguous() for k, v in lm.state_dict().items()
                                                  if k != "lm_head.weight"}  # tied: stored once
        save_file(state, str(path))
        rows[name] = {"MB": path.stat().st_size / 1e6, "tok/s b1": lm_tokens_per_s(lm, 1, new_tokens),
                      "tok/s b16": lm_tokens_per_s(lm, 16, new_tokens),
                      "peak RSS MB": peak_rss_mb("lm", layers, int8, str(path), intermediate)}
    _table(rows)


def demo_captioner(folder: Path, n: int, tmp: Path) -> None:
    import mmlm
    from mmlm.data.shapes import COLOURS, SHAPE_KINDS, SIZES, captions_match, generate_shapes
    from mmlm.models.compress import save_compressed
    from mmlm.models.generation import generate
    from mmlm.tasks.common import model_folder

    folder = model_folder(folder)
    print(f"\n== demo captioner {folder}: {n} test images ==")
    int8_dir = tmp / "captioner_int8"
    save_compressed(mmlm.load(folder), int8_dir)
    records = generate_shapes(n, split="test")
    labels = [" ".join(p) for p in itertools.product(SIZES, COLOURS, SHAPE_KINDS)]
    truth = [labels.index(f"{r.attributes['size']} {r.attributes['colour']} {r.attributes['kind']}") for r in records]
    rows = {}
    for name, path in (("fp32", folder), ("int8", int8_dir)):
        model = mmlm.load(path)
        images = [r.image for r in records]
        captions = model.caption(images)
        probs = model.classify(images, labels, prompt="a {}", eos=False)
        pixels = model.pixel_values(images[:16]).repeat(16, 1, 1, 1)[:16]
        speed = {}
        for batch in (1, 16):
            rows_ids = [model.prompt_ids(None)] * batch
            start = time.perf_counter()
            out = generate(model, rows_ids, pixels[:batch], 24, 1, False, 1.0, 1.0)
            speed[batch] = batch * 24 / (time.perf_counter() - start) if out else 0.0
        weights = Path(path, "model.safetensors").stat().st_size / 1e6
        rows[name] = {"MB": weights, "tok/s b1": speed[1], "tok/s b16": speed[16],
                      "exact %": 100 * sum(captions_match(c, r.attributes) for c, r in zip(captions, records)) / n,
                      "zero-shot %": 100 * float((probs.argmax(1) == torch.tensor(truth)).float().mean()),
                      "peak RSS MB": peak_rss_mb("vlm", str(path))}
    _table(rows)
    print("  (tok/s: 24 new tokens per row, stopping at EOS is not forced: a short caption counts as 24)")


def demo_generator(folder: Path, images: int, steps: int, tmp: Path) -> None:
    import mmlm
    from mmlm.models.compress import save_compressed, weights_bytes
    from mmlm.tasks.common import model_folder

    folder = model_folder(folder)
    print(f"\n== demo generator {folder}: {images} images, {steps} steps (int8 denoiser, saved and loaded) ==")
    save_compressed(mmlm.load(folder), tmp / "generator_int8")
    prompts = ["a small red circle on the left"] * images
    rows, drawn = {}, {}
    for name, path in (("fp32", folder), ("int8", tmp / "generator_int8")):
        model = mmlm.load(path)
        model.generate(prompts[:1], num_inference_steps=2, seed=0)
        start = time.perf_counter()
        drawn[name] = model.generate(prompts, num_inference_steps=steps, seed=0, output_type="pt")
        rows[name] = {"MB": weights_bytes(path) / 1e6, "images/s": images / (time.perf_counter() - start)}
    _table(rows)
    print(f"  mean |int8 - fp32| pixel (0-1 scale), same seeds: {(drawn['int8'] - drawn['fp32']).abs().mean():.4f}")


def _table(rows: dict[str, dict[str, float]]) -> None:
    """The forms' figures, then each form's ratio to the first (fp32)."""
    keys = list(next(iter(rows.values())))
    first, *others = rows
    lines = [("form", [f"{k:>14}" for k in keys])]
    lines += [(name, [f"{row[k]:>14.2f}" for k in keys]) for name, row in rows.items()]
    lines += [(f"{name}/{first}", [f"{(rows[name][k] / rows[first][k] if rows[first][k] else float('nan')):>14.2f}"
                                   for k in keys]) for name in others]
    for label, cells in lines:
        print(f"  {label:<16}" + "".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 LM layers, few tokens and images")
    parser.add_argument("--captioner", default="runs/demo/captioner")
    parser.add_argument("--generator", default="runs/demo/generator")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        realistic(2 if args.quick else 30, 4 if args.quick else 32, tmp)
        stages = (("captioner", args.captioner, lambda f: demo_captioner(f, 8 if args.quick else 500, tmp)),
                  ("generator", args.generator, lambda f: demo_generator(f, 2 if args.quick else 16,
                                                                         2 if args.quick else 20, tmp)))
        for kind, folder, run in stages:
            if Path(folder, "config.json").is_file() or Path(folder, "model", "config.json").is_file():
                run(Path(folder))
            else:
                print(f"\n== demo {kind}: {folder} not found (run `mmlm demo` or pass --{kind}) ==")


if __name__ == "__main__":
    main()
