"""Evaluate a training checkpoint on lm-evaluation-harness tasks (no export needed).

    python tools/evaluate.py --checkpoint runs/tiny/checkpoints --tasks piqa arc_easy \\
        [--tasks my_tasks/ more.yaml] [--include-path DIR] [--num-fewshot 0] [--limit 100] \\
        [--batch-size 8] [--tokenizer DIR] [--device cuda] [--output results.json]

`--tasks`: lm-eval task names, task YAML files, or folders of task YAMLs (a folder gives every
task it defines); `--include-path` adds folders whose tasks may then be named. The project's own
model is scored in causal threshold routing (mor_megatron/evaluation); only log-likelihood tasks
(multiple choice, loglikelihood, perplexity) are supported. Prints lm-eval's results table;
`--output` also writes the results as JSON. Local tasks run offline; named tasks download their
data sets from the Hugging Face hub on first use.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional


def build_parser() -> argparse.ArgumentParser:
    from mor_megatron.cli import ToolParser, device_name, non_negative_int, positive_int, seed

    parser = ToolParser(prog="mor-eval", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a step_N checkpoint or the folder holding them")
    parser.add_argument("--tasks", nargs="+", action="extend", required=True,
                        help="lm-eval task names, task YAML files or folders of them (repeatable)")
    parser.add_argument("--include-path", action="append", default=[],
                        help="a folder of task YAMLs whose tasks --tasks may name (repeatable)")
    parser.add_argument("--num-fewshot", type=non_negative_int, help="few-shot examples (default: each task's own)")
    parser.add_argument("--limit", type=positive_int, help="at most this many examples per task (for a quick look)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="sequences scored per forward")
    parser.add_argument("--tokenizer", help="tokenizer folder or name (default: the run's data.tokenizer)")
    parser.add_argument("--device", type=device_name, default="auto", help="cpu, cuda, cuda:N (default: auto)")
    parser.add_argument("--seed", type=seed, default=1234, help="seed of few-shot sampling")
    parser.add_argument("--output", help="also write the results as JSON to this file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from mor_megatron.errors import run_cli

    return run_cli(lambda: _run(args), args.debug)


def _run(args) -> int:
    import logging

    from lm_eval.utils import handle_non_serializable

    from mor_megatron.checkpoint_files import write_atomic
    from mor_megatron.data.tokenizer import check_vocab, load_tokenizer
    from mor_megatron.errors import UserError
    from mor_megatron.evaluation.harness import MoRLM, evaluate_tasks, resolve_tasks, results_table
    from mor_megatron.evaluation.scoring import ModelScorer
    from mor_megatron.inference.loading import load_model, read_checkpoint_meta, resolve_checkpoint, tokenizer_name
    from mor_megatron.paths import output_file

    if not args.debug:
        logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-task INFO/WARNING notes
    # tasks, output place and tokenizer first: seconds, before a model is loaded
    resolve_tasks(args.tasks, args.include_path)
    output = output_file(args.output, "the results JSON", overwrite=args.overwrite) if args.output else None
    meta = read_checkpoint_meta(resolve_checkpoint(args.checkpoint))
    name = tokenizer_name(meta, args.tokenizer)
    if name is None:
        raise UserError("no tokenizer: pass --tokenizer DIR (the run's config has no data.tokenizer)")
    tokenizer = load_tokenizer(name)
    model, directory, _ = load_model(args.checkpoint, None if args.device == "auto" else args.device)
    check_vocab(tokenizer.vocab_size, model.config.vocab_size)  # a foreign --tokenizer
    lm = MoRLM(ModelScorer(model, args.batch_size), tokenizer, batch_size=args.batch_size)
    results = evaluate_tasks(lm, args.tasks, num_fewshot=args.num_fewshot, limit=args.limit, seed=args.seed,
                             include_paths=args.include_path)
    results["config"]["model"] = f"mor-megatron:{directory}"
    if output is not None:
        write_atomic(output, json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
    print(results_table(results))
    if output is not None:
        print(f"# results written to {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
