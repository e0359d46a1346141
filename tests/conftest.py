"""Shared test set-up."""

import pytest

from mmlm.training.trainer import reset_accelerate_state


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps process-wide state; every test starts and ends without an earlier test's."""
    reset_accelerate_state()
    yield
    reset_accelerate_state()
