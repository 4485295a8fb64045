"""`ModelScorer`: the `harness.Scorer` of a single-process (TP=1, PP=1) MoRGPTModel.

Why the native model and not an export to a temporary Hugging Face folder behind the scenes:
no copy of the weights is written or loaded (a 1.7B model is gigabytes of disk and seconds of
I/O per evaluation), the numbers come from the project's own forward and routing (the kernels and
precision the model trains with, not a re-implementation of them), and it works for every model
the project trains, including layouts and options the exporter does not cover.

Routing is the causal threshold rule (`routing_mode="threshold"`, as decoding): top-k routing
chooses among all positions of a sequence, so the continuation being scored would steer the
routing of its own context. Rows are right-padded to the longest sequence of the batch; under
the causal mask a pad is never a key of a real token, and threshold routing decides each token
alone, so a row's scores do not depend on what else is in its batch. (A token-choice model's
`token_choice_capacity_factor`, a training-time cap over all tokens of the forward, still applies
here; the HF export routes without it.)
"""

from __future__ import annotations

import torch

from mor_megatron.errors import UserError


def token_scores(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[2, b, s] float64 from logits [b, s, vocab] and targets [b, s]: log p(target) and whether
    the target is the argmax (1.0 / 0.0). Every scorer's rule (also training/eval_tasks.py)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    greedy = logits.argmax(dim=-1) == targets
    return torch.stack([logprobs.double(), greedy.double()])


class ModelScorer:
    """Log-probabilities of token sequences under `model`, `max_rows` sequences per forward."""

    def __init__(self, model: torch.nn.Module, max_rows: int = 8) -> None:
        config = model.config
        if config.tensor_model_parallel_size != 1 or config.pipeline_model_parallel_size != 1:
            raise UserError(
                "ModelScorer needs the whole model in one process (TP=1, PP=1): load it with inference.loading"
            )
        self.model = model
        self.max_rows = max_rows
        self.max_length = int(config.seq_length)

    def __call__(self, sequences: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(logprobs float64, greedy bool) host tensors of length len(sequence) - 1 per sequence."""
        for sequence in sequences:
            if not 2 <= len(sequence) <= self.max_length:
                raise ValueError(f"a scored sequence has {len(sequence)} tokens: use 2 to {self.max_length}")
        results: list[tuple[torch.Tensor, torch.Tensor]] = []
        training = self.model.training
        self.model.eval()  # no dropout in a score
        try:
            for start in range(0, len(sequences), self.max_rows):
                results += self._score_batch(sequences[start : start + self.max_rows])
        finally:
            self.model.train(training)
        return results

    @torch.no_grad()
    def _score_batch(self, sequences: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        device = next(self.model.parameters()).device
        width = max(len(sequence) for sequence in sequences) - 1
        # inputs t_0..t_{n-1} and targets t_1..t_n, right-padded with 0 (pads are never scored)
        rows = [
            [sequence[:-1] + [0] * (width + 1 - len(sequence)), sequence[1:] + [0] * (width + 1 - len(sequence))]
            for sequence in sequences
        ]
        inputs, targets = torch.tensor(rows, dtype=torch.long, device=device).unbind(1)
        positions = torch.arange(width, device=device).unsqueeze(0).expand(len(sequences), -1)
        logits = self.model(inputs, positions, None, extra_block_kwargs={"routing_mode": "threshold"})
        host = token_scores(logits, targets).cpu()  # the batch's one device->host copy
        return [(host[0, i, : len(s) - 1], host[1, i, : len(s) - 1].bool()) for i, s in enumerate(sequences)]
