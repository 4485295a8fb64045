"""The device owner (`mor_megatron/device.py`): which device, which backend, where batches go.

The fake-GPU runs of the real trainer are in test_device_faults.py; CUDA-only parts here are
CUDA-marked (they run in `tools/gpu_check.py`, step a).
"""

import pytest
import torch
import torch.distributed as dist

from mor_megatron import device
from mor_megatron.errors import UserError

cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_compute_device_follows_mor_device_and_local_rank(monkeypatch):
    monkeypatch.delenv("MOR_DEVICE", raising=False)
    if not torch.cuda.is_available():
        assert device.compute_device() == torch.device("cpu")
    monkeypatch.setenv("MOR_DEVICE", "cpu")
    assert device.compute_device() == torch.device("cpu")
    for bad in ("gpu", "meta"):  # not a device type; a type with no device module
        monkeypatch.setenv("MOR_DEVICE", bad)
        with pytest.raises(UserError, match=f"MOR_DEVICE={bad} names no device of this torch"):
            device.compute_device()


def test_backend_is_the_compute_devices_own(monkeypatch):
    monkeypatch.setenv("MOR_DEVICE", "cpu")
    monkeypatch.delenv("MOR_DIST_BACKEND", raising=False)
    assert device.process_group_backend() == "gloo"
    monkeypatch.setenv("MOR_DIST_BACKEND", "gloo")
    assert device.process_group_backend() == "gloo"
    monkeypatch.delenv("MOR_DIST_BACKEND")
    monkeypatch.setattr(dist.Backend, "default_device_backend_map", {"cpu": "gloo"})
    monkeypatch.setenv("MOR_DEVICE", "cuda:0")
    with pytest.raises(UserError, match="no torch.distributed backend is registered for device type 'cuda'"):
        device.process_group_backend()


def test_gloo_groups_take_host_tensors(parallel, monkeypatch):
    monkeypatch.setenv("MOR_DEVICE", "cpu")
    assert dist.get_backend() == "gloo"
    assert device.collective_device() == torch.device("cpu")


def test_to_device_on_the_host_keeps_the_tensors(monkeypatch):
    monkeypatch.setenv("MOR_DEVICE", "cpu")
    batch = {"tokens": torch.arange(6).view(2, 3)}  # host: a loader's batch
    moved = device.to_device(batch)
    assert moved["tokens"] is batch["tokens"] and moved is not batch


@cuda
@needs_cuda
def test_to_device_copies_from_pinned_memory_to_the_local_gpu(monkeypatch):
    monkeypatch.delenv("MOR_DEVICE", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    batch = {"tokens": torch.arange(12).view(3, 4), "loss_mask": torch.ones(3, 4)}  # host: a loader's batch
    moved = device.to_device(batch)
    assert all(t.device == torch.device("cuda", 0) for t in moved.values())
    torch.cuda.synchronize()
    assert torch.equal(moved["tokens"].cpu(), batch["tokens"])


@cuda
@needs_cuda
def test_bind_device_refuses_a_local_rank_without_a_gpu(monkeypatch):
    monkeypatch.delenv("MOR_DEVICE", raising=False)
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count()))
    with pytest.raises(UserError, match="only .* GPU\\(s\\) are visible"):
        device.bind_device()
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert device.bind_device() == torch.device("cuda", 0) and torch.cuda.current_device() == 0


@cuda
@needs_cuda
def test_cuda_rng_state_survives_a_checkpoint_round_trip(monkeypatch):
    from mor_megatron.training.checkpoint import _restore_rng, _rng_state

    monkeypatch.delenv("MOR_DEVICE", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    device.bind_device()
    torch.cuda.manual_seed(7)
    saved = _rng_state()
    expected = torch.rand(4, device="cuda")
    torch.rand(100, device="cuda")  # move the generator on
    _restore_rng(saved)
    assert torch.equal(torch.rand(4, device="cuda"), expected)


def test_a_bad_mor_device_is_one_line_from_the_cli(tmp_path):
    import os
    import subprocess
    import sys

    from train_helpers import one_error_line, repo_root

    config = tmp_path / "run.yaml"
    config.write_text("model: {}\n")
    done = subprocess.run([sys.executable, "-m", "mor_megatron.pretrain", "--config", str(config)],
                          capture_output=True, text=True, cwd=repo_root(), timeout=120,
                          env=dict(os.environ, MOR_DEVICE="gpu"))
    one_error_line(done.returncode, done.stdout, done.stderr, "MOR_DEVICE=gpu names no device of this torch")
