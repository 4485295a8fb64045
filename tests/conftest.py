"""Shared test setup: one megatron parallel state (world of one, gloo) for in-process model tests."""

import pytest

from mor_megatron.parallel.state import initialize_parallel


@pytest.fixture(scope="session")
def parallel() -> None:
    initialize_parallel()
