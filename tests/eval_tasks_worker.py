"""torchrun worker of tests/test_eval_tasks.py: the training engine's scorer at a parallel layout.

Usage: eval_tasks_worker.py CONFIG WEIGHTS SEQUENCES_JSON OUT_DIR [OVERRIDE ...]; every rank
writes what the scorer gave it to OUT_DIR/rank<R>.pt (each rank must get every result).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main(config: str, weights: str, sequences: str, out: str, *overrides: str) -> None:
    from mor_megatron.parallel.state import initialize_parallel
    from mor_megatron.training.config import load_run_config
    from mor_megatron.training.eval_tasks import EngineScorer
    from mor_megatron.training.loop import build_model
    from mor_megatron.training.optimizer import build_engine
    from mor_megatron.training.schedule import evaluation_mode
    from mor_megatron.weights import load_weights

    run = load_run_config(config, overrides)
    initialize_parallel(run.parallel.tensor_model_parallel_size, run.parallel.pipeline_model_parallel_size,
                        run.training.seed)
    model, _, _ = build_model(run)
    load_weights(model, weights)
    engine = build_engine(model, run.training, run.training.micro_batch_size, 1)
    with evaluation_mode(engine.module):
        scores = EngineScorer(engine, run.training.micro_batch_size)(json.loads(Path(sequences).read_text()))
    torch.save(scores, Path(out) / f"rank{dist.get_rank()}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
