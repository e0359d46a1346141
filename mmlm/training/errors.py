"""The errors the harness raises: each message says what failed and where (step, checkpoint, folder)."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and where (step, checkpoint)."""


class NonFiniteLossError(TrainingError, FloatingPointError):
    """The loss became NaN or infinite; raised before the optimiser steps on it."""


class CheckpointError(OSError):
    """A checkpoint could not be written or read; the message names the folder."""


class CheckpointWriteError(TrainingError, CheckpointError):
    """A checkpoint could not be written; the previous one is left intact."""
