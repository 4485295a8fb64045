"""Parity of the MoR model against independent computations (tolerance 1e-5 on logits)."""

import pytest
import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

from model_helpers import batch, build, logits, tiny_config

pytestmark = pytest.mark.usefixtures("parallel")
TOL = 1e-5


def test_one_recursion_without_routing_equals_megatron_gptmodel():
    """Vanilla MoR config == megatron-core's own GPTModel from its local layer spec (stock core
    attention included) with the same weights."""
    config = tiny_config(effective_layers=3, num_recursions=1, sharing="none", router="none")
    model = build(config)
    reference = GPTModel(
        config,
        get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=config.vocab_size,
        max_sequence_length=config.seq_length,
        share_embeddings_and_output_weights=True,
        position_embedding_type="rope",
    )
    assert set(reference.state_dict()) == set(model.state_dict())
    reference.load_state_dict(model.state_dict())
    tokens, positions = batch(config)
    ours, theirs = logits(model, tokens, positions), logits(reference, tokens, positions)
    assert ours.shape == (2, config.seq_length, config.vocab_size)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=TOL)
    labels = torch.roll(tokens, -1, dims=1)
    torch.testing.assert_close(
        model(tokens, positions, None, labels=labels),
        reference(tokens, positions, None, labels=labels),
        rtol=0,
        atol=TOL,
    )


@pytest.mark.parametrize("sharing", ["middle_cycle", "cycle", "middle_sequence", "sequence"])
def test_recursive_model_equals_unrolled_copy(sharing):
    """Without routing, a shared-weight model == the vanilla model of the same depth whose layers
    are copies of the unique layer each depth uses."""
    depth = 8 if sharing.startswith("middle") else 9
    config = tiny_config(effective_layers=depth, num_recursions=3, sharing=sharing, router="none")
    model = build(config)
    unrolled = build(tiny_config(effective_layers=depth, num_recursions=1, sharing="none", router="none"), seed=5)
    state = {k: v for k, v in model.state_dict().items() if ".layers." not in k}
    for depth_index, unique in enumerate(config.recursion_plan.unrolled):
        prefix = f"decoder.layers.{unique}."
        for key, value in model.state_dict().items():
            if key.startswith(prefix):
                state[f"decoder.layers.{depth_index}." + key[len(prefix):]] = value
    unrolled.load_state_dict(state)
    tokens, positions = batch(config)
    torch.testing.assert_close(
        logits(model, tokens, positions), logits(unrolled, tokens, positions), rtol=0, atol=TOL
    )

    # ... and a shared parameter's gradient is the sum of its copies' gradients.
    labels = torch.roll(tokens, -1, dims=1)
    model(tokens, positions, None, labels=labels).mean().backward()
    unrolled(tokens, positions, None, labels=labels).mean().backward()
    unrolled_params = dict(unrolled.named_parameters())
    for name, param in model.named_parameters():
        if ".layers." not in name:
            continue
        unique, rest = int(name.split(".")[2]), name.split(".", 3)[3]
        copies = [d for d, u in enumerate(config.recursion_plan.unrolled) if u == unique]
        summed = sum(unrolled_params[f"decoder.layers.{d}.{rest}"].grad for d in copies)
        torch.testing.assert_close(param.grad, summed, rtol=1e-4, atol=1e-6)
