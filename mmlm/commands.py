"""What each ``mmlm`` verb does: ``cmd_<verb>(args)`` takes the parsed flags and returns the exit status.

mmlm/cli.py parses argv and reports errors; the work happens in the library (mmlm.api and below), and these
functions only turn flags into its calls and its results into printed or written output.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class UsageError(ValueError):
    """A command-line argument is wrong."""


def _image_paths(inputs: list[str]) -> list[Path]:
    """Expand files and folders (recursively) into a sorted list of image paths."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            paths.append(path)
        else:
            raise UsageError(f"no such image file or folder: {item}")
    if not paths:
        raise UsageError(f"no images found in: {', '.join(inputs)}")
    return paths


def cmd_train(args) -> int:
    from mmlm.api import train
    from mmlm.config import load_config

    config = load_config(args.config, args.overrides)
    if args.output_dir:
        config.output_dir = args.output_dir
    result = train(config, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun / accelerate launch: printed once, by the main process
        print(json.dumps(result, indent=2, default=str))
    return 0


def cmd_eval(args) -> int:
    from mmlm.api import evaluate

    metrics = evaluate(args.run, data=args.data, split=args.split, out_dir=args.out, overrides=args.overrides)
    print(json.dumps(metrics, indent=2, default=str))
    return 0


def cmd_caption(args) -> int:
    from mmlm.api import load_vlm

    paths = _image_paths(args.images)
    model = load_vlm(args.model)
    captions = model.caption(
        [str(p) for p in paths], prompt=args.prompt, max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams, batch_size=args.batch_size, progress=len(paths) > args.batch_size,
    )
    rows = [{"image": str(p), "caption": c} for p, c in zip(paths, captions)]
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
    else:
        width = max(len(r["image"]) for r in rows)
        for row in rows:
            print(f"{row['image']:<{width}}  {row['caption']}")
    return 0


def cmd_classify(args) -> int:
    from mmlm.api import load_vlm

    labels = [label.strip() for label in args.labels.split(",")] if args.labels else []
    paths = _image_paths(args.images)
    model = load_vlm(args.model)
    probs = model.classify([str(p) for p in paths], labels, prompt=args.prompt or ["a photo of a {}"],
                           batch_size=args.batch_size, progress=len(paths) > args.batch_size,
                           eos=not args.open_ended, ensemble=args.ensemble)
    rows = []
    for path, row in zip(paths, probs.tolist()):
        ranked = sorted(zip(labels, row), key=lambda t: -t[1])
        rows.append({"image": str(path), "label": ranked[0][0], "probabilities": dict(zip(labels, row))})
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
    else:
        width = max(len(r["image"]) for r in rows)
        for row in rows:
            top = sorted(row["probabilities"].items(), key=lambda t: -t[1])[:3]
            shown = "  ".join(f"{k}={v:.3f}" for k, v in top)
            print(f"{row['image']:<{width}}  {row['label']:<12} {shown}")
    return 0


def _generation_options(args) -> dict:
    """The generation flags of ``chat`` / ``ask``; unset ones come from the model's generation_config."""
    options = {"max_new_tokens": args.max_new_tokens, "do_sample": True if args.do_sample else None,
               "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
               "repetition_penalty": args.repetition_penalty, "num_beams": args.num_beams,
               "stop_strings": args.stop or None}
    return {k: v for k, v in options.items() if v is not None}


def cmd_chat(args) -> int:
    """A conversation about the images on stdin/stdout: one user turn per line, the reply streamed."""
    from mmlm.api import load_vlm

    paths = _image_paths(args.images) if args.images else []
    model = load_vlm(args.model)
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        pieces = []
        for piece in model.chat([str(p) for p in paths], messages, stream=True, **_generation_options(args)):
            pieces.append(piece)
            print(piece, end="", flush=True)
        print(flush=True)
        messages.append({"role": "assistant", "content": "".join(pieces).strip() or " "})


def cmd_ask(args) -> int:
    """Every question about every image, batched; one JSON line per (image, question)."""
    from mmlm.api import load_vlm

    paths = _image_paths(args.images)
    model = load_vlm(args.model)
    pairs = [(path, question) for question in args.question for path in paths]
    answers = model.answer([str(p) for p, _ in pairs], [q for _, q in pairs], batch_size=args.batch_size,
                           progress=len(pairs) > args.batch_size, **_generation_options(args))
    for (path, question), answer in zip(pairs, answers):
        print(json.dumps({"image": str(path), "question": question, "answer": answer}, ensure_ascii=False))
    return 0


def cmd_generate(args) -> int:
    from mmlm.api import load_text_to_image
    from mmlm.eval.plots import image_grid

    model = load_text_to_image(args.model)
    images = model.generate(
        [args.prompt] * args.n, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
        seed=args.seed, negative_prompt=args.negative_prompt, scheduler=args.scheduler,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.grid or args.n == 1:
        if args.n == 1:
            images[0].save(out)
        else:
            # Cells at least 96 px wide (nearest-neighbour upscaling keeps tiny samples crisp).
            image_grid(images, ncols=min(args.n, 8), path=out, cell_size=max(96, images[0].width))
        print(out)
    else:
        for i, image in enumerate(images):
            path = out.with_name(f"{out.stem}_{i:02d}{out.suffix or '.png'}")
            image.save(path)
            print(path)
    return 0


def cmd_data_shapes(args) -> int:
    from mmlm.data.inspect import write_shapes_cli

    print(write_shapes_cli(args.out, n=args.n, seed=args.seed, image_size=args.image_size,
                           max_shapes=args.max_shapes, language=args.language))
    return 0


def cmd_data_inspect(args) -> int:
    from mmlm.data.inspect import inspect_manifest

    print(inspect_manifest(args.manifest))
    return 0


def cmd_demo(args) -> int:
    from mmlm.demo import run_demo

    run_demo(out_dir=args.out, quick=args.quick, max_minutes=args.max_minutes, vqa=args.vqa)
    return 0


def cmd_export(args) -> int:
    """A saved VLM as a model transformers ships (loads without mmlm)."""
    from mmlm.hf.llava import export_llava

    print(export_llava(args.model if not Path(args.model, "model", "config.json").is_file()
                       else Path(args.model, "model"), args.out))
    return 0


def cmd_serve(args) -> int:
    from mmlm.serve import serve

    serve(args.models, host=args.host, port=args.port, share=False)
    return 0


def cmd_explain(args) -> int:
    """Relevance overlays (one panel per content word) and the maps' words as JSON, per image."""
    from mmlm.api import load_vlm
    from mmlm.models.explain import METHODS, explain, overlay

    paths = _image_paths(args.images)
    model = load_vlm(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = list(METHODS) if args.method == "all" else [args.method]
    rows = []
    for path, item in zip(paths, explain(model, [str(p) for p in paths], text=args.text, prompt=args.prompt)):
        files = []
        for method in methods:
            target = out / f"{path.stem}_{method}.png"
            overlay(str(path), item, method).save(target)
            files.append(str(target))
        rows.append({"image": str(path), "caption": item.caption, "overlays": files,
                     "words": [item.words[i][0] for i in item.content_words()]})
        print(f"{path}  {item.caption}  -> {', '.join(files)}")
    (out / "explanations.json").write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    return 0


def cmd_compress(args) -> int:
    """An int8 copy of a saved VLM or generator, or a VLM with a pruned LM, that mmlm.load reads."""
    from mmlm.api import load
    from mmlm.models.compress import CompressionConfig, save_compressed, weights_bytes
    from mmlm.tasks.common import model_folder, model_kind

    source = model_folder(args.model)
    if args.prune_mlp or args.prune_heads:
        return _prune(args, source)
    if not (args.int8 or args.int4):
        raise ValueError("compress: give --int8, --int4, --prune-mlp or --prune-heads")
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip()) if args.parts else None
    config = CompressionConfig(scheme="int4" if args.int4 else "int8", parts=parts, model=model_kind(source))
    save_compressed(load(source), args.out, config)
    before, after = weights_bytes(source), weights_bytes(args.out)
    print(f"{args.out}: {config.scheme} ({', '.join(config.parts)}), weights {before / 1e6:.2f} MB -> "
          f"{after / 1e6:.2f} MB ({after / before:.2f}x)")
    return 0


def _prune(args, source: Path) -> int:
    from mmlm.api import load_vlm
    from mmlm.models.prune import PruneConfig, calibration_batches, parameter_count, save_pruned

    if args.int8 or args.int4 or args.parts:
        raise ValueError("compress: pruning writes an fp32 model; fine-tune it (model.init_from), then --int8")
    config = PruneConfig(mlp=args.prune_mlp, heads=args.prune_heads, criterion=args.prune_criterion)
    model = load_vlm(source)
    calibration = None
    if config.criterion == "activation":
        if not args.calibration:
            raise ValueError("--prune-criterion activation: give --calibration IMAGE... (captioned by the model)")
        calibration = calibration_batches(model, [str(p) for p in _image_paths(args.calibration)])
    before = parameter_count(model.language_model)
    pruned = save_pruned(model, args.out, config, calibration)
    after = parameter_count(pruned.language_model)
    print(f"{args.out}: LM pruned ({config.criterion}: MLP {config.mlp:.0%}, heads {config.heads:.0%}), parameters "
          f"{before / 1e6:.2f}M -> {after / 1e6:.2f}M ({after / before:.2f}x); recover with "
          f"`mmlm train CONFIG model.init_from={args.out}`")
    return 0


# ---------------------------------------------------------------------------- parser
