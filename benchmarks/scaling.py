"""Samples/s of the captioner on 1 and on N processes with the same global batch, in the same run.

    python benchmarks/scaling.py                 # shapes captioner recipe, global batch 32, 1 vs 2 processes
    python benchmarks/scaling.py --quick         # a tiny model and a few steps: checks the script, measures nothing
    python benchmarks/scaling.py --processes 4 --steps 60 --global-batch 64

Each run is a torchrun launch (gloo on CPU, NCCL on GPUs) of ``mmlm.api.train``; samples/s is the
trainer's own figure (training time only: evaluation and checkpoints pause its clock), averaged over
the logged steps after the first ``--warmup`` (start-up and first-step costs). Each process runs
``--cores / processes`` threads (``train.num_threads``), so the runs share the same cores and the ratio is the
cost of splitting a step (gradient all-reduce, smaller per-process matmuls). Run it alone on the machine:
timings collapse when another process shares the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = {"vision": {"name": "vit_tiny_patch16_224", "image_size": 32,
                   "kwargs": {"patch_size": 16, "depth": 1, "embed_dim": 32, "num_heads": 2}},
        "projector": {"type": "linear"},
        "language": {"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
                                "max_position_embeddings": 128}, "vocab_size": 300}}


def run_config(args, processes: int, out: Path) -> dict:
    from mmlm.config import read_yaml

    if args.global_batch % processes:
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by {processes} processes")
    cfg = {"task": "captioning", "data": {"source": "shapes"}} if args.quick else read_yaml(ROOT / args.config)
    cfg["output_dir"] = str(out)
    cfg.setdefault("data", {}).update({"batch_size": args.global_batch // processes})
    if args.quick:
        cfg["model"] = TINY
        cfg["data"]["shapes"] = {"n_train": 64, "n_val": 4, "n_test": 4, "n_compositional": 4, "image_size": 32}
    cfg["train"] = {**cfg.get("train", {}), "max_steps": args.steps, "max_minutes": None, "epochs": None,
                    "log_every": 1, "eval_every": None, "save_every": None, "grad_accum_steps": 1,
                    "num_threads": max(1, args.cores // processes)}  # both runs use the same cores
    cfg["eval"] = {**cfg.get("eval", {}), "splits": [], "max_samples": 4}
    return cfg


def samples_per_s(out: Path, warmup: int) -> float:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in rows if "samples_per_s" in r and r["step"] > warmup]
    if not rates:
        raise SystemExit(f"{out}: no steps after the first {warmup}; raise --steps")
    return sum(rates) / len(rates)


def launch(cfg: dict, processes: int) -> None:
    path = Path(cfg["output_dir"] + ".json")
    path.write_text(json.dumps(cfg))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = f"import json, mmlm.api; mmlm.api.train(json.load(open({str(path)!r})))"
    script = path.with_suffix(".py")
    script.write_text(code + "\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               f"--master_port={port}", str(script)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{processes}-process run failed:\n{done.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/shapes_captioner.yaml")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                        help="cores to share: each process runs cores / processes threads")
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps (checks the script only)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.global_batch = 4, 1, 8
    with tempfile.TemporaryDirectory(prefix="mmlm-scaling-") as tmp:
        results = {}
        for processes in (1, args.processes):
            out = Path(tmp) / f"p{processes}"
            launch(run_config(args, processes, out), processes)
            results[processes] = samples_per_s(out, args.warmup)
    base = results[1]
    print(f"global batch {args.global_batch}, {args.steps} steps ({'quick' if args.quick else args.config}), "
          f"{args.cores} cores")
    for processes, rate in results.items():
        print(f"  {processes} process(es) x {max(1, args.cores // processes)} thread(s): {rate:9.1f} samples/s, "
              f"{rate / args.global_batch:.2f} steps/s ({rate / base:.2f}x)")


if __name__ == "__main__":
    main()
