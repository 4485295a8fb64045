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


def training_setup(router: str, corpus, factory, **model):
    """Config, init-weights overrides and a single-process 5-step reference run."""
    import subprocess
    import sys

    from train_helpers import launch, repo_root, write_config

    root = factory.mktemp(router)
    config = write_config(root / "run.yaml", corpus, model={"router": router, **model})
    init = root / "init"
    made = subprocess.run(
        [sys.executable, "tools/init_weights.py", "--config", str(config), "--output", str(init)],
        capture_output=True, text=True, cwd=repo_root(),
    )
    assert made.returncode == 0, made.stderr[-3000:]
    overrides = [f"training.init_from={init}"]
    reference = root / "single"
    launch(config, reference, overrides)
    return config, overrides, reference, root


@pytest.fixture(scope="session")
def expert_setup(corpus, tmp_path_factory):
    return training_setup("expert_choice", corpus, tmp_path_factory)


@pytest.fixture(scope="session")
def token_setup(corpus, tmp_path_factory):
    return training_setup("token_choice", corpus, tmp_path_factory)
