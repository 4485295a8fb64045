"""Interpreter start hook for test subprocesses: with this folder on PYTHONPATH and
MOR_FAKE_GPU=1, every Python process (torchrun's workers included) has the fake GPU installed
before any project code runs; MOR_DEVICE=fakegpu then makes the trainer compute there.

Python imports only the first `sitecustomize` on sys.path, so one that this file shadows (the
project's venv has none today; a distribution's may exist) is run after ours.
"""

import importlib.util
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))


def _chain_to_shadowed() -> None:
    for entry in sys.path:
        if os.path.abspath(entry or ".") == _here:
            continue
        candidate = os.path.join(entry, "sitecustomize.py")
        if os.path.isfile(candidate):
            spec = importlib.util.spec_from_file_location("_shadowed_sitecustomize", candidate)
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
            return


if os.environ.get("MOR_FAKE_GPU") == "1":
    sys.path.append(os.path.dirname(os.path.dirname(_here)))  # tests/, where the fakegpu package is
    import fakegpu

    fakegpu.install()
    os.environ.setdefault("MOR_DEVICE", "fakegpu")
_chain_to_shadowed()
