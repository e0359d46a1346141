"""The tasks that plug into the shared Trainer: what differs per job, and nothing else."""

from mmlm.tasks.captioning import CaptioningTask
from mmlm.tasks.classification import ClassificationTask
from mmlm.tasks.diffusion import DiffusionTask

TASKS = {task.name: task for task in (CaptioningTask, ClassificationTask, DiffusionTask)}

__all__ = ["TASKS", "CaptioningTask", "ClassificationTask", "DiffusionTask"]
