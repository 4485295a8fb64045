"""torchrun worker of tests/test_varlen_layout.py: the padded layout equals the packed one at a
parallel layout (TP=2 or PP=2), through the trainer's own model build and micro-batch schedule.

Usage: varlen_layout_worker.py CONFIG WEIGHTS OUT_DIR [OVERRIDE ...]. For each case (token-choice
and threshold expert-choice, both KV modes) every rank writes OUT_DIR/rank<R>.json: the mean LM
loss of one fixed micro-batch per layout, the same on every rank.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

CASES = {  # name: (model overrides, routing mode)
    "token_choice-recursion_wise": (["model.router=token_choice", "model.kv_mode=recursion_wise"], "topk"),
    "token_choice-share_first": (["model.router=token_choice", "model.kv_mode=share_first"], "topk"),
    "expert_choice-recursion_wise-threshold": (["model.kv_mode=recursion_wise"], "threshold"),
    "expert_choice-share_first-threshold": (["model.kv_mode=share_first"], "threshold"),
}


def _batches(vocab: int, micro_batch: int, seq: int) -> list[dict]:
    generator = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, vocab, (micro_batch, seq), generator=generator)  # host batch: moved by forward_batch
    return [{"tokens": tokens, "position_ids": torch.arange(seq).expand(micro_batch, -1),
             "labels": torch.roll(tokens, -1, 1), "loss_mask": torch.ones(micro_batch, seq)}]


def main(config: str, weights: str, out: str, *overrides: str) -> None:
    from mor_megatron.device import to_device
    from mor_megatron.parallel.state import initialize_parallel
    from mor_megatron.training.config import load_run_config
    from mor_megatron.training.loop import build_model
    from mor_megatron.training.schedule import run_microbatches
    from mor_megatron.weights import load_weights

    results = {}
    for name, (case, mode) in CASES.items():
        run = load_run_config(config, [*overrides, *case])
        initialize_parallel(run.parallel.tensor_model_parallel_size, run.parallel.pipeline_model_parallel_size,
                            run.training.seed)
        model, config_, _ = build_model(run)
        load_weights(model, f"{weights}/{name}")
        decoders = [m for m in model.modules() if hasattr(m, "varlen_layout")]
        assert decoders, "no MoR decoder on this stage"

        def forward(module, batch: dict, mode: str = mode):
            batch = to_device(batch)
            return module(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                          extra_block_kwargs={"routing_mode": mode}), batch["loss_mask"]

        batches = _batches(config_.vocab_size, run.training.micro_batch_size, config_.seq_length)
        results[name] = {}
        for layout in ("packed", "padded"):
            for decoder in decoders:
                decoder.varlen_layout = layout
            outputs = run_microbatches(SimpleNamespace(module=model), batches, forward_only=True, forward=forward)
            results[name][layout] = outputs.mean_loss()
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])
