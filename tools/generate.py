"""Generate text from a training checkpoint with the MoR engine (continuous depth-wise batching).

    python tools/generate.py --checkpoint runs/tiny/checkpoints --prompts prompts.txt \\
        [--tokenizer DIR] [--greedy | --temperature 0.8 --top-p 0.95] [--max-tokens 64] [--stop TEXT]

`--prompts`: one prompt per line (a `.jsonl` file: one {"prompt": ...} per line), or
`--prompt TEXT` (repeatable; `\\n` is a newline, as in a prompts file). With
`--token-ids`, each line is whitespace-separated token ids and no tokenizer is needed. Prints
each completion; `--output FILE` also writes them as JSON lines (text, token ids, finish reason,
mean recursion depth). Decoding uses causal threshold routing (docs/DESIGN.md 3.3).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional


def read_prompts(path: str) -> list[str]:
    """Prompts from a text file (one per line, blank lines skipped) or JSON lines (each an object
    with a string "prompt"); a file that is missing, binary or malformed is one `UserError` line."""
    from mor_megatron.errors import UserError

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"--prompts {path} not found: check the path") from None
    except UnicodeDecodeError:
        raise UserError(f"--prompts {path} is not a UTF-8 text file: give one prompt per line") from None
    except OSError as err:
        raise UserError(f"--prompts {path} cannot be read ({err.strerror})") from None
    if not path.endswith(".jsonl"):
        return [line.replace("\\n", "\n") for line in lines if line.strip()]
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise UserError(f'--prompts {path} line {number} is not a JSON object with a string "prompt": fix that line')
        prompts.append(record["prompt"])
    return prompts


def parse_token_ids(lines: list[str], vocab_size: int) -> list[list[int]]:
    """`--token-ids` prompt lines: whitespace-separated integers in [0, vocab_size)."""
    from mor_megatron.errors import UserError

    prompts = []
    for number, line in enumerate(lines, 1):
        try:
            ids = [int(token) for token in line.split()]
        except ValueError:
            raise UserError(f"prompt {number} ('{line[:40]}') is not whitespace-separated token ids (--token-ids)") from None
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise UserError(f"prompt {number} has token id {bad[0]} outside the model's vocabulary [0, {vocab_size})")
        prompts.append(ids)
    return prompts


def build_parser() -> argparse.ArgumentParser:
    from mor_megatron.cli import ToolParser, non_negative_int, positive_float, positive_int, ranged, seed
    from mor_megatron.ranges import Range

    parser = ToolParser(prog="mor-generate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a step_N checkpoint or the folder holding them")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", help="text file, one prompt per line (or .jsonl)")
    source.add_argument("--prompt", action="append", help="a prompt given inline (repeatable)")
    parser.add_argument("--tokenizer", help="tokenizer folder or name (default: the run's data.tokenizer)")
    parser.add_argument("--token-ids", action="store_true", help="prompt lines are token ids; print ids")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="argmax decoding (default)")
    mode.add_argument("--temperature", type=positive_float, help="sample at this temperature")
    parser.add_argument("--top-p", type=ranged(Range(0, 1, low_open=True)), default=1.0,
                        help="nucleus sampling mass (with --temperature)")
    parser.add_argument("--top-k", type=non_negative_int, default=0, help="keep the k most likely tokens (0: all)")
    parser.add_argument("--max-tokens", type=positive_int, default=64, help="new tokens per prompt")
    parser.add_argument("--stop", action="append", default=[], help="stop text (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at the tokenizer's EOS")
    parser.add_argument("--seed", type=seed, default=0, help="sampling seed (request i uses seed + i)")
    parser.add_argument("--max-batch", type=positive_int, default=8, help="sequences decoded at once")
    parser.add_argument("--max-seq", type=positive_int, help="cache length per sequence (default: the model's)")
    parser.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                        help="run the decode layers under torch.compile (default backend: inductor)")
    parser.add_argument("--output", help="also write JSON lines here")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from mor_megatron.errors import run_cli

    return run_cli(lambda: _run(args), args.debug)


def _run(args) -> int:
    from mor_megatron.data.tokenizer import load_tokenizer
    from mor_megatron.inference.engine import Engine
    from mor_megatron.inference.loading import LoadError, load_model, tokenizer_name
    from mor_megatron.inference.sampling import SamplingParams
    from mor_megatron.paths import output_file

    # the prompts and the output place first: seconds, before a model is loaded
    lines = read_prompts(args.prompts) if args.prompts else [p.replace("\\n", "\n") for p in args.prompt]
    if not lines:
        raise LoadError(f"{args.prompts} holds no prompt")
    if args.output:
        output_file(args.output, "the JSON lines")
    model, directory, meta = load_model(args.checkpoint)
    config = model.config
    tokenizer = None
    name = tokenizer_name(meta, args.tokenizer)
    if not args.token_ids:
        if name is None:
            raise LoadError("no tokenizer: pass --tokenizer DIR (the run has no data.tokenizer) or use --token-ids")
        tokenizer = load_tokenizer(name)
    if args.token_ids:
        prompts = parse_token_ids(lines, config.vocab_size)
    else:
        prompts = tokenizer.encode_batch(lines)
    empty = [number for number, prompt in enumerate(prompts, 1) if not prompt]
    if empty:
        raise LoadError(f"prompt {empty[0]} has no tokens: give each prompt some text (or ids)")
    stop_ids = () if args.ignore_eos or tokenizer is None else (tokenizer.eos_id,)
    if args.stop and tokenizer is None:
        raise LoadError("--stop TEXT needs a tokenizer (drop --token-ids)")
    max_seq = args.max_seq or config.seq_length
    longest = max(len(p) for p in prompts)
    if longest >= max_seq:
        raise LoadError(f"a prompt has {longest} tokens but max_seq is {max_seq}: shorten it or raise --max-seq")
    temperature = 0.0 if args.temperature is None else args.temperature
    params = [
        SamplingParams(
            temperature=temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            max_tokens=args.max_tokens,
            stop_token_ids=stop_ids,
            stop_strings=tuple(args.stop),
            seed=args.seed + i,
        )
        for i in range(len(prompts))
    ]
    engine = Engine(model, max_batch=args.max_batch, max_seq=max_seq, tokenizer=tokenizer, compile=args.compile or False)
    start = time.perf_counter()
    completions = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    out = open(args.output, "w", encoding="utf-8") if args.output else None
    for line, completion in zip(lines, completions):
        depths = completion.depths
        record = {
            "prompt": line,
            "completion": completion.text,
            "token_ids": completion.token_ids,
            "finish_reason": completion.finish_reason,
            "mean_depth": sum(depths) / max(1, len(depths)),
        }
        shown = completion.text if completion.text is not None else " ".join(map(str, completion.token_ids))
        print(f"--- {line!r} [{completion.finish_reason}, mean depth {record['mean_depth']:.2f}]")
        print(shown)
        if out:
            out.write(json.dumps(record) + "\n")
    if out:
        out.close()
    stats = engine.stats
    rate = f"{stats.generated_tokens / elapsed:.1f}" if elapsed > 0 else "n/a"  # too short to time
    print(
        f"# {directory}: {len(prompts)} prompts, {stats.generated_tokens} tokens in {elapsed:.2f} s "
        f"({rate} tok/s), {stats.block_calls} block calls "
        f"of {stats.mean_block_tokens:.1f} tokens ({stats.mixed_depth_calls} mixing depths)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
