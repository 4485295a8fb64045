"""MoR model: config-driven megatron-core modules."""

from mor_megatron.model.gpt import MoRGPTModel
from mor_megatron.model.specs import get_mor_block_spec, get_mor_layer_spec

__all__ = ["MoRGPTModel", "get_mor_layer_spec", "get_mor_block_spec"]
