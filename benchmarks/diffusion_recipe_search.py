"""Which text-to-image recipe learns shapes fastest? Prompt fidelity against training steps, through the harness.

Each variant is ``configs/shapes_diffusion.yaml`` plus dotted overrides, trained by ``mmlm.api.train``
(the real Trainer, data pipeline, EMA and evaluation). Every ``--every`` steps the Trainer evaluates the
val split: it generates one image per val caption (DPM-Solver++ 20 steps, CFG) and the independent
shapes judge (``mmlm.eval.ShapesJudge``) checks colour AND kind of the main shape (``val/fidelity``).
The cosine LR schedule spans the whole run, so an early checkpoint has not annealed yet.

Timings on a shared CPU are contended: compare variants by steps; minutes = steps / (steps/s run alone).

    python benchmarks/diffusion_recipe_search.py --variants recipe pixel16 --steps 900 --every 150
    python benchmarks/diffusion_recipe_search.py --quick      # smoke test: tiny data, a few steps
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from mmlm.api import train

RECIPE = "configs/shapes_diffusion.yaml"
VARIANTS: dict[str, list[str]] = {
    "recipe": [],  # patch 2 at 32x32, pooled text + cross-attention, v + min-SNR 5, lr 2e-3, batch 64
    "no_pooled": ["model.denoiser.pooled_text=false"],  # cross-attention at 8x8 is the only text path
    "pixel16": ["model.space=pixel", "model.image_size=16", "data.shapes.image_size=16",
                "model.denoiser.pooled_text=false"],  # the earlier prototype, images at 16x16
    "pixel32": ["model.space=pixel", "model.denoiser.block_out_channels=[32,64,64]",
                "model.denoiser.attention=[false,false,true]"],  # the UNet at full resolution
    "eps": ["model.prediction_type=epsilon", "model.snr_gamma=null"],
    "v_mse": ["model.snr_gamma=null"],
    "lr1e-3": ["train.lr=1e-3"],
    "lr3e-3": ["train.lr=3e-3"],
    "batch32": ["data.batch_size=32"],
    "ema0.999": ["train.ema_decay=0.999"],
    "cfg4": ["model.guidance_scale=4.0"],
    "wide": ["model.denoiser.block_out_channels=[64,128]"],
    "patch4_64": ["model.image_size=64", "data.shapes.image_size=64", "model.patch_size=4"],
}
QUICK = ["data.shapes.n_train=64", "data.shapes.n_val=8", "data.batch_size=8", "eval.judge_steps=20",
         "model.denoiser.block_out_channels=[8,16]", "model.denoiser.norm_num_groups=4"]


def fidelity_curve(run_dir: Path) -> list[dict]:
    """(step, elapsed minutes, val fidelity, colour and kind accuracy) from a run's metrics.jsonl."""
    elapsed: dict[int, float] = {}
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "elapsed_s" in record:
            elapsed[record["step"]] = record["elapsed_s"] / 60
        if "val/fidelity" in record:
            rows.append({"step": record["step"], "minutes": elapsed.get(record["step"], float("nan")),
                         "fidelity": record["val/fidelity"],
                         "colour": record["val/colour_accuracy/dpm++:20"],
                         "kind": record["val/kind_accuracy/dpm++:20"]})
    return rows


def run_variant(name: str, overrides: list[str], steps: int, every: int, samples: int, out: Path) -> list[dict]:
    run_dir = out / name
    settings = [f"output_dir={run_dir}", f"train.max_steps={steps}", "train.max_minutes=null",
                f"train.eval_every={every}", f"train.log_every={every}", "eval.splits=[]",
                'eval.samplers=["dpm++:20"]', f"eval.max_samples={samples}", "eval.num_examples=32"]
    train(RECIPE, settings + overrides)
    return fidelity_curve(run_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["recipe", "no_pooled", "pixel16"],
                        help=f"from: {', '.join(VARIANTS)}")
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides for every variant, e.g. train.seed=1")
    parser.add_argument("--steps", type=int, default=900, help="training steps per variant")
    parser.add_argument("--every", type=int, default=150, help="evaluate val fidelity every this many steps")
    parser.add_argument("--samples", type=int, default=96, help="val captions generated per evaluation")
    parser.add_argument("--out", default=None, help="run folders go here (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="tiny data and model, a few steps: checks the script")
    args = parser.parse_args()
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if args.quick:
        args.steps, args.every, args.samples = 4, 2, 4
        args.set = QUICK + args.set
    out = Path(args.out or tempfile.mkdtemp(prefix="diffusion_search_"))
    table = {}
    for name in args.variants:
        table[name] = run_variant(name, VARIANTS[name] + args.set, args.steps, args.every, args.samples, out)
        print(f"\n{name}: {' '.join(VARIANTS[name] + args.set) or '(the recipe)'}", flush=True)
        for row in table[name]:
            print(f"  step {row['step']:5d}  {row['minutes']:5.1f} min (contended)  fidelity {row['fidelity']:6.1%}"
                  f"  colour {row['colour']:6.1%}  kind {row['kind']:6.1%}", flush=True)
    (out / "fidelity_vs_steps.json").write_text(json.dumps(table, indent=2))
    print(f"\nwritten: {out / 'fidelity_vs_steps.json'}")


if __name__ == "__main__":
    main()
