"""The one training harness: a Task says what differs, the Trainer does the rest.

trainer.py the loop; checkpoint.py save / restore / resume; evaluation.py main-process evaluation and the
best model; logging.py the metrics log; report.py the end of a run; distributed.py processes, devices and
collectives; optim.py AdamW groups and the LR schedule; ema.py the weight average; task.py the Task interface;
errors.py the errors. Imports only models-free layers (config, data, eval): never tasks or api.
"""

from mmlm.training.checkpoint import latest_checkpoint, list_checkpoints
from mmlm.training.distributed import resolve_mixed_precision
from mmlm.training.ema import EMA
from mmlm.training.errors import CheckpointError, CheckpointWriteError, NonFiniteLossError, TrainingError
from mmlm.training.logging import MetricsLog
from mmlm.training.optim import (
    WarmupDecaySchedule,
    build_optimizer,
    lr_factor,
    parameter_groups,
)
from mmlm.training.task import Task
from mmlm.training.trainer import Trainer

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
