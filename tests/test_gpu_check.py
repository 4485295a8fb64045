"""`tools/gpu_check.py`: its dry run (every step at toy sizes on CPU, through the real tools) and
the parsers that read the tools' output, so the GPU check cannot rot before a GPU is at hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mor_megatron import processes
from mor_megatron.tools import gpu_check
from mor_megatron.tools.gpu_check_steps import bench_train_figures

REPO = Path(__file__).resolve().parent.parent


def _fake_wheel(directory: Path) -> Path:
    """A minimal pure-Python wheel, to rehearse the offline install of `--wheels`."""
    wheel = directory / "gpu_check_probe-1.0-py3-none-any.whl"
    info = "gpu_check_probe-1.0.dist-info"
    files = {
        "gpu_check_probe/__init__.py": "VALUE = 1\n",
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: gpu-check-probe\nVersion: 1.0\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return wheel


@pytest.mark.distributed  # step c launches torchrun with 2 gloo processes
def test_dry_run_passes_every_step_and_reports_agree(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _fake_wheel(wheels)
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, OUT=str(out))  # --out defaults to $OUT
    proc = subprocess.run(
        [sys.executable, "tools/gpu_check.py", "--dry-run", "--work", str(work), "--wheels", str(wheels)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    report = json.loads((out / "gpu_check.json").read_text())
    markdown = (out / "gpu_check.md").read_text()
    steps = report["steps"]
    assert list(steps) == list("abcdefgh"), proc.stdout[-3000:] + proc.stderr[-3000:]
    for key, step in steps.items():
        assert step["status"] in ("passed", "skipped"), (key, step["reason"], step["tail"])
        if step["status"] == "skipped":
            assert step["reason"], key
        assert (out / step["log"]).is_file() and step["tail"], key
        row = next(line for line in markdown.splitlines() if line.startswith(f"| {key} | "))
        assert f"| {step['status']} | {step['seconds']:.1f} |" in row, (row, step)
        assert f"## {key}. {step['title']}: {step['status']}" in markdown
    assert proc.returncode == 0, proc.stderr[-3000:]
    for finding in report["findings"]:
        assert f"- {finding}" in markdown
    assert f"{gpu_check.TAG} a. " in proc.stdout and f"{gpu_check.TAG} done in" in proc.stdout

    # the CUDA-only parts skip with their reason; everything else ran and agreed
    assert steps["a"]["status"] == "skipped" and "needs a CUDA device" in steps["a"]["reason"]
    assert steps["b"]["figures"]["bit_exact"] and steps["b"]["figures"]["loss_resumed"]
    assert {name: r["status"] for name, r in steps["c"]["figures"]["layouts"].items()} == {"dp2": "passed", "tp2": "passed"}
    assert steps["d"]["figures"]["all_equal"] and len(steps["d"]["figures"]["prompts"]) == len(gpu_check.PROMPTS)
    assert {"vanilla L=8", "mor nr=2", "mor tc nr=2"} <= set(steps["e"]["figures"]["models"])
    token_choice = steps["e"]["figures"]["ratios"]["MoR-TC-2 / vanilla L=8 tokens/s"]
    assert token_choice["time_over_flops"] > 0 and token_choice["padding_overhead"] >= 0
    decode = steps["f"]["figures"]
    assert {"vanilla", "MoR-2", "MoR-3"} <= set(decode["L8"]["max_batch"]) and "MoR-4" in decode["L10"]["max_batch"]
    assert {"vanilla", "MoR-2", "MoR-3"} == set(decode["L8"]["static_eager"])  # the static tick's lines
    assert decode["L10"]["vs_transformers"]["equal_greedy_tokens_pct"] == 100.0
    assert steps["g"]["figures"]["tests"]["counts"]["passed"] > 0 and steps["g"]["figures"]["bench"]
    # h: the compiled bench, model-only and through mor-pretrain, every job with compiled layers
    compiled = steps["h"]["figures"]["compiled_layers"]
    assert {"vanilla L=8 [compiled]", "mor nr=2 [trainer, compiled]"} <= set(compiled), compiled
    assert all(count > 0 for count in compiled.values()), compiled
    assert set(steps["h"]["figures"]["trainer_vs_model_only"]) == {
        "vanilla L=8 [trainer, compiled]", "mor nr=2 [trainer, compiled]"}

    # the wheel folder was installed offline and the steps saw it
    assert report["install"]["installed"] == ["gpu-check-probe 1.0"]
    assert report["environment"]["packages"]["gpu-check-probe"] == "1.0"


def test_gloo_refusals_name_the_collective():
    logs = {
        "RuntimeError: no support for _allgather_base in Gloo process group": "_allgather_base",
        "RuntimeError: ProcessGroupGloo::reduce_scatter: unsupported device type cuda": "reduce_scatter",
        "RuntimeError: Tensors must be CUDA and dense ... all_to_all is not supported with the gloo backend": "all_to_all",
    }
    for line, op in logs.items():
        found = gpu_check.gloo_limitation(f"step 1\n{line}\n")
        assert found and found.startswith(f"{op}: "), (line, found)
    assert gpu_check.gloo_limitation("RuntimeError: CUDA out of memory") is None


def test_parsers_read_the_tools_output():
    pytest_out = ("sss.\nSKIPPED [3] tests/test_x.py:5: needs a CUDA device\nFAILED tests/test_y.py::test_z - x\n"
                  "1 failed, 1 passed, 3 skipped, 9 deselected in 1.00s\n")
    parsed = gpu_check.parse_pytest(pytest_out)
    assert parsed["counts"] == {"failed": 1, "passed": 1, "skipped": 3, "deselected": 9}
    assert parsed["failed"] == ["tests/test_y.py::test_z"] and parsed["skip_reasons"] == ["tests/test_x.py:5: needs a CUDA device"]

    decode_out = (
        "max batch in 60000 MiB\n"
        "model     batch     tok/s vs vanilla  KV/row KiB  peak KV MiB vs vanilla block toks layers/tok vanilla/this\n"
        "vanilla     128    2247.0      1.00x     13312.0       12.000     1.000x      128.0      32.00        1.00x\n"
        "MoR-4       128    3385.0      1.51x      9000.0        8.000     0.679x      100.0      21.00        1.52x\n"
        "\nvanilla, batch 32: our engine 1188.0 tok/s, transformers generate() with a static cache 800.0 tok/s: "
        "1.49x; equal greedy tokens 100.0%\n"
    )
    tables = gpu_check.parse_bench_decode(decode_out)
    assert tables["max_batch"]["MoR-4"] == {"batch": 128, "tokens_per_s": 3385.0, "vs_vanilla": 1.51,
                                            "kv_row_kib": 9000.0, "layers_per_token": 21.0, "compute_ratio": 1.52}
    assert tables["vs_transformers"]["ratio"] == 1.49
    assert gpu_check.decode_findings({"L34": tables}) == [
        "decode MoR-4 at the max batch (128): 1.51x vanilla tokens/s, target >= 2.06x"]

    kernels_out = "S=2048 B=8 D=960 k=1024             0.100      0.300      0.050      0.120   2.00   2.50     3000\n"
    assert gpu_check.parse_bench_kernels(kernels_out)[0]["fwd_speedup"] == 2.0
    assert gpu_check.chip_peak_tflops("NVIDIA H200") == 989.0 and gpu_check.chip_peak_tflops(None) is None
    assert gpu_check.resume_tolerance(6.0, cuda=True) == pytest.approx(6.0 / 256) and gpu_check.resume_tolerance(6.0, cuda=False) == 0.0


def test_bench_train_findings_name_each_missed_target():
    """Step e/h figures: a trainer slower than its model-only loop beyond the target and a bench
    note are findings; met targets are not."""
    def row(name, paired):
        return {"trainer": f"{name} [trainer, compiled]", "paired_ratio": paired, "step_time_ratio": 9.0}

    record = {"tokens_per_s": 1.0, "step_time_s": 1.0, "peak_memory_bytes": 2**30, "achieved_tflops": 500.0,
              "fraction_of_probe": 0.5}
    report = {
        "device": "NVIDIA H200", "notes": ["compiled trainer unavailable: no training.compile"],
        "settings": {"dtype": "bfloat16", "batch_size": 2, "seq_length": 2048, "steps": 3, "warmup": 2,
                     "hidden_size": 960, "effective_layers": 32},
        "probe": {"samples_tflops": [700.0]},
        "models": {"vanilla L=32 [compiled]": record, "mor nr=2 [compiled]": record},
        "comparisons": {
            "mor_vs_vanilla": [{"num_recursions": 2, "vanilla": "vanilla L=32 [compiled]", "step_time_ratio": 0.7,
                                "flops_ratio": 0.6, "memory_ratio": 0.8}],
            "trainer_overhead": [row("vanilla L=32", 1.01), row("mor nr=2", 1.05)],
        },
    }
    figures, findings = bench_train_figures(report, peak=989.0)
    assert figures["trainer_vs_model_only"]["mor nr=2 [trainer, compiled]"] == {
        "vs_model_only": 1.05, "target": 1.03, "met": False}
    assert figures["trainer_vs_model_only"]["vanilla L=32 [trainer, compiled]"]["met"] is True
    # MoR-2 at 1/0.7 = 1.43x (target 1.23x) and vanilla MFU 500/989 (target 40%) are met
    assert findings == [
        "bench_train: compiled trainer unavailable: no training.compile",
        "mor nr=2 [trainer, compiled]: step 1.050x the model-only step, target <= 1.03x",
    ]


def test_a_step_past_its_limit_is_killed_with_every_process_it_started(tmp_path):
    """A hang costs only its own step: the command, and a grandchild in a session of its own (as
    torchrun starts its workers), are killed at the deadline; the output so far is kept."""
    import argparse
    import time

    args = argparse.Namespace(dry_run=True)
    ctx = gpu_check.Context(args, tmp_path, tmp_path, dict(os.environ))
    ctx.log = tmp_path / "step.log"
    pid_file = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time\n"
            "child = subprocess.Popen(['sleep', '60'], start_new_session=True)\n"
            f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
            "print('started', flush=True)\n"
            "time.sleep(60)\n")
    ctx.deadline = time.monotonic() + 3
    with pytest.raises(gpu_check.StepTimeout) as err:
        ctx.run([sys.executable, "-c", code], what="a hang")
    assert "started" in err.value.output and "killed at the step limit" in ctx.log.read_text()
    grandchild = int(pid_file.read_text())
    for _ in range(50):
        if not processes.alive(grandchild):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"grandchild {grandchild} still runs")
