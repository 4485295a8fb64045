"""mor-megatron: Mixture-of-Recursions pretraining on megatron-core and DeepSpeed."""

__version__ = "0.1.0"
