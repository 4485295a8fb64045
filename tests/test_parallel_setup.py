"""The replica marking `parallel.setup.parallelize` hands the decoder: the layers named in
`decoder.replica_layers` are saved as non-main dist-checkpoint replicas, every other one as main.
(At PP2 the marking itself runs in tests/test_checkpoints.py and test_distributed.py: a missing
mark is refused by megatron's save, "Invalid access pattern".)"""

import pytest

from model_helpers import build, tiny_config

pytestmark = pytest.mark.usefixtures("parallel")


def _replica_ids(model) -> dict[str, int]:
    """Dist-checkpoint key -> the pipeline part of its replica id."""
    return {
        value.key: value.replica_id[0]
        for value in model.sharded_state_dict().values()
        if isinstance(getattr(value, "replica_id", None), tuple)
    }


def test_decoder_marks_exactly_the_replica_layers_non_main():
    config = tiny_config()
    model = build(config)
    assert set(_replica_ids(model).values()) == {0}  # not parallelized: every tensor is main
    shared = str(config.recursion_plan.block[0])
    model.decoder.replica_layers = frozenset({shared})
    ids = _replica_ids(model)
    marked = {key for key, replica in ids.items() if replica == 1}
    assert marked and all(f"decoder.layers.{shared}." in key for key in marked)
    assert all(replica == 0 for key, replica in ids.items() if f"decoder.layers.{shared}." not in key)
