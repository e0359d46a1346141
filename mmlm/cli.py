"""The ``mmlm`` command line: train | eval | caption | classify | chat | ask | generate | export | serve | data | demo.

Every failure ends with one line on stderr: a user error (bad flag, missing file, bad config key, bad data)
exits with status 2; an internal error (a bug) exits with status 1 and says where to report it.
``mmlm --debug ...`` shows the traceback instead. What each verb does lives in mmlm/commands.py.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import textwrap

from mmlm.commands import (cmd_ask, cmd_caption, cmd_chat, cmd_classify, cmd_compress, cmd_data_inspect,
                           cmd_data_shapes, cmd_demo, cmd_eval, cmd_explain, cmd_export, cmd_generate, cmd_serve,
                           cmd_train)

REPORT_TO = "the mmlm issue tracker"  # where internal errors are reported (the project's Issues URL when known)


class Parser(argparse.ArgumentParser):
    """argparse, with a bad flag reported on one line (``mmlm train: error: ...; see mmlm train --help``)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _is_user_error(err: BaseException) -> bool:
    """Bad input from the user: flags, files, configs, data, or a training run that failed on them
    (non-finite loss, a checkpoint that could not be written); everything else is a bug."""
    if isinstance(err, (ValueError, OSError)):
        return True
    trainer = sys.modules.get("mmlm.training.trainer")  # loaded whenever one of its errors can have been raised
    training_error = getattr(trainer, "TrainingError", None)
    return isinstance(training_error, type) and isinstance(err, training_error)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _examples(text: str) -> str:
    return "examples:\n" + textwrap.indent(textwrap.dedent(text).strip(), "  ")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = Parser(
        prog="mmlm", formatter_class=fmt,
        description="Multimodal vision-language framework: captioning, classification by prompt, text-to-image.",
        epilog=_examples("""
            mmlm demo                      # train + evaluate captioner and generator on the shapes data
            mmlm train configs/shapes_captioner.yaml train.max_minutes=5
            mmlm caption runs/demo/captioner images/
        """),
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a recipe", formatter_class=fmt, epilog=_examples("""
        mmlm train configs/shapes_captioner.yaml
        mmlm train configs/shapes_captioner.yaml train.lr=3e-4 data.batch_size=32 --output-dir runs/cap
        mmlm train configs/shapes_captioner.yaml --resume      # continue from the last complete checkpoint
        accelerate launch --multi_gpu --num_processes 8 -m mmlm.cli train configs/shapes_diffusion.yaml   # 8 GPUs
        torchrun --nproc_per_node 2 -m mmlm.cli train configs/shapes_captioner.yaml   # 2 CPU processes (--cpu: one)
    """))
    p.add_argument("config", help="recipe YAML (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides: section.key=value")
    p.add_argument("--output-dir", help="run folder (default: the config's output_dir)")
    p.add_argument("--resume", nargs="?", const=True, default=False,
                   help="resume from the last complete checkpoint, or from the given checkpoint folder")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a run or a saved model", formatter_class=fmt, epilog=_examples("""
        mmlm eval runs/cap                         # the run's own test split
        mmlm eval runs/cap/model --data my_captions.jsonl
    """))
    p.add_argument("run", help="run folder (with config.yaml) or saved model folder")
    p.add_argument("--data", help="data source to evaluate on (manifest, folder, 'shapes', 'digits')")
    p.add_argument("--split", default="test")
    p.add_argument("--out", help="where metrics.json and report.md go (default: <run>/eval_<split>)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the run's config")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("caption", help="caption images", formatter_class=fmt, epilog=_examples("""
        mmlm caption runs/demo/captioner photo.png more_images/
        mmlm caption runs/demo/captioner images/ --json > captions.json
    """))
    p.add_argument("model", help="saved captioner folder")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--prompt", default=None)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("classify", help="classify images by prompt", formatter_class=fmt, epilog=_examples("""
        mmlm classify runs/demo/captioner images/ --labels circle,square,triangle,star
        mmlm classify runs/demo/captioner images/ --labels "red star,blue star" --prompt "a small {}" --open-ended
        mmlm classify runs/digits/model digits/ --labels zero,one,two --prompt "a drawing of {}" --json
    """))
    p.add_argument("model", help="saved captioner/classifier folder")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--labels", required=True, help="comma-separated candidate labels")
    p.add_argument("--prompt", action="append", default=None,
                   help="template with a {} slot (default 'a photo of a {}'); repeat for a prompt ensemble")
    p.add_argument("--open-ended", action="store_true",
                   help="the label may be followed by more text (a captioner); default: it is the whole answer")
    p.add_argument("--ensemble", choices=["mean", "marginal"], default="mean",
                   help="combine templates by averaging token log-likelihoods, or as alternatives (marginal)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_classify)

    def generation_flags(p):
        p.add_argument("--max-new-tokens", type=int, default=None)
        p.add_argument("--do-sample", action="store_true", help="sample (default: the model's generation_config)")
        p.add_argument("--temperature", type=float, default=None)
        p.add_argument("--top-k", type=int, default=None)
        p.add_argument("--top-p", type=float, default=None)
        p.add_argument("--repetition-penalty", type=float, default=None)
        p.add_argument("--num-beams", type=int, default=None)
        p.add_argument("--stop", action="append", default=None, help="a stop string; repeat for several")

    p = sub.add_parser("chat", help="talk about images (reads stdin, streams replies)", formatter_class=fmt,
                       epilog=_examples("""
        mmlm chat runs/shapes_vqa photo.png
        echo "what colour is the circle?" | mmlm chat runs/shapes_vqa photo.png
    """))
    p.add_argument("model", help="saved VLM folder")
    p.add_argument("images", nargs="*", help="image files or folders the conversation is about")
    p.add_argument("--system", default=None, help="a system message")
    generation_flags(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("ask", help="ask questions about images (JSONL out)", formatter_class=fmt,
                       epilog=_examples("""
        mmlm ask runs/shapes_vqa images/ --question "how many circles are there?"
        mmlm ask runs/shapes_vqa a.png b.png --question "what colour is the star?" --question "is there a red square?"
    """))
    p.add_argument("model", help="saved VLM folder")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--question", action="append", required=True, help="a question; repeat for several")
    p.add_argument("--batch-size", type=int, default=32)
    generation_flags(p)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("generate", help="generate images from a prompt", formatter_class=fmt, epilog=_examples("""
        mmlm generate runs/demo/generator "a red circle" --out red_circle.png
        mmlm generate runs/demo/generator "a large blue star" --n 8 --grid --out stars.png
    """))
    p.add_argument("model", help="saved text-to-image folder")
    p.add_argument("prompt")
    p.add_argument("--out", default="generated.png")
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--grid", action="store_true", help="write one grid image instead of n files")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=2.0)
    p.add_argument("--scheduler", default="dpm++", choices=["dpm++", "ddim", "ddpm"])
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("data", help="make or inspect datasets", formatter_class=fmt, epilog=_examples("""
        mmlm data shapes --out data/shapes --n 2000 --seed 0
        mmlm data inspect data/shapes/manifest.jsonl
    """))
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    q = data_sub.add_parser("shapes", help="write the procedural shapes dataset (PNGs + manifest.jsonl)")
    q.add_argument("--out", required=True)
    q.add_argument("--n", type=int, default=1000)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--image-size", type=int, default=64)
    q.add_argument("--max-shapes", type=int, default=3)
    q.add_argument("--language", default="en", choices=["en", "zh"])
    q.set_defaults(func=cmd_data_shapes)
    q = data_sub.add_parser("inspect", help="counts, caption stats, image sizes and every bad row")
    q.add_argument("manifest")
    q.set_defaults(func=cmd_data_inspect)

    p = sub.add_parser("demo", help="the whole framework on the embedded shapes data", formatter_class=fmt,
                       epilog=_examples("""
        mmlm demo                   # quality set in steps: prints its ETA once the first steps are timed
        mmlm demo --max-minutes 10  # capped: the quality bars may not be reached
        mmlm demo --quick --out /tmp/demo   # under 2 minutes, quality far below the demo's
        mmlm demo --vqa             # also fine-tunes the captioner to answer questions (3,000 more steps)
    """))
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="a fast first look (quality far below the demo's)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="cap the whole run at N minutes (the quality bars may then not be reached)")
    p.add_argument("--vqa", action="store_true",
                   help="add a stage: the captioner fine-tuned to answer questions about the images")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("export", help="export a VLM to a transformers class (use it without mmlm)",
                       formatter_class=fmt, epilog=_examples("""
        mmlm export runs/shapes_llava runs/shapes_llava/llava --to llava
    """))
    p.add_argument("model", help="saved VLM folder or run folder")
    p.add_argument("out", help="folder to write (model + processor)")
    p.add_argument("--to", choices=["llava"], default="llava", help="target class (LlavaForConditionalGeneration)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="a local web demo (Gradio) of saved models", formatter_class=fmt,
                       epilog=_examples("""
        mmlm serve runs/demo/captioner runs/demo/generator --port 7860
    """))
    p.add_argument("models", nargs="+", help="saved model or run folders (VLMs and generators)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("explain", help="where the captioner looks: relevance overlays per caption word",
                       formatter_class=fmt, epilog=_examples("""
        mmlm explain runs/demo/captioner photo.png --out explained/
        mmlm explain runs/demo/captioner photo.png --text "a small red circle on the left" --method gradient --out x/
    """))
    p.add_argument("model", help="saved VLM folder or run folder")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--out", required=True, help="folder for the overlays and explanations.json")
    p.add_argument("--text", default=None, help="explain this caption instead of the generated one")
    p.add_argument("--prompt", default=None)
    p.add_argument("--method", choices=["rollout", "gradient", "saliency", "all"], default="all",
                   help="attention rollout, gradient x attention, pixel-gradient saliency, or all three")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("compress", help="quantise a VLM or a generator for CPU serving (mmlm.load reads the result)",
                       formatter_class=fmt, epilog=_examples("""
        mmlm compress runs/demo/captioner runs/demo/captioner_int8 --int8
        mmlm compress runs/demo/generator runs/demo/generator_int8 --int8
        mmlm compress runs/demo/captioner runs/demo/captioner_pruned --prune-mlp 0.5
    """))
    p.add_argument("model", help="saved VLM or generator folder, or run folder")
    p.add_argument("out", help="folder to write")
    scheme = p.add_mutually_exclusive_group()
    scheme.add_argument("--int8", action="store_true", help="int8 weights (torch.ao dynamic quantisation, CPU)")
    scheme.add_argument("--int4", action="store_true", help="int4 weights (no CPU kernel that pays: an error saying why)")
    p.add_argument("--parts", default=None, help="comma list of language,projector,vision (a VLM) or denoiser "
                   "(a generator); default: all")
    p.add_argument("--prune-mlp", type=float, default=0.0, metavar="FRACTION",
                   help="remove this fraction of each LM layer's MLP channels (a smaller dense fp32 model)")
    p.add_argument("--prune-heads", type=float, default=0.0, metavar="FRACTION",
                   help="remove this fraction of each LM layer's key/value head groups")
    p.add_argument("--prune-criterion", choices=["magnitude", "activation"], default="magnitude")
    p.add_argument("--calibration", nargs="+", default=None, metavar="IMAGE",
                   help="images (files or folders) for --prune-criterion activation")
    p.set_defaults(func=cmd_compress)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may also follow the flags (`train cfg.yaml --output-dir x train.lr=1e-3`): argparse leaves them over.
    if extra and hasattr(args, "overrides") and not any(item.startswith("-") for item in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one line, unless --debug
        if args.debug:
            raise
        if _is_user_error(err):
            print(f"error: {_one_line(err)}", file=sys.stderr)
            return 2
        rerun = shlex.join(sys.argv[1:] if argv is None else argv)
        print(f"internal error: {type(err).__name__}: {_one_line(err)} -- this is a bug in mmlm; please report it "
              f"to {REPORT_TO} with the traceback that `mmlm --debug {rerun}` prints", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
