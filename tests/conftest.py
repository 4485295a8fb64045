"""Shared test setup: one megatron parallel state (world of one, gloo) for in-process model tests."""

import pytest

from mor_megatron.parallel.state import initialize_parallel


@pytest.fixture(scope="session")
def parallel() -> None:
    initialize_parallel()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A small token corpus from the embedded stdlib source, with its own BPE tokenizer."""
    from train_helpers import make_corpus

    return make_corpus(tmp_path_factory.mktemp("corpus"))
