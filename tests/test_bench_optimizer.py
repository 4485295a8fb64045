"""tools/bench_optimizer.py runs end to end at a small shape and prints every variant with its ratio
to the baseline (its figures are the README's, from a full run; nothing is asserted about speed)."""

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import bench_optimizer  # noqa: E402


def test_prints_every_variant_against_its_baseline(parallel, capsys):
    assert bench_optimizer.main(["--repeats", "2", "--recursions", "2", "model.hidden_size=64",
                                 "model.ffn_hidden_size=128"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^model: mor nr=2, ", out, re.M), out
    for variant in ("default (baseline)", "foreach", "fused (the trainer's)", "measure: DeepSpeed's (baseline)",
                    "measure: grad_clip's", "clip: DeepSpeed's", "clip: grad_clip.clip_grad_norm_",
                    "scale pass, then the fused step (baseline)", "the fused step scaling (the trainer's)"):
        assert re.search(rf"^  {re.escape(variant)} +[\d.]+ +[\d.]+ +\d+% +[\d.]+x$", out, re.M), variant
    assert re.search(r"^  default \(baseline\) .* 1\.00x$", out, re.M)
