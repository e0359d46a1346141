"""The one training harness: a Task says what differs, the Trainer does the rest."""

from mmlm.train.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints
from mmlm.train.ema import EMA
from mmlm.train.optim import (
    WarmupDecaySchedule,
    build_optimizer,
    lr_factor,
    parameter_groups,
)
from mmlm.train.task import Task
from mmlm.train.trainer import (
    CheckpointWriteError,
    MetricsLog,
    NonFiniteLossError,
    Trainer,
    TrainingError,
    resolve_mixed_precision,
)

__all__ = [
    "EMA",
    "CheckpointError",
    "CheckpointWriteError",
    "MetricsLog",
    "NonFiniteLossError",
    "Task",
    "Trainer",
    "TrainingError",
    "WarmupDecaySchedule",
    "build_optimizer",
    "latest_checkpoint",
    "list_checkpoints",
    "lr_factor",
    "parameter_groups",
    "resolve_mixed_precision",
]
