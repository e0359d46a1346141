"""Launch real-task training runs under torchrun (CPU, gloo) for the multi-process tests, and their data.

As a script (what ``launch`` runs under torchrun): ``distributed_helpers.py CONFIG.json [--resume]
[--kill-at-step N] [--log-captions DIR]``. ``--kill-at-step`` SIGKILLs rank 1 right after optimiser
step N (a crashed machine); ``--log-captions`` writes the caption each sample trained on, per rank.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 128}
# A ViT tower (LayerNorm, no BatchNorm): batch statistics would differ between 2 x 4 and 1 x 8 samples.
TINY_VLM = {"vision": {"name": "vit_tiny_patch16_224", "image_size": 32,
                       "kwargs": {"patch_size": 16, "depth": 1, "embed_dim": 32, "num_heads": 2}},
            "projector": {"type": "linear"}, "language": {"config": TINY_LLAMA, "vocab_size": 300}}
TINY_T2I = {
    "image_size": 16, "space": "pixel",
    "denoiser": {"block_out_channels": [8, 16], "attention": [False, True], "norm_num_groups": 4,
                 "hidden_size": 16, "num_layers": 1},
    "text_encoder": {"hidden_size": 16, "num_layers": 1, "num_heads": 1, "max_length": 8, "vocab_size": 300},
}


def write_data(folder: Path, n_train: int = 32, n_val: int = 8) -> dict[str, str]:
    """Shapes images (1-2 shapes: captions of different lengths, 4 captions each) as JSONL manifests and as
    webdataset shards of the same training records; returns their paths."""
    from mmlm.config import ShapesConfig
    from mmlm.data.images import load_image
    from mmlm.data.shapes import generate_shapes, write_dataset

    config = ShapesConfig(image_size=32, max_shapes=2)
    train = generate_shapes(n_train, split="train", config=config)
    val = generate_shapes(n_val, split="val", config=config)
    paths = {"train_jsonl": str(write_dataset(train, folder / "train")),
             "val_jsonl": str(write_dataset(val, folder / "val"))}
    shards = folder / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    per_shard = n_train // 4
    for s in range(4):
        with tarfile.open(shards / f"shard-{s:04d}.tar", "w") as tar:
            for i in range(s * per_shard, (s + 1) * per_shard):
                record = train[i]
                buffer = io.BytesIO()
                load_image(record.image).save(buffer, format="PNG")
                meta = {"captions": record.captions, **record.attributes}
                for name, data in ((f"{i:06d}.png", buffer.getvalue()),
                                   (f"{i:06d}.json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    paths["train_shards"] = str(shards / "shard-{0000..0003}.tar")
    return paths


def config(task: str, out: Path, data: dict, train: dict | None = None, eval: dict | None = None) -> dict:
    model = TINY_T2I if task == "diffusion" else TINY_VLM
    return {"task": task, "output_dir": str(out), "model": model,
            "data": {"batch_size": 4, "eval_batch_size": 4, "shuffle_buffer": 8, **data},
            "train": {"max_steps": 4, "warmup_steps": 1, "lr": 2e-3, "log_every": 1, "mixed_precision": "no",
                      "num_threads": 1, "schedule": "constant", **(train or {})},
            "eval": {"splits": [], "num_examples": 2, "samplers": ["ddim:2"], **(eval or {})}}


def saved_weights(run: Path) -> dict:
    """Every tensor of a run's saved model folder (all its safetensors files), keyed "file:name"."""
    from safetensors.torch import load_file

    files = sorted((Path(run) / "model").rglob("*.safetensors"))
    assert files, f"no weights under {run}/model"
    return {f"{f.relative_to(run)}:{k}": v for f in files for k, v in load_file(str(f)).items()}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(cfg: dict, processes: int, *flags: str, check: bool = True, timeout: int = 300
           ) -> subprocess.CompletedProcess:
    """Run ``cfg`` on ``processes`` CPU processes (torchrun, gloo); the config is written beside its run folder."""
    path = Path(cfg["output_dir"] + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               f"--master_port={_free_port()}", __file__, str(path), *flags]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    return done


def _main(argv: list[str]) -> None:
    import torch

    from mmlm.api import train
    from mmlm.tasks.common import ImageTextTask
    from mmlm.training.trainer import Trainer

    cfg = json.loads(Path(argv[0]).read_text())
    rank = int(os.environ.get("RANK", "0"))
    if "--kill-at-step" in argv:
        kill_at = int(argv[argv.index("--kill-at-step") + 1])
        end_of_step = Trainer._end_of_step

        def end_of_step_then_die(self):
            done = end_of_step(self)
            if self.step == kill_at and rank == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            return done

        Trainer._end_of_step = end_of_step_then_die
    if "--log-captions" in argv:
        folder = Path(argv[argv.index("--log-captions") + 1])
        folder.mkdir(parents=True, exist_ok=True)
        chosen = ImageTextTask.training_captions

        def logged(self, batch):
            captions = chosen(self, batch)
            with open(folder / f"rank{rank}.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(dict(zip(map(str, batch["index"]), captions))) + "\n")
            return captions

        ImageTextTask.training_captions = logged
    train(cfg, resume="--resume" in argv)
    if torch.distributed.is_initialized():  # a clean gloo teardown
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _main(sys.argv[1:])
