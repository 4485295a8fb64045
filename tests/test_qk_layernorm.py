"""`qk_layernorm` works (it was accepted and ignored: the spec hard-coded IdentityOp q/k norms):
per-head RMSNorm of queries and keys, as megatron-core's own GPT spec builds it."""

import pytest
import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.identity_op import IdentityOp

from model_helpers import batch, build, logits, tiny_config

pytestmark = pytest.mark.usefixtures("parallel")


def test_qk_layernorm_equals_megatron_gptmodel():
    config = tiny_config(effective_layers=3, num_recursions=1, sharing="none", router="none", qk_layernorm=True)
    model = build(config)
    reference = GPTModel(
        config,
        get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=True),
        vocab_size=config.vocab_size,
        max_sequence_length=config.seq_length,
        share_embeddings_and_output_weights=True,
        position_embedding_type="rope",
    )
    assert "decoder.layers.0.self_attention.q_layernorm.weight" in model.state_dict()
    assert set(reference.state_dict()) == set(model.state_dict())
    with torch.no_grad():  # non-trivial norm weights, so a skipped norm would show
        for name, param in model.named_parameters():
            if "q_layernorm" in name or "k_layernorm" in name:
                param.uniform_(0.5, 1.5)
    reference.load_state_dict(model.state_dict())
    tokens, positions = batch(config)
    torch.testing.assert_close(logits(model, tokens, positions), logits(reference, tokens, positions), rtol=0, atol=1e-5)


def test_recursive_model_normalises_queries_and_keys_only_when_asked():
    off, on = build(tiny_config()), build(tiny_config(qk_layernorm=True))
    attention = on.decoder.layers[0].self_attention
    assert type(attention.q_layernorm) is type(on.decoder.layers[0].input_layernorm)
    assert attention.q_layernorm.weight.shape == (on.config.head_dim,)
    assert isinstance(off.decoder.layers[0].self_attention.q_layernorm, IdentityOp)
    on.load_state_dict(off.state_dict(), strict=False)  # same weights but the q/k norms
    tokens, positions = batch(on.config)
    assert not torch.allclose(logits(off, tokens, positions), logits(on, tokens, positions))
