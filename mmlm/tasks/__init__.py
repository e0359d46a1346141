"""The tasks that plug into the shared Trainer: what differs per job, and nothing else.

common.py the image-text base (splits built once, collate, corpus) and saved-folder reading; captioning.py,
classification.py, diffusion.py one task each. Tasks import train, models, data and eval; never mmlm.api.
"""

from mmlm.tasks.captioning import CaptioningTask
from mmlm.tasks.classification import ClassificationTask
from mmlm.tasks.diffusion import DiffusionTask
from mmlm.tasks.vqa import VQATask

TASKS = {task.name: task for task in (CaptioningTask, ClassificationTask, DiffusionTask, VQATask)}

__all__ = ["TASKS", "CaptioningTask", "ClassificationTask", "DiffusionTask", "VQATask"]
