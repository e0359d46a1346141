"""Which text-to-image recipe learns shapes fastest? Prompt fidelity against training steps, through the harness.

Each variant is ``configs/shapes_diffusion.yaml`` plus dotted overrides, trained by ``mmlm.api.train``
(the real Trainer, data pipeline, EMA and evaluation). Every ``--every`` steps the Trainer evaluates the
val split: it generates one image per val caption (DPM-Solver++ 20 steps, CFG) and the independent
shapes judge (``mmlm.eval.ShapesJudge``) checks colour AND kind of the main shape (``val/fidelity``).
The cosine LR schedule spans the whole run, so an early checkpoint has not annealed yet.

Timings on a shared CPU are contended: compare variants by steps; minutes = steps / (steps/s run alone).

    python benchmarks/diffusion_recipe_search.py --variants recipe pixel16 --steps 900 --every 150
    python benchmarks/diffusion_recipe_search.py --quick      # smoke test: tiny data, a few steps

Every run since rectified flow and the captioner's LM: benchmarks/results/shapes_diffusion.md. The first
measurements, of the v-prediction recipe before (one seed, 96 val captions, val fidelity = colour AND kind right;
two variants at a time on 2 cores, 1 thread each, about 1.5 steps/s each including the evaluations):

    variant     step 150   300   450   600   750   900    colour/kind at 900
    recipe           5%    1%    5%   11%   22%   39%    88% / 45%
    no_pooled        7%    3%    5%   16%   26%   36%    94% / 36%
    v_mse            5%    6%    6%   13%   20%   25%    85% / 30%
    eps              0%    1%    1%    1%    1%    1%    20% / 21%   (epsilon, plain MSE: nothing in 900 steps)
    shift2           6%    3%    4%    3%     -     -    (stopped: behind the recipe at every point)
    pixel16          5%    6%   35%   50%   56%   59%    100% / 59%  (16x16: the judge itself gets only 71% there)
    lr3e-3           5%    1%    1%    3%    4%    9%    42% / 23%

    batch32 (same samples and time as 900 steps at 64):
                step 300   600   900  1200  1500  1800
                     4%    8%   31%   36%   47%   50%    95% / 53% at 1800 (613 s vs the recipe's 636 s at 900 x 64)

At step 900 the recipe's sampler and guidance barely matter (dpm++:20 39%, ddim:50 38%; CFG 1/3/5: 21/40/43%),
and its EMA (0.995) and live weights score the same (39%).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from mmlm.api import train

RECIPE = "configs/shapes_diffusion.yaml"
VARIANTS: dict[str, list[str]] = {
    "recipe": [],  # patch 2 at 32x32, pooled text + cross-attention, rectified flow, lr 3e-3, batch 32
    "no_pooled": ["model.denoiser.pooled_text=false"],  # cross-attention at 8x8 is the only text path
    "pixel16": ["model.space=pixel", "model.image_size=16", "data.shapes.image_size=16",
                "model.denoiser.pooled_text=false"],  # the earlier prototype, images at 16x16
    "pixel32": ["model.space=pixel", "model.denoiser.block_out_channels=[32,64,64]",
                "model.denoiser.attention=[false,false,true]"],  # the UNet at full resolution
    "shift2": ["model.noise_shift=2.0"],  # the noise levels of a 16x16 image at 32x32
    "shift0.5": ["model.noise_shift=0.5"],  # less noise: more of the training on edges and fine detail
    "eps": ["model.prediction_type=epsilon", "model.snr_gamma=null"],
    "v_mse": ["model.snr_gamma=null"],
    "lr1e-3": ["train.lr=1e-3"],
    "lr3e-3": ["train.lr=3e-3"],
    "batch64": ["data.batch_size=64"],
    "ema0.99": ["train.ema_decay=0.99"],
    "ema0.999": ["train.ema_decay=0.999"],
    "cfg4": ["model.guidance_scale=4.0"],
    "wide": ["model.denoiser.block_out_channels=[64,128]"],
    "patch4_64": ["model.image_size=64", "data.shapes.image_size=64", "model.patch_size=4"],
    # Rectified flow (SD3): logit-normal times N(0, 1), velocity target, Euler 20 steps (model.objective: flow).
    # Also scored with DPM-Solver++ 20 on flow sigmas (val/fidelity/dpm++:20 in its metrics.jsonl).
    "flow": ["model.objective=flow", 'eval.samplers=["euler:20","dpm++:20"]'],
    "flow_lr3e-3": ["model.objective=flow", "train.lr=3e-3", 'eval.samplers=["euler:20"]'],
    "flow_shift2": ["model.objective=flow", "model.flow.shift=2.0", 'eval.samplers=["euler:20"]'],
}
QUICK = ["data.shapes.n_train=64", "data.shapes.n_val=8", "data.batch_size=8", "eval.judge_steps=20",
         "model.denoiser.block_out_channels=[8,16]", "model.denoiser.norm_num_groups=4"]


def fidelity_curve(run_dir: Path) -> list[dict]:
    """(step, elapsed minutes, val fidelity, colour and kind accuracy of the main sampler) from metrics.jsonl."""
    elapsed: dict[int, float] = {}
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "elapsed_s" in record:
            elapsed[record["step"]] = record["elapsed_s"] / 60
        if "val/fidelity" in record:
            spec = next(k for k in record if k.startswith("val/fidelity/")).removeprefix("val/fidelity/")
            rows.append({"step": record["step"], "minutes": elapsed.get(record["step"], float("nan")),
                         "sampler": spec, "fidelity": record["val/fidelity"],
                         "colour": record[f"val/colour_accuracy/{spec}"],
                         "kind": record[f"val/kind_accuracy/{spec}"]})
    return rows


def run_variant(name: str, overrides: list[str], steps: int, every: int, samples: int, out: Path,
                threads: int | None = None, resume: bool = False) -> list[dict]:
    run_dir = out / name
    settings = [f"output_dir={run_dir}", f"train.max_steps={steps}", "train.max_minutes=null",
                *([f"train.num_threads={threads}"] if threads else []),
                f"train.eval_every={every}", f"train.log_every={every}", "eval.splits=[]",
                f"data.shapes.n_val={samples}",  # the recipe's val split is smaller than --samples
                'eval.samplers=["dpm++:20"]', f"eval.max_samples={samples}", "eval.num_examples=32"]
    train(RECIPE, settings + overrides, resume=resume)
    return fidelity_curve(run_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["recipe", "no_pooled", "pixel16"],
                        help=f"from: {', '.join(VARIANTS)}")
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides for every variant, e.g. train.seed=1")
    parser.add_argument("--steps", type=int, default=900, help="training steps per variant")
    parser.add_argument("--every", type=int, default=150, help="evaluate val fidelity every this many steps")
    parser.add_argument("--samples", type=int, default=96, help="val captions generated per evaluation")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (train.num_threads)")
    parser.add_argument("--out", default=None, help="run folders go here (default: a temporary folder)")
    parser.add_argument("--resume", action="store_true",
                        help="continue each variant from its latest checkpoint in --out (with --set train.save_every=N)")
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
        table[name] = run_variant(name, VARIANTS[name] + args.set, args.steps, args.every, args.samples, out,
                                  args.threads, args.resume)
        print(f"\n{name}: {' '.join(VARIANTS[name] + args.set) or '(the recipe)'}", flush=True)
        for row in table[name]:
            print(f"  step {row['step']:5d}  {row['minutes']:5.1f} min (contended)  fidelity {row['fidelity']:6.1%}"
                  f"  colour {row['colour']:6.1%}  kind {row['kind']:6.1%}  ({row['sampler']})", flush=True)
    (out / "fidelity_vs_steps.json").write_text(json.dumps(table, indent=2))
    print(f"\nwritten: {out / 'fidelity_vs_steps.json'}")


if __name__ == "__main__":
    main()
