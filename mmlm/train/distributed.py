"""Processes and devices: the launcher's process count, accelerate's state, precision, and the
collectives that keep every process in step when only the main one does the work."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DistributedType
from torch import nn

from mmlm.config import ConfigError, TrainConfig
from mmlm.train.errors import TrainingError


def resolve_mixed_precision(value: str) -> str:
    """``"auto"`` -> ``"bf16"`` on CUDA devices that support it, else ``"no"`` (fp32 is faster on CPU)."""
    if value == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if value in ("no", "bf16", "fp16"):
        return value
    raise ConfigError(f"train.mixed_precision: expected 'auto', 'no', 'bf16' or 'fp16', got {value!r}")


def launched_processes() -> int:
    """Process count set by the launcher (torchrun / accelerate launch / MPI), 1 when run plainly."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide state (precision, accumulation) left by an earlier Trainer."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def has_accelerator() -> bool:
    """Whether torch sees a GPU-like device (CUDA, XPU, MPS, ...)."""
    if hasattr(torch, "accelerator"):
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def build_accelerator(train: TrainConfig, output_dir: Path) -> Accelerator:
    """The run's Accelerator: precision, accumulation, seedable data order; checks the launch is coherent."""
    if launched_processes() == 1:
        reset_accelerate_state()  # several runs in one process (the demo, notebooks) each get their own settings
    # accelerate treats a plain torchrun on a CPU-only machine as one process unless told cpu=True
    cpu_processes = launched_processes() > 1 and not has_accelerator()
    accelerator = Accelerator(
        cpu=cpu_processes,
        gradient_accumulation_steps=train.grad_accum_steps,
        mixed_precision=resolve_mixed_precision(train.mixed_precision),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=train.seed),
        project_dir=str(output_dir),
        step_scheduler_with_optimizer=False,  # we step it once per update, whatever the process count
    )
    if launched_processes() != accelerator.num_processes:
        raise TrainingError(
            f"launched as {launched_processes()} processes but accelerate runs {accelerator.num_processes} "
            f"({accelerator.distributed_type}); every process would train alone and overwrite the others' files"
        )
    return accelerator


def any_failed(accelerator: Accelerator, error: BaseException | None) -> bool:
    """Whether ``error`` happened on any process (a collective: every process must call it)."""
    failed = torch.tensor([0.0 if error is None else 1.0], device=accelerator.device)
    return accelerator.reduce(failed, "sum").item() > 0


def run_on_main(accelerator: Accelerator, what: str, fn: Callable[[], None], step: int) -> None:
    """Run ``fn`` on the main process; if it raises, every process raises (no one waits forever)."""
    error = None
    if accelerator.is_main_process:
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - re-raised below on every process
            error = err
    if any_failed(accelerator, error):
        if error is not None:
            raise error
        raise TrainingError(f"{what} failed on the main process at step {step}")


# accelerate's AcceleratedOptimizer.step/zero_grad and clip_grad_norm_ look up optional
# packages, signatures and DTensors on every call (~0.4 ms per step on a small CPU). For
# plain DDP or one device without a GradScaler (fp16) they only forward to torch, so the
# trainer calls torch directly there and leaves FSDP/DeepSpeed/XLA/fp16 to accelerate.
def plain_torch_path(accelerator: Accelerator) -> bool:
    return accelerator.scaler is None and accelerator.distributed_type in (
        DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)


def clip_gradients(accelerator: Accelerator, model: nn.Module, optimizer, max_norm: float) -> float:
    """Clip the gradients of every optimised parameter to ``max_norm``; return the norm before clipping."""
    if plain_torch_path(accelerator):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(accelerator.clip_grad_norm_(model.parameters(), max_norm))


def optimizer_step(accelerator: Accelerator, optimizer) -> None:
    """Step and zero the (prepared) optimiser."""
    plain = plain_torch_path(accelerator) and isinstance(optimizer, AcceleratedOptimizer)
    inner = optimizer.optimizer if plain else optimizer
    inner.step()
    inner.zero_grad(set_to_none=True)


def mean_loss_and_elapsed(accelerator: Accelerator, loss_sum: torch.Tensor, micro_batches: int,
                          clock_start: float) -> tuple[float, float]:
    """Mean loss over processes and the main process's elapsed time, in one collective."""
    if accelerator.num_processes == 1:
        return (loss_sum.float() / micro_batches).item(), time.perf_counter() - clock_start
    elapsed = time.perf_counter() - clock_start if accelerator.is_main_process else 0.0
    stats = torch.stack([loss_sum.float() / micro_batches, torch.tensor(elapsed, device=loss_sum.device)])
    stats = accelerator.reduce(stats, "sum")
    return stats[0].item() / accelerator.num_processes, stats[1].item()
