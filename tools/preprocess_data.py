"""Tokenize a text corpus into megatron-core shards: PREFIX_train.bin/.idx and PREFIX_valid.bin/.idx.

    python tools/preprocess_data.py --input stdlib --output-prefix data/stdlib \\
        --train-tokenizer --vocab-size 8192 --workers 2

Input: local .jsonl/.json/.parquet/.csv/.txt files (paths, globs or directories), a Hugging Face
hub dataset name (where the hub is reachable; --streaming for large ones), or `stdlib` (the
Python standard library's sources, built in). Bad input exits with code 2 and one line on stderr
naming the problem and the fix (an unexpected failure: code 1); --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    from mor_megatron.cli import ToolParser, positive_int, ranged, seed
    from mor_megatron.ranges import Range

    p = ToolParser(prog="preprocess_data.py", description=__doc__.split("\n\n")[0],
                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help="files, globs or directories; a hub dataset name; or 'stdlib'")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX_train.* and PREFIX_valid.*")
    p.add_argument("--input-format", default="auto", help="auto (by extension), jsonl, parquet, csv or text")
    p.add_argument("--text-key", default="text", help="column holding the document text")
    p.add_argument("--text-sample-by", default="document",
                   help="text files: one document per file (document), paragraph or line")
    tok = p.add_argument_group("tokenizer (pick one)")
    tok.add_argument("--tokenizer", help="AutoTokenizer folder or hub name")
    tok.add_argument("--train-tokenizer", action="store_true", help="train a byte-level BPE on the input")
    tok.add_argument("--vocab-size", type=positive_int, help="vocab size for --train-tokenizer")
    tok.add_argument("--tokenizer-output", help="where to save the trained tokenizer [OUTPUT_DIR/tokenizer]")
    p.add_argument("--validation-fraction", type=ranged(Range(0, 1, high_open=True)), default=0.01, help="documents held out for validation")
    p.add_argument("--seed", type=seed, default=1234, help="seed of the train/validation split")
    p.add_argument("--workers", type=positive_int, default=1, help="tokenizer threads (output is identical for any count)")
    p.add_argument("--chunk-size", type=positive_int, default=256,
                   help="most documents per tokenizer batch (a batch also ends at ~1 MB of text)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the shards (and, with --train-tokenizer, the tokenizer) a previous run left")
    p.add_argument("--streaming", action="store_true", help="stream the input instead of caching it as Arrow")
    p.add_argument("--max-documents", type=positive_int, help="stop after N documents")
    p.add_argument("--max-bytes", type=positive_int, help="stop once N bytes of text were read")
    p.add_argument("--cache-dir", help="datasets cache directory")
    p.add_argument("--hub-config", help="hub dataset configuration name")
    p.add_argument("--split", default="train", help="hub dataset split")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", action="store_true", help="progress bar even when stderr is not a terminal")
    bar.add_argument("--no-progress", action="store_true", help="no progress bar [default: bar on terminals only]")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; return the exit code."""
    args = build_parser().parse_args(argv)
    from mor_megatron.errors import run_cli

    def preprocess() -> None:
        from mor_megatron.data.preprocess import (
            PreprocessConfig,
            check_config,
            check_not_clobbering,
            check_output,
            return_large_buffers_to_os,
            run_preprocess,
        )
        from mor_megatron.data.sources import resolve_inputs

        cfg = PreprocessConfig(
            inputs=list(args.input), output_prefix=args.output_prefix, input_format=args.input_format,
            text_key=args.text_key, tokenizer=args.tokenizer, train_tokenizer=args.train_tokenizer,
            vocab_size=args.vocab_size, tokenizer_output=args.tokenizer_output,
            validation_fraction=args.validation_fraction, seed=args.seed, workers=args.workers,
            chunk_size=max(1, args.chunk_size), streaming=args.streaming,
            max_documents=args.max_documents, max_bytes=args.max_bytes, cache_dir=args.cache_dir,
            text_sample_by=args.text_sample_by, hub_config=args.hub_config, split=args.split,
            progress=True if args.progress else False if args.no_progress else None,
            overwrite=args.overwrite,
        )
        check_config(cfg)
        spec = resolve_inputs(cfg.inputs, cfg.input_format)
        check_output(cfg.output_prefix)
        check_not_clobbering(cfg)
        if argv is None:  # a command-line run: this process only preprocesses (flat peak memory)
            return_large_buffers_to_os()
        summary = run_preprocess(cfg, spec)
        try:
            print("\n".join(summary.lines()), flush=True)
        except BrokenPipeError:  # e.g. piped into `head`
            sys.stdout = None

    try:
        return run_cli(preprocess, debug=args.debug)  # data errors: one line, exit 2
    except KeyboardInterrupt:
        print("error: interrupted; partial output files were removed", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, or a library failing on input we did not foresee
        if args.debug:
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        print(f"error: unexpected {type(exc).__name__}: {first}; fix: rerun with --debug for "
              "the traceback", file=sys.stderr)
        return 1

if __name__ == "__main__":
    sys.exit(main())
