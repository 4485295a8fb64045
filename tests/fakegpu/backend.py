"""`fakenccl`: a process-group backend for fakegpu tensors only, as NCCL is for CUDA tensors only.

Registered with `devices=["fakegpu"]`, so `Backend.default_device_backend_map["fakegpu"]` names
it and a trainer computing on the fake device starts its process groups on it (megatron's groups,
made with `backend=None`, inherit it). Every collective first refuses any tensor that is not on
fakegpu, with one line, as NCCL refuses host tensors; the data then travel through an inner gloo
group on host copies, asynchronously, and results land on the device when the work is waited on
(`dist.all_reduce(t)` waits itself). A result read without `wait()` is stale, as on a GPU it would
be a race, and send/recv never block each other (1F1B schedules post both before waiting).

`MOR_FAKE_GPU_LOG=DIR` makes each process write the collectives it ran (name -> count) to
`DIR/rank<RANK>-<pid>.json` at exit, so tests can check which paths a run reached.
"""

from __future__ import annotations

import atexit
import collections
import json
import os

import torch
import torch.distributed as dist
from torch.futures import Future

NAME = "fakenccl"
DEVICE_TYPE = "fakegpu"
_calls: collections.Counter = collections.Counter()


class FakeNcclError(RuntimeError):
    """A tensor not on the fake device was handed to a collective of a fakegpu group."""


def _check(op: str, tensors) -> None:
    _calls[op] += 1
    for tensor in tensors:
        if tensor.device.type != DEVICE_TYPE:
            raise FakeNcclError(
                f"{NAME} {op}: Tensors must be {DEVICE_TYPE} tensors, as NCCL's must be CUDA tensors "
                f"(got a {tensor.device} tensor of shape {tuple(tensor.shape)}): a host tensor in a collective "
                "of a GPU process group"
            )


class _Work(dist._Work):
    """Done on `wait()`: waits for gloo's works, then copies the host results onto the device."""

    def __init__(self, works, pairs=(), result=None):
        super().__init__()
        self._works, self._pairs, self._result, self._done = list(works), list(pairs), result, False

    def wait(self, timeout=None) -> bool:
        if not self._done:
            for work in self._works:
                work.wait()
            with torch.no_grad():  # as NCCL writes a buffer: receive buffers may require grad
                for device, host in self._pairs:
                    device.copy_(host)
            self._done = True
        return True

    def is_completed(self) -> bool:  # a poll that finds gloo done completes the work
        if not self._done and all(work.is_completed() for work in self._works):
            self.wait()
        return self._done

    def is_success(self) -> bool:
        return True

    def exception(self):
        return None

    def get_future(self) -> Future:
        self.wait()
        future = Future()
        future.set_result(self._result)
        return future


def _host(tensors):
    return [t.detach().cpu().contiguous() for t in tensors]  # gloo takes dense host tensors


class FakeNcclGroup(dist.ProcessGroup):
    """A ProcessGroup whose collectives take fakegpu tensors and run through gloo on host copies."""

    def __init__(self, store, rank: int, size: int, timeout) -> None:
        super().__init__(rank, size)
        self._gloo = dist.ProcessGroupGloo(store, rank, size, timeout)

    def getBackendName(self) -> str:
        return NAME

    @property
    def _device_types(self):  # object collectives (broadcast_object_list, ...) pick their device here
        return [torch.device(DEVICE_TYPE)]

    # each collective: check, copy to host, run on gloo, copy the outputs back on wait()
    def _run(self, op, inputs, outputs, start):
        _check(op, [*inputs, *outputs])
        host_in, host_out = _host(inputs), _host(outputs)
        works = start(host_in, host_out)
        return _Work(works if isinstance(works, list) else [works], zip(outputs, host_out), outputs)

    def allreduce(self, tensors, opts):
        return self._run("allreduce", [], tensors, lambda i, o: self._gloo.allreduce(o, opts))

    def allreduce_coalesced(self, tensors, opts):
        return self._run("allreduce_coalesced", [], tensors, lambda i, o: self._gloo.allreduce_coalesced(o, opts))

    def broadcast(self, tensors, opts):
        return self._run("broadcast", [], tensors, lambda i, o: self._gloo.broadcast(o, opts))

    def reduce(self, tensors, opts):
        return self._run("reduce", [], tensors, lambda i, o: self._gloo.reduce(o, opts))

    def allgather(self, output_lists, inputs, opts):
        flat = [t for outputs in output_lists for t in outputs]
        sizes = [len(outputs) for outputs in output_lists]

        def start(host_in, host_out):
            nested, at = [], 0
            for n in sizes:
                nested.append(host_out[at:at + n])
                at += n
            return self._gloo.allgather(nested, host_in, opts)

        return self._run("allgather", inputs, flat, start)

    def all_gather_single(self, output, input, opts):  # all_gather_into_tensor
        return self._run("all_gather_single", [input], [output],
                         lambda i, o: self._gloo._allgather_base(o[0], i[0], opts))

    def all_gather_single_coalesced(self, outputs, inputs, opts):
        return self._run("all_gather_single_coalesced", inputs, outputs, lambda i, o: [
            self._gloo._allgather_base(out, inp, opts) for out, inp in zip(o, i)])

    def reduce_scatter(self, outputs, input_lists, opts):
        flat = [t for inputs in input_lists for t in inputs]
        n = len(input_lists[0]) if input_lists else 0

        def start(host_in, host_out):
            nested = [host_in[k * n:(k + 1) * n] for k in range(len(input_lists))]
            return self._gloo.reduce_scatter(host_out, nested, opts)

        return self._run("reduce_scatter", flat, outputs, start)

    def reduce_scatter_single(self, output, input, opts):  # reduce_scatter_tensor
        return self._run("reduce_scatter_single", [input], [output],
                         lambda i, o: self._gloo._reduce_scatter_base(o[0], i[0], opts))

    def reduce_scatter_single_coalesced(self, outputs, inputs, opts):
        return self._run("reduce_scatter_single_coalesced", inputs, outputs, lambda i, o: [
            self._gloo._reduce_scatter_base(out, inp, opts) for out, inp in zip(o, i)])

    def all_to_all_single(self, output, input, output_splits, input_splits, opts):
        return self._run("all_to_all_single", [input], [output], lambda i, o: self._gloo.alltoall_base(
            o[0], i[0], output_splits, input_splits, opts))

    def gather(self, output_lists, inputs, opts):
        flat = [t for outputs in output_lists for t in outputs]
        return self._run("gather", inputs, flat, lambda i, o: self._gloo.gather([o] if o else [], i, opts))

    def scatter(self, outputs, input_lists, opts):
        flat = [t for inputs in input_lists for t in inputs]
        return self._run("scatter", flat, outputs, lambda i, o: self._gloo.scatter(o, [i] if i else [], opts))

    def send(self, tensors, dst: int, tag: int):
        return self._run("send", tensors, [], lambda i, o: self._gloo.send(i, dst, tag))

    def recv(self, tensors, src: int, tag: int):
        return self._run("recv", [], tensors, lambda i, o: self._gloo.recv(o, src, tag))

    def alltoall(self, outputs, inputs, opts):
        return self._run("alltoall", inputs, outputs, lambda i, o: self._gloo.alltoall(o, i, opts))

    def barrier(self, opts=None):
        _calls["barrier"] += 1
        return _Work([self._gloo.barrier(dist.BarrierOptions())])

    # the names these had before torch 2.13 (still called by some code)
    _allgather_base, allgather_into_tensor_coalesced = all_gather_single, all_gather_single_coalesced
    _reduce_scatter_base, reduce_scatter_tensor_coalesced = reduce_scatter_single, reduce_scatter_single_coalesced
    alltoall_base = all_to_all_single


def register() -> None:
    """Make `fakenccl` the backend of the fakegpu device (and only of it)."""
    if NAME.upper() not in dist.Backend._plugins:
        dist.Backend.register_backend(NAME, FakeNcclGroup, devices=[DEVICE_TYPE])
        log_dir = os.environ.get("MOR_FAKE_GPU_LOG")
        if log_dir:
            atexit.register(_write_log, log_dir)


def _write_log(log_dir: str) -> None:
    if _calls:
        path = os.path.join(log_dir, f"rank{os.environ.get('RANK', '0')}-{os.getpid()}.json")
        with open(path, "w") as out:
            json.dump(dict(_calls), out)
