"""The valid range of every numeric setting, in one table, and the check every config section runs.

A value outside its range would otherwise reach torch, DeepSpeed or the schedule unchecked and fail
late (a traceback after the model is built) or, worse, train something wrong and exit 0 (a negative
learning rate, non-finite weights). Each section's dataclass calls `check_ranges` when it is
built, so a bad value is one `ConfigError` line before any work starts. `tests/test_ranges.py`
requires an entry here for every numeric field of every section and tries each bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class Range:
    """low <= value <= high (strict where `*_open`); `integer`: a whole number. Floats must be finite."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def holds(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        low = None if self.low is None else ("(" if self.low_open else "[") + f"{self.low:g}"
        high = None if self.high is None else f"{self.high:g}" + (")" if self.high_open else "]")
        if low and high:
            return f"{kind} in {low}, {high}"
        if low:
            return f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
        if high:
            return f"{kind} {'<' if self.high_open else '<='} {self.high:g}"
        return kind


POSITIVE_INT = Range(1, integer=True)
COUNT = Range(0, integer=True)  # zero allowed: "none" or "only at the end"
POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1)  # a share or ratio, both ends allowed
PROBABILITY = Range(0, 1, high_open=True)  # dropout, Adam betas: 1 would stop learning
SEED = Range(0, 2**32 - 1, integer=True)  # numpy's seed range, the narrowest of the RNGs seeded

RANGES: dict[str, dict[str, Range]] = {
    "model": {
        # shape
        "hidden_size": POSITIVE_INT,
        "num_attention_heads": POSITIVE_INT,
        "num_query_groups": POSITIVE_INT,
        "ffn_hidden_size": POSITIVE_INT,
        "kv_channels": POSITIVE_INT,
        "vocab_size": POSITIVE_INT,
        "seq_length": POSITIVE_INT,
        "num_layers": COUNT,  # derived from effective_layers; 0 until then
        "effective_layers": COUNT,  # 0: unset (refused with its own message)
        "num_recursions": POSITIVE_INT,
        "softmax_scale": POSITIVE,
        "rotary_base": Range(1, low_open=True),  # theta <= 1 gives no rotation spectrum
        "layernorm_epsilon": POSITIVE,
        "hidden_dropout": PROBABILITY,
        "attention_dropout": PROBABILITY,
        "init_method_std": POSITIVE,
        "embedding_init_method_std": POSITIVE,
        # routing (capacities are checked as a list in `MoRConfig._validate_capacities`)
        "router_alpha": POSITIVE,
        "router_aux_loss_coeff": NON_NEGATIVE,
        "router_z_loss_coeff": NON_NEGATIVE,
        "router_balance_loss_coeff": NON_NEGATIVE,
        "aux_router_loss_coeff": NON_NEGATIVE,
        "token_choice_capacity_factor": POSITIVE,
        # layout, recompute, precision (set by the run's other sections or the FP8 recipe)
        "tensor_model_parallel_size": POSITIVE_INT,
        "pipeline_model_parallel_size": POSITIVE_INT,
        "expert_tensor_parallel_size": POSITIVE_INT,
        "microbatch_group_size_per_vp_stage": POSITIVE_INT,
        "recompute_num_layers": POSITIVE_INT,
        "fp8_margin": COUNT,
        "fp8_interval": POSITIVE_INT,
        "fp8_amax_history_len": POSITIVE_INT,
        "num_layers_at_start_in_bf16": COUNT,
        "num_layers_at_end_in_bf16": COUNT,
    },
    "parallel": {
        "tensor_model_parallel_size": POSITIVE_INT,
        "pipeline_model_parallel_size": POSITIVE_INT,
    },
    "training": {
        "micro_batch_size": POSITIVE_INT,
        "global_batch_size": POSITIVE_INT,
        "train_steps": POSITIVE_INT,
        "seed": SEED,
        "lr": FRACTION,  # AdamW: above 1 every step moves each weight by more than 1; 0 freezes them
        "min_lr_ratio": FRACTION,
        "warmup_steps": COUNT,
        "decay_fraction": FRACTION,
        "weight_decay": NON_NEGATIVE,
        "adam_beta1": PROBABILITY,
        "adam_beta2": PROBABILITY,
        "adam_eps": POSITIVE,
        "grad_clip": NON_NEGATIVE,  # 0: no clipping
        "zero_stage": Range(0, 3, integer=True),
        "eval_interval": COUNT,
        "eval_batches": POSITIVE_INT,
        "eval_tasks_limit": POSITIVE_INT,
        "eval_tasks_num_fewshot": COUNT,
        "eval_tasks_batch_size": POSITIVE_INT,
        "save_interval": COUNT,
        "keep_checkpoints": COUNT,  # 0: keep every checkpoint
        "max_bad_steps": POSITIVE_INT,
        "exit_after_steps": POSITIVE_INT,
    },
    "logging": {
        "log_interval": POSITIVE_INT,
        "peak_tflops": POSITIVE,
    },
}


def check_ranges(section: str, settings: Any) -> None:
    """Raise a one-line `ConfigError` for the first setting of `settings` (a section's dataclass)
    outside its range in `RANGES[section]`; None (an unset optional) always passes."""
    from mor_megatron.config import ConfigError  # config.py imports this module

    for name, valid in RANGES[section].items():
        value = getattr(settings, name, None)
        if value is not None and not valid.holds(value):
            raise ConfigError(f"{section}.{name}={value!r} is out of range: use {valid.describe()}")

