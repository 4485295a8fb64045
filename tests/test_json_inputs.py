"""JSON inputs the tools read (`mor_megatron/json_files.read_json`): a missing key, a binary,
malformed, empty or non-object file is one `error:` line naming the file, exit 2, for each tool
that reads one (before: `KeyError`, `AttributeError` or `JSONDecodeError` tracebacks)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DAMAGE = {
    "binary": b"\x80\x81\xff\x00",
    "malformed": b'{"format": 1,',
    "empty": b"",
    "not-an-object": b"[1, 2]",
    "partial": b'{"format": 1, "tag": "step_00000001"}',
}


def _checkpoint_info(tmp_path: Path, text: bytes) -> tuple[str, list[str], Path]:
    step = tmp_path / "step_00000001"
    step.mkdir()
    (step / "meta.json").write_bytes(text)
    return "mor_megatron.tools.checkpoint_info", [str(step)], step / "meta.json"


def _convert_from_hf(tmp_path: Path, text: bytes) -> tuple[str, list[str], Path]:
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_bytes(text)
    argv = ["--hf", str(hf), "--config", str(ROOT / "configs" / "tiny.yaml"), "--output", str(tmp_path / "out")]
    return "mor_megatron.tools.convert_from_hf", argv, hf / "config.json"


def _generate(tmp_path: Path, text: bytes) -> tuple[str, list[str], Path]:
    step = tmp_path / "ckpt" / "step_00000001"
    step.mkdir(parents=True)
    (step / "meta.json").write_bytes(text)
    return "mor_megatron.tools.generate", ["--checkpoint", str(step), "--prompt", "hi"], step / "meta.json"


TOOLS = {"checkpoint_info": _checkpoint_info, "convert_from_hf": _convert_from_hf, "generate": _generate}


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("tool", list(TOOLS))
def test_damaged_json_is_one_line(tool, damage, tmp_path, capsys, parallel):
    module, argv, path = TOOLS[tool](tmp_path, DAMAGE[damage])
    assert importlib.import_module(module).main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and str(path) in err, err
    assert "Traceback" not in err
