"""lm-evaluation-harness driven by a `Scorer`: the project's lm-eval model, task resolution,
evaluation and its results as flat metrics or a table.

`MoRLM` is an lm-eval model (registered as "mor-megatron") that hands token sequences to a
`Scorer` in batches and turns the per-token log-probabilities into lm-eval's answers. Tokenising
(`TemplateLM._encode_pair`: trailing context spaces move into the continuation; an empty context
conditions on EOS), left-truncation to the scorer's length and rolling windows follow lm-eval's
own Hugging Face model (lm_eval/models/huggingface.py): requests are built as for any lm-eval
model (a text longer than the model's seq_length keeps one context token less here). Only
log-likelihood kinds are supported: the model has no generation path here.
"""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Protocol, Sequence

import numpy as np
import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator

from mor_megatron.errors import UserError

if TYPE_CHECKING:
    from lm_eval.api.instance import Instance
    from lm_eval.tasks import TaskManager

    from mor_megatron.data.tokenizer import TextTokenizer

SUPPORTED_OUTPUT_TYPES = ("loglikelihood", "loglikelihood_rolling", "multiple_choice")


class Scorer(Protocol):
    """Per-token log-probabilities of token sequences under a model.

    For each sequence t_0..t_n (2 <= n+1 <= max_length): (logprobs, greedy), both host tensors of
    length n: logprobs[i] = log p(t_{i+1} | t_0..t_i) (float64), greedy[i] = t_{i+1} is the
    argmax (bool). One device->host copy per batch (the results leave the device there, by design).
    """

    max_length: int  # longest token sequence it can score (the model's seq_length)

    def __call__(self, sequences: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]: ...


@register_model("mor-megatron")
class MoRLM(TemplateLM):
    """lm-eval's model over a `Scorer`: loglikelihood (multiple choice too) and
    loglikelihood_rolling; `batch_size` sequences go to the scorer at a time, longest first."""

    def __init__(self, scorer: Scorer, tokenizer: "TextTokenizer", batch_size: int = 8) -> None:
        super().__init__()
        if scorer.max_length < 2:
            raise UserError(f"the model's seq_length is {scorer.max_length}: scoring needs at least 2 tokens")
        self.scorer = scorer
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None) -> "MoRLM":
        raise UserError("the mor-megatron lm-eval model needs a loaded checkpoint: run mor-eval --checkpoint DIR")

    create_from_arg_obj = create_from_arg_string

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path)

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        return self.tokenizer.encode_batch([string])[0]  # the project's tokenizers add no BOS/EOS

    def _loglikelihood_tokens(
        self, requests: list[tuple], disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """(log p(continuation | context), continuation is greedy) per (key, context, continuation)
        request; context + continuation is cut from the left to `max_length` tokens (lm-eval's HF
        model keeps one more: its limit is on the model input, the scorer's on the whole sequence)."""
        for key, _, continuation in requests:
            if not 0 < len(continuation) < self.max_length:
                raise UserError(
                    f"a continuation of {len(continuation)} tokens cannot be scored within the model's "
                    f"seq_length {self.max_length} (request {str(key)[:60]!r}): use a task with shorter answers"
                )
        # longest first (lm-eval's order): padding within a batch stays small
        order = Collator(requests, sort_fn=lambda r: (-len(r[1]) - len(r[2]), tuple(r[1] + r[2])))
        results = []
        for chunk in order.get_batched(n=self.batch_size):
            scored = self.scorer([(context + continuation)[-self.max_length:] for _, context, continuation in chunk])
            for (key, _, continuation), (logprobs, greedy) in zip(chunk, scored, strict=True):
                count = len(continuation)
                answer = (float(logprobs[-count:].sum()), bool(greedy[-count:].all()))
                results.append(answer)
                if key is not None:  # rolling windows have no key: cached per document instead
                    self.cache_hook.add_partial("loglikelihood", key, answer)
        return order.get_original(results)

    def loglikelihood_rolling(self, requests: list["Instance"], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, conditioned on EOS, in disjoint windows that each fit
        `max_length` tokens (lm-eval's `get_rolling_token_windows`); all windows batched together."""
        windows, counts = [], []
        for (text,) in [request.args for request in requests]:
            pieces = [
                lm_utils.make_disjoint_window(window)
                for window in lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length - 1,  # the window's input; + its last target = max_length
                    context_len=1,
                )
            ]
            windows += [(None, context, continuation) for context, continuation in pieces]
            counts.append(len(pieces))
        scores = self._loglikelihood_tokens(windows)
        totals, start = [], 0
        for request, count in zip(requests, counts, strict=True):
            total = sum(logprob for logprob, _ in scores[start : start + count])
            start += count
            totals.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: list["Instance"], disable_tqdm: bool = False) -> list[str]:
        raise UserError(
            f"generate_until tasks are not supported by the mor-megatron lm-eval model: use tasks of output_type "
            f"{', '.join(SUPPORTED_OUTPUT_TYPES)}"
        )


# -- tasks ----------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _task_manager(include_paths: tuple[str, ...], defaults: bool) -> "TaskManager":
    """One index per set of task folders: lm-eval's own (defaults) takes seconds to scan, so it is
    built only for a task the given folders do not define, and once per process (in-loop
    evaluation calls again)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_paths) or None, include_defaults=defaults)


def _folder_tasks(folder: Path) -> list[str]:
    """The tasks and groups a folder of task YAMLs defines; a task that one of the folder's groups
    lists is left to its group (it would be evaluated twice)."""
    from lm_eval.tasks._index import Kind, TaskIndex

    index = TaskIndex.build([folder])
    members = {
        member
        for entry in index.values()
        if entry.kind == Kind.GROUP
        for member in (entry.cfg or {}).get("task", [])
        if isinstance(member, str)
    }
    return [
        name
        for name, entry in index.items()
        if entry.kind in (Kind.GROUP, Kind.TASK, Kind.PY_TASK) and name not in members
    ]


def _yaml_task(path: Path) -> str:
    from lm_eval.tasks._index import TaskIndex

    try:
        entry = TaskIndex.entry_from_path(path)
    except Exception as err:  # YAML syntax, or no task/group key
        raise UserError(f"task file {path} is not an lm-eval task YAML ({type(err).__name__}): fix the file") from None
    if entry is None:
        raise UserError(f"task file {path} names no task: give it a 'task:' (or 'group:') key")
    return entry.name


def _output_types(manager: "TaskManager", name: str, depth: int = 0) -> list[tuple[str, str]]:
    """(task, output_type) of every leaf task under `name` (groups and tags expanded)."""
    from lm_eval.tasks._index import Kind

    entry = manager.task_index.get(name)
    if entry is None or depth > 8:
        return []
    if entry.kind == Kind.TASK:
        return [(name, (entry.cfg or {}).get("output_type", "generate_until"))]
    if entry.kind not in (Kind.TAG, Kind.GROUP):
        return []  # a Python task: its kind is known only once built
    members = entry.tags if entry.kind == Kind.TAG else (entry.cfg or {}).get("task", [])
    found = []
    for member in members:
        if isinstance(member, dict):
            found.append((member.get("task", name), member.get("output_type", "generate_until")))
        else:
            found += _output_types(manager, member, depth + 1)
    return found


def resolve_tasks(entries: Sequence[str], include_paths: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """(task names, include paths) from lm-eval task names, task YAML files and folders of task
    YAMLs (a folder contributes every task it defines); `include_paths`: more folders whose tasks
    `entries` may name. An unknown name, a missing path, or a generation task is one `UserError`
    line naming it and the fix."""
    names, includes, _ = _resolve(entries, include_paths)
    return names, includes


def _resolve(entries: Sequence[str], include_paths: Sequence[str]) -> tuple[list[str], list[str], "TaskManager"]:
    names: list[str] = []
    includes: list[str] = []
    named: list[str] = []
    for folder in include_paths:
        if not Path(folder).expanduser().is_dir():
            raise UserError(f"include path {folder} is not a folder: give a folder of task YAMLs")
        includes.append(str(Path(folder).expanduser().resolve()))
    for entry in entries:
        path = Path(entry).expanduser()
        if path.is_dir():
            found = _folder_tasks(path)
            if not found:
                raise UserError(
                    f"task folder {entry} defines no lm-eval task (no *.yaml with a 'task:' key): check the folder"
                )
            names += found
            includes.append(str(path.resolve()))
        elif path.is_file():
            if path.suffix != ".yaml":
                raise UserError(f"task file {entry} is not a .yaml file: lm-eval reads task files named *.yaml")
            names.append(_yaml_task(path))
            includes.append(str(path.resolve().parent))
        elif "/" in entry or entry.endswith((".yaml", ".yml")):
            raise UserError(f"task path {entry} not found: check the path (a task YAML file or a folder of them)")
        else:
            names.append(entry)
            named.append(entry)
    names, includes = list(dict.fromkeys(names)), list(dict.fromkeys(includes))
    if not names:
        raise UserError("no task given: pass lm-eval task names, task YAML files or folders")
    manager = _task_manager(tuple(includes), False)  # local folders alone: no scan of lm-eval's own
    if any(name not in manager.task_index for name in named):
        manager = _task_manager(tuple(includes), True)
    unknown = [name for name in named if name not in manager.task_index]
    if unknown:
        raise UserError(
            f"unknown lm-eval task '{unknown[0]}': check the name (lm-eval ls tasks lists them), or give "
            "a task YAML file or folder"
        )
    generating = [
        task for name in names for task, kind in _output_types(manager, name) if kind not in SUPPORTED_OUTPUT_TYPES
    ]
    if generating:
        raise UserError(
            f"task '{generating[0]}' generates text (generate_until), which the mor-megatron lm-eval model does "
            f"not support: use tasks of output_type {', '.join(SUPPORTED_OUTPUT_TYPES)}"
        )
    return names, includes, manager


def evaluate_tasks(
    lm: MoRLM,
    entries: Sequence[str],
    *,
    num_fewshot: Optional[int] = None,
    limit: Optional[int] = None,
    seed: int = 1234,
    include_paths: Sequence[str] = (),
    log_samples: bool = False,
) -> dict:
    """`lm_eval.simple_evaluate` on the resolved tasks (`resolve_tasks`): its results dict ("results", "versions",
    "n-shot", "configs", ... and "samples" with `log_samples`). Offline on local tasks. Python's and
    numpy's global random states are restored afterwards and torch's is not touched (lm-eval seeds
    them for few-shot sampling; a training loop calling this keeps its own streams)."""
    from lm_eval.evaluator import simple_evaluate

    names, _, manager = _resolve(entries, include_paths)
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        return simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=num_fewshot,
            limit=limit,
            batch_size=lm.batch_size,
            task_manager=manager,
            log_samples=log_samples,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=None,
            fewshot_random_seed=seed,
        )
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


# -- results --------------------------------------------------------------------------------------


def flat_metrics(results: dict, prefix: str = "eval/") -> dict[str, float]:
    """{"eval/<task>/<metric>": value} for every numeric metric of every task and group (acc,
    acc_norm, perplexity, ... and their stderr); a filter other than "none" is kept as a suffix."""
    flat: dict[str, float] = {}
    for section in ("results", "groups"):
        for task, metrics in (results.get(section) or {}).items():
            for key, value in metrics.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)) or "," not in key:
                    continue  # "alias", "N/A" stderr, sample counts without a filter
                metric, _, filter_name = key.partition(",")
                name = metric if filter_name == "none" else f"{metric}_{filter_name}"
                flat[f"{prefix}{task}/{name}"] = float(value)
    return flat


def results_table(results: dict) -> str:
    """lm-eval's markdown table of the results (and of the groups, when there are any)."""
    table = lm_utils.make_table(results)
    if results.get("groups"):
        table += "\n" + lm_utils.make_table(results, "groups")
    return table
