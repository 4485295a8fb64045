"""lm-eval tasks during pretraining (`training.eval_tasks`, docs/DESIGN.md 8.2): the training
engine as a harness `Scorer`.

`EngineScorer` scores token sequences with the model being trained, at its layout (TP, PP, DP,
ZeRO 1-3): each batch is padded to model.seq_length (one fixed shape: the pipeline's p2p shape)
and run forward only through the one schedule (`schedule.run_microbatches`) in threshold routing,
causal per token as decoding is (top-k would let the continuation steer its context's routing).
The last stage turns the logits (megatron gathers the TP vocab shards) into next-token log-probs
and greedy flags (`evaluation.scoring.token_scores`, every scorer's rule) and
`schedule.broadcast_from_last_stage` gives them to the other stages. Every rank runs the same
requests (lm-eval with world size 1 on each rank): ZeRO-3 needs every data-parallel rank in each
forward, and the stages need each other. The metrics (`harness.flat_metrics`) reach every rank;
the logging rank writes them with the step's.

The harness (and lm-eval) is imported only when tasks are configured (`mor-megatron[eval]`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from mor_megatron.device import collective_device, compute_device, to_device
from mor_megatron.errors import UserError
from mor_megatron.evaluation.scoring import token_scores
from mor_megatron.training.schedule import broadcast_from_last_stage, evaluation_mode, run_microbatches

# extra_block_kwargs of a causal forward: the routing decoding uses
THRESHOLD = {"routing_mode": "threshold"}


def _harness():
    """mor_megatron.evaluation.harness, or one line saying how to install lm-eval."""
    try:
        from mor_megatron.evaluation import harness
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] != "lm_eval":
            raise
        raise UserError(
            "training.eval_tasks needs lm-evaluation-harness, which is not installed: "
            "pip install 'mor-megatron[eval]' (or empty training.eval_tasks)"
        ) from None
    return harness


def check_eval_tasks(entries: Sequence[str]) -> None:
    """Before a model is built: lm-eval is installed and every entry names a task (one line if not)."""
    if entries:
        _harness().resolve_tasks(entries)


def _threshold_forward(module, batch: dict) -> tuple[Tensor, Tensor]:
    """(logits [b, s, vocab] on the last stage, the stage output elsewhere; the tokens) of one host
    micro-batch, routed causally; `runtime_gather_output` gathers the TP vocab shards."""
    batch = to_device(batch)
    output = module(batch["tokens"], batch["position_ids"], None, extra_block_kwargs=THRESHOLD,
                    runtime_gather_output=True)
    return output, batch["tokens"]


def _next_token_scores(logits: Tensor, tokens: Tensor) -> Tensor:
    """[2, b, s-1]: each next token's log-prob and greedy flag (`scoring.token_scores`)."""
    return token_scores(logits[:, :-1], tokens[:, 1:])


class EngineScorer:
    """The harness `Scorer` over a training engine (any layout); every rank must call it with the
    same sequences."""

    def __init__(self, engine, micro_batch_size: int) -> None:
        self.engine = engine
        self.micro_batch_size = micro_batch_size
        self.max_length: int = engine.module.config.seq_length

    def __call__(self, sequences: list[list[int]]) -> list[tuple[Tensor, Tensor]]:
        length, size = self.max_length, self.micro_batch_size
        for sequence in sequences:
            if not 2 <= len(sequence) <= length:
                raise ValueError(f"a sequence of {len(sequence)} tokens: the scorer takes 2 to {length}")
        rows = math.ceil(len(sequences) / size) * size  # whole micro-batches of one fixed shape
        # right-padded with 0: under causal attention and routing no token sees the pads after it
        padded = [sequence + [0] * (length - len(sequence)) for sequence in sequences]
        padded += [[0] * length] * (rows - len(sequences))
        tokens = torch.tensor(padded, dtype=torch.long, device="cpu")  # host: micro-batches, moved by the schedule
        positions = torch.arange(length, device="cpu").repeat(size, 1)  # host: as the tokens
        batches = [{"tokens": tokens[start:start + size], "position_ids": positions}
                   for start in range(0, rows, size)]
        outputs = run_microbatches(self.engine, batches, forward_only=True, forward=_threshold_forward,
                                   reduce=_next_token_scores)
        scores = (torch.cat(outputs.losses, dim=1) if outputs.losses  # stages before the last: a buffer
                  else torch.zeros((2, rows, length - 1), dtype=torch.float64, device=compute_device()))
        scores = broadcast_from_last_stage(scores).cpu()  # the one device->host copy of the batch
        return [(scores[0, row, : len(sequence) - 1], scores[1, row, : len(sequence) - 1].bool())
                for row, sequence in enumerate(sequences)]


@contextlib.contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    """lm-eval logs on every rank: only the logging rank's output is kept."""
    if not enabled:
        yield
        return
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class TaskEvaluation:
    """`training.eval_tasks` on the training engine: `__call__` gives the step's `eval/...` metrics."""

    def __init__(self, engine, training, tokenizer: str, quiet: bool) -> None:
        harness = _harness()
        from mor_megatron.data.tokenizer import load_tokenizer

        self.entries = list(training.eval_tasks)
        self.limit: Optional[int] = training.eval_tasks_limit
        self.num_fewshot: Optional[int] = training.eval_tasks_num_fewshot
        self.seed: int = training.seed
        self.quiet = quiet
        self.engine = engine
        scorer = EngineScorer(engine, training.micro_batch_size)
        self.lm = harness.MoRLM(scorer, load_tokenizer(tokenizer), batch_size=training.eval_tasks_batch_size)

    def __call__(self) -> dict[str, float]:
        harness = _harness()
        with evaluation_mode(self.engine.module), _quiet(self.quiet):
            results = harness.evaluate_tasks(self.lm, self.entries, num_fewshot=self.num_fewshot,
                                             limit=self.limit, seed=self.seed)
        # every rank computed the results but lm-eval returns them only where LOCAL_RANK is 0
        # (None elsewhere, the logging rank too at PP > 1): global rank 0's go to every rank
        shared = [harness.flat_metrics(results) if results is not None else None]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(shared, src=0, device=collective_device())
        return shared[0]


def summary_line(step: int, metrics: dict[str, Any]) -> str:
    """One progress line: each task's metrics at this step, stderr left out."""
    parts = [f"{key[len('eval/'):]} {value:.4g}" for key, value in metrics.items()
             if key.startswith("eval/") and "stderr" not in key]
    return f"step {step} lm-eval: " + ", ".join(parts)
