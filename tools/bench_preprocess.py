"""Preprocessing throughput and memory: `tools/preprocess_data.py` against the `tokenizers`
library's own `encode_batch` on the same documents with the same worker count.

    python tools/bench_preprocess.py                       # defaults: 2 workers, 3 repeats
    python tools/bench_preprocess.py --workers 16 --repeats 5

1. The tokenizer is the quickstart's: the tool itself trains it, as `launch/quickstart.sh` does
   (`--input stdlib --train-tokenizer --vocab-size 4096`), into a temporary directory (no hub).
2. Throughput, `--repeats` rounds in round-robin order: the tool as a user runs it (a fresh
   process, `--input stdlib --tokenizer DIR --workers N`, timed from launch to exit: interpreter
   start, imports, reading, tokenizing and writing the shards), then a fresh process that reads
   the same documents first and times only `Tokenizer.encode_batch(docs)` over all of them at once
   (RAYON_NUM_THREADS=N), then the same for `encode_batch_fast` (no character offsets; what the
   tool calls where tokenizers has it; for information). Tokens are the documents'
   own (no EOS); the tool's count must equal encode_batch's. Target: tool >= 0.8x encode_batch,
   from the medians; the paired per-round ratios give the spread.
3. Memory: the tool on the embedded corpus written as jsonl, and on that file repeated
   `--scale` times (both in the temporary directory): peak RSS of the tool process (ru_maxrss
   from wait4; the tool tokenizes on threads, so it has no worker processes to add). Target:
   the larger run's peak within 1.3x of the smaller's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

TOOL = Path(__file__).resolve().parent / "preprocess_data.py"
QUICKSTART_VOCAB = 4096  # launch/quickstart.sh's VOCAB_SIZE
THROUGHPUT_TARGET = 0.8
ENCODE_METHODS = ("encode_batch", "encode_batch_fast")
MEMORY_TARGET = 1.3


def build_parser() -> argparse.ArgumentParser:
    from mor_megatron.cli import ToolParser, positive_int, ranged
    from mor_megatron.ranges import Range

    p = ToolParser(prog="bench_preprocess.py", description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=positive_int, default=2, help="tool --workers and encode_batch threads")
    p.add_argument("--repeats", type=positive_int, default=3, help="round-robin rounds of tool and encode_batch")
    p.add_argument("--vocab-size", type=positive_int, default=QUICKSTART_VOCAB, help="trained tokenizer's vocab")
    p.add_argument("--scale", type=ranged(Range(2, integer=True)), default=4, help="memory run: the corpus repeated this many times")
    p.add_argument("--max-documents", type=positive_int, help="embedded corpus cap (quick runs)")
    p.add_argument("--skip-memory", action="store_true", help="throughput only")
    p.add_argument("--child-encode", metavar="TOKENIZER_DIR", help=argparse.SUPPRESS)
    p.add_argument("--child-method", choices=ENCODE_METHODS, help=argparse.SUPPRESS)
    return p


def _stdlib_texts(max_documents: Optional[int]) -> list[str]:
    from mor_megatron.data.corpus import stdlib_documents

    return [d["text"] for d in stdlib_documents(max_documents=max_documents)]


def _cpu_seconds(who: int = resource.RUSAGE_SELF) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def child_encode(tokenizer_dir: str, max_documents: Optional[int], methods: Sequence[str]) -> None:
    """The baseline, in its own process (a cold tokenizer cache, as the tool has): documents read
    first, then only the `encode_batch` call is timed."""
    from tokenizers import Tokenizer

    texts = _stdlib_texts(max_documents)
    tok = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
    out = {}
    for name in methods:
        start, cpu = time.perf_counter(), _cpu_seconds()
        encodings = getattr(tok, name)(texts, add_special_tokens=False)
        out[name] = time.perf_counter() - start
        out[f"{name}_cpu"] = _cpu_seconds() - cpu  # all threads of this process
        out[f"{name}_tokens"] = sum(len(e.ids) for e in encodings)
        del encodings
    print(json.dumps(out))


def run_tool(args: list[str], env: dict) -> tuple[float, float, int, dict]:
    """(wall seconds, CPU seconds, peak RSS KiB of the tool process, its meta.json)."""
    prefix = args[args.index("--output-prefix") + 1]
    start = time.perf_counter()
    # every round rewrites the same prefix on purpose
    proc = subprocess.Popen([sys.executable, str(TOOL), *args, "--no-progress", "--overwrite"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not all children's
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"error: preprocess_data.py failed ({proc.returncode}): {err.strip()[-500:]}")
    meta = json.loads(Path(f"{prefix}_meta.json").read_text())
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss, meta


def content_tokens(meta: dict) -> int:
    """Tokens of the documents themselves: the shards' tokens less one EOS per document."""
    return sum(meta["tokens"].values()) - sum(meta["documents"].values())


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.3f}  min {min(values):.3f}  max {max(values):.3f}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark; print its figures. Returns 0 (the targets are reported, not enforced)."""
    args = build_parser().parse_args(argv)
    if args.child_encode:
        child_encode(args.child_encode, args.max_documents,
                     [args.child_method] if args.child_method else ENCODE_METHODS)
        return 0
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cap = [] if args.max_documents is None else ["--max-documents", str(args.max_documents)]
    workers = ["--workers", str(args.workers)]
    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        root = Path(tmp)
        env["HF_DATASETS_CACHE"] = str(root / "hf")
        tok_dir = str(root / "tokenizer")
        seconds, _, _, meta = run_tool(["--input", "stdlib", "--output-prefix", str(root / "train" / "std"),
                                     "--train-tokenizer", "--vocab-size", str(args.vocab_size),
                                     "--tokenizer-output", tok_dir, *workers, *cap], env)
        print(f"tokenizer: quickstart's byte-level BPE (vocab {meta['vocab_size']}), trained by the tool "
              f"with --train-tokenizer in {seconds:.1f} s (training + tokenizing, untimed below)")
        print(f"corpus: embedded stdlib, {sum(meta['documents'].values()):,} documents; "
              f"workers {args.workers}; {args.repeats} rounds, round-robin")

        tool_tps, base_tps, fast_tps, ratios, cpu_ratios = [], [], [], [], []
        child = [sys.executable, __file__, "--child-encode", tok_dir, *cap]
        child_env = dict(env, RAYON_NUM_THREADS=str(args.workers),
                         TOKENIZERS_PARALLELISM="true" if args.workers > 1 else "false")
        for r in range(args.repeats):
            seconds, cpu, _, meta = run_tool(["--input", "stdlib", "--output-prefix", str(root / "t" / "s"),
                                              "--tokenizer", tok_dir, *workers, *cap], env)
            tokens = content_tokens(meta)
            base = {}
            for method in ENCODE_METHODS:  # each in a fresh process: no warm tokenizer cache
                out = subprocess.run([*child, "--child-method", method], env=child_env,
                                     capture_output=True, text=True, check=True)
                base.update(json.loads(out.stdout.strip().splitlines()[-1]))
            if base["encode_batch_tokens"] != tokens:
                raise SystemExit(f"error: the tool wrote {tokens} tokens, encode_batch gave "
                                 f"{base['encode_batch_tokens']}")
            tool_tps.append(tokens / seconds / 1e6)
            base_tps.append(tokens / base["encode_batch"] / 1e6)
            fast_tps.append(tokens / base["encode_batch_fast"] / 1e6)
            ratios.append(tool_tps[-1] / base_tps[-1])
            cpu_ratios.append(base["encode_batch_cpu"] / cpu)
            print(f"round {r + 1}: tool {seconds:.2f} s ({tool_tps[-1]:.3f} M tok/s, cpu {cpu:.1f} s)  "
                  f"encode_batch {base['encode_batch']:.2f} s ({base_tps[-1]:.3f} M tok/s, cpu "
                  f"{base['encode_batch_cpu']:.1f} s)  encode_batch_fast {base['encode_batch_fast']:.2f} s "
                  f"(cpu {base['encode_batch_fast_cpu']:.1f} s)  ratio {ratios[-1]:.3f}")
        ratio = statistics.median(tool_tps) / statistics.median(base_tps)
        print(f"tokens per run: {tokens:,} (tool == encode_batch)")
        print(f"tool M tok/s:              {spread(tool_tps)}")
        print(f"encode_batch M tok/s:      {spread(base_tps)}")
        print(f"encode_batch_fast M tok/s: {spread(fast_tps)}")
        print(f"paired per-round ratio tool / encode_batch: {spread(ratios)}")
        print(f"CPU-time ratio encode_batch / whole tool process (load-insensitive): {spread(cpu_ratios)}")
        print(f"throughput: tool / encode_batch = {ratio:.3f} from the medians (target >= "
              f"{THROUGHPUT_TARGET}: {'holds' if ratio >= THROUGHPUT_TARGET else 'MISSED'}); "
              f"tool / encode_batch_fast = {statistics.median(tool_tps) / statistics.median(fast_tps):.3f}")

        if not args.skip_memory:
            from mor_megatron.data.corpus import write_stdlib_jsonl

            one = root / "x1.jsonl"
            write_stdlib_jsonl(str(one), max_documents=args.max_documents)
            many = root / f"x{args.scale}.jsonl"
            with open(many, "wb") as f:
                for _ in range(args.scale):
                    f.write(one.read_bytes())
            peaks = {}
            for path in (one, many):
                seconds, _, peaks[path], meta = run_tool(
                    ["--input", str(path), "--output-prefix", str(root / path.stem / "m"), "--tokenizer",
                     tok_dir, *workers, "--cache-dir", str(root / "hf")], env)
                print(f"memory: {path.name} ({path.stat().st_size / 2**20:.0f} MiB, {content_tokens(meta):,} "
                      f"tokens) peak RSS {peaks[path] / 1024:.0f} MiB, {seconds:.1f} s")
            mem = peaks[many] / peaks[one]
            print(f"memory: peak RSS x{args.scale} / x1 = {mem:.3f} (tool process; target <= "
                  f"{MEMORY_TARGET}: {'holds' if mem <= MEMORY_TARGET else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
