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
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, FullyShardedDataParallelPlugin
from torch import nn

from mmlm.config import ConfigError, FSDPConfig, TrainConfig
from mmlm.training.errors import TrainingError


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


def fsdp_plugin(fsdp: FSDPConfig) -> FullyShardedDataParallelPlugin | None:
    """accelerate's FSDP2 plugin for ``train.fsdp`` (None when off); full state dicts on save.

    The classes to wrap are filled in by :func:`set_fsdp_wrap_classes` once the model exists.
    """
    if not fsdp.enabled:
        return None
    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        reshard_after_forward=fsdp.sharding_strategy == "full_shard",
        auto_wrap_policy="transformer_based_wrap",
        cpu_offload=fsdp.cpu_offload,
        activation_checkpointing=fsdp.activation_checkpointing,
        state_dict_type="FULL_STATE_DICT",
    )


def enable_fsdp_on_cpu(accelerator: Accelerator, plugin: FullyShardedDataParallelPlugin) -> None:
    """Run FSDP2 on CPU processes (gloo), which torch supports but accelerate does not switch on.

    accelerate 1.15's ``AcceleratorState.__init__`` (accelerate/state.py, the ``elif self.distributed_type in
    [DistributedType.MULTI_GPU, ...]`` branch) sets ``DistributedType.FSDP`` and keeps the plugin only for
    GPU-like process groups, never for ``MULTI_CPU``, so CPU processes would silently train with DDP. torch's
    ``fully_shard`` itself runs on CPU with gloo (sharding, gradient reduce-scatter, full state dicts), and
    accelerate's FSDP2 paths (prepare, no_sync, clip_grad_norm_, get_state_dict, save_state / load_state) have
    no device-specific code, so we set what that branch would have set.
    """
    from accelerate.state import PartialState

    state = accelerator.state
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def enable_fp16_on_cpu(accelerator: Accelerator) -> None:
    """fp16 autocast and a GradScaler on CPU, which torch has but accelerate leaves out.

    accelerate 1.15's ``Accelerator.__init__`` (accelerate/accelerator.py, the ``self.state.mixed_precision ==
    "fp16" and self.device.type != "cpu"`` branch) sets ``native_amp`` and the grad scaler only off the CPU, so fp16
    would silently train in fp32. torch 2.14 runs ``torch.autocast("cpu", dtype=torch.float16)`` and
    ``torch.amp.GradScaler("cpu")``; with these two set (before ``prepare``), accelerate's own fp16 paths (autocast
    forward, scaled backward, unscale before clipping, skipped steps on overflow, ``scaler.pt`` in checkpoints) run.
    """
    kwargs = accelerator.scaler_handler.to_kwargs() if accelerator.scaler_handler is not None else {}
    accelerator.native_amp = True
    accelerator.scaler = torch.amp.GradScaler("cpu", **kwargs)


def full_state_dict(model: nn.Module, everywhere: bool) -> dict[str, torch.Tensor]:
    """The unsharded state dict of an FSDP2 ``model`` (a collective): on every process, on its device, or only on
    the main process, on CPU (the others get ``{}``)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=not everywhere))


def set_fsdp_wrap_classes(accelerator: Accelerator, names: list[str]) -> None:
    """Tell the FSDP plugin which module classes to shard as units (before ``prepare``)."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is not None:
        if not names:
            raise ConfigError("train.fsdp: no module classes to wrap; list them in train.fsdp.auto_wrap")
        plugin.transformer_cls_names_to_wrap = list(names)


def build_accelerator(train: TrainConfig, output_dir: Path) -> Accelerator:
    """The run's Accelerator: precision, seedable data order, DDP / FSDP options; checks the launch is coherent.

    Gradient accumulation is the trainer's own (it needs every micro-batch of a step to normalise the
    loss by their token count), so accelerate is told 1. ``dispatch_batches=False``: each process reads
    its own batches (accelerate's dispatching concatenates batches through rank 0 and fails on string
    fields); streamed data is split by the dataset itself.
    """
    if launched_processes() == 1:
        reset_accelerate_state()  # several runs in one process (the demo, notebooks) each get their own settings
    # accelerate treats a plain torchrun on a CPU-only machine as one process unless told cpu=True
    cpu_processes = launched_processes() > 1 and not has_accelerator()
    ddp = train.ddp
    fsdp = fsdp_plugin(train.fsdp)
    accelerator = Accelerator(
        cpu=cpu_processes,
        mixed_precision=resolve_mixed_precision(train.mixed_precision),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=train.seed,
                                                  dispatch_batches=False),
        project_dir=str(output_dir),
        step_scheduler_with_optimizer=False,  # we step it once per update, whatever the process count
        kwargs_handlers=[DistributedDataParallelKwargs(
            find_unused_parameters=ddp.find_unused_parameters, static_graph=ddp.static_graph,
            gradient_as_bucket_view=ddp.gradient_as_bucket_view, bucket_cap_mb=ddp.bucket_cap_mb,
            broadcast_buffers=ddp.broadcast_buffers)],
        fsdp_plugin=fsdp,
    )
    if fsdp is not None and cpu_processes:
        enable_fsdp_on_cpu(accelerator, fsdp)
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        enable_fp16_on_cpu(accelerator)
    if launched_processes() != accelerator.num_processes:
        raise TrainingError(
            f"launched as {launched_processes()} processes but accelerate runs {accelerator.num_processes} "
            f"({accelerator.distributed_type}); every process would train alone and overwrite the others' files"
        )
    return accelerator


def broadcast_module(accelerator: Accelerator, module: nn.Module) -> None:
    """Copy the main process's parameters and buffers into every other process's ``module`` (a collective)."""
    if accelerator.num_processes == 1:
        return
    with torch.no_grad():
        for tensor in module.state_dict(keep_vars=False).values():
            torch.distributed.broadcast(tensor, src=0)


def reduce_sum(accelerator: Accelerator, value: float) -> float:
    """``value`` summed over processes (a collective: every process must call it)."""
    if accelerator.num_processes == 1:
        return float(value)
    total = torch.tensor([float(value)], device=accelerator.device, dtype=torch.float64)
    return accelerator.reduce(total, "sum").item()


def all_have(accelerator: Accelerator, have: bool) -> bool:
    """Whether every process has something (e.g. a next batch); a collective."""
    if accelerator.num_processes == 1:
        return have
    return reduce_sum(accelerator, 1.0 if have else 0.0) == accelerator.num_processes


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
