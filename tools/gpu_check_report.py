"""The results of `tools/gpu_check.py`: gpu_check.json and its markdown rendering gpu_check.md."""

from __future__ import annotations

import datetime
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any


class Report:
    """gpu_check.json and gpu_check.md, rewritten whole after every change."""

    def __init__(self, out: Path, dry: bool, budget: float) -> None:
        self.out = out
        self.data: dict[str, Any] = {
            "mode": "dry-run (CPU, toy sizes)" if dry else "GPU",
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "updated": None, "budget_s": budget, "command": shlex.join([sys.executable, *sys.argv]),
            "install": None, "environment": {}, "steps": {}, "findings": [],
        }

    def write(self) -> None:
        self.data["updated"] = datetime.datetime.now().isoformat(timespec="seconds")
        self.data["findings"] = [f"{key}: {finding}" for key, step in self.data["steps"].items()
                                 for finding in step.get("findings", [])]
        for name, text in (("gpu_check.json", json.dumps(self.data, indent=2, default=str)),
                           ("gpu_check.md", render_markdown(self.data))):
            tmp = self.out / (name + ".tmp")
            tmp.write_text(text + "\n", encoding="utf-8")
            os.replace(tmp, self.out / name)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _is_table(value: Any) -> bool:
    """A dict of flat dicts (models -> their figures): shown as a markdown table."""
    return (isinstance(value, dict) and bool(value) and all(
        isinstance(row, dict) and row and not any(isinstance(v, (dict, list)) for v in row.values())
        for row in value.values()))


def _table_lines(value: dict[str, dict[str, Any]], indent: str) -> list[str]:
    columns = list(dict.fromkeys(column for row in value.values() for column in row))
    lines = ["", f"{indent}| | " + " | ".join(columns) + " |", indent + "|---" * (len(columns) + 1) + "|"]
    for name, row in value.items():
        lines.append(f"{indent}| {name} | " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    return lines + [""]


def _figure_lines(figures: Any, indent: str = "") -> list[str]:
    lines = []
    for key, value in figures.items():
        if _is_table(value):
            lines.append(f"{indent}- {key}:")
            lines += _table_lines(value, indent + "  ")
        elif isinstance(value, dict):
            lines.append(f"{indent}- {key}:")
            lines += _figure_lines(value, indent + "  ")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            lines.append(f"{indent}- {key}:")
            for item in value:
                lines.append(f"{indent}  - " + ", ".join(f"{k} {_fmt(v)}" for k, v in item.items()))
        else:
            lines.append(f"{indent}- {key}: {_fmt(value)}")
    return lines


def render_markdown(data: dict[str, Any]) -> str:
    env = data["environment"]
    lines = [f"# GPU check ({data['mode']})", "",
             f"Started {data['started']}, updated {data['updated']}; budget {data['budget_s']:.0f} s.",
             f"Command: `{data['command']}`", ""]
    if data["mode"].startswith("dry-run"):
        lines += ["Dry run: toy sizes on CPU, to keep the check from rotting; its performance figures and "
                  "target findings say nothing about a GPU.", ""]
    lines += ["## Environment", ""]
    for key in ("python", "torch", "cuda", "gpu", "gpu_memory_gib", "capability", "driver", "nccl"):
        if env.get(key) is not None:
            lines.append(f"- {key}: {env[key]}")
    packages = env.get("packages") or {}
    if packages:
        lines.append("- packages: " + ", ".join(f"{k} {v}" for k, v in packages.items() if v))
    if data.get("install"):
        install = data["install"]
        lines.append(f"- wheels ({install['method']}): installed {', '.join(install['installed']) or 'none'}; "
                     f"kept the host's {', '.join(install['kept']) or 'none'}")
    lines += ["", "## Steps", "", "| step | what | status | seconds | reason |", "|---|---|---|---|---|"]
    for key, step in data["steps"].items():
        reason = (step.get("reason") or "").replace("|", "/").replace("\n", " ")
        lines.append(f"| {key} | {step['title']} | {step['status']} | {step['seconds']:.1f} | {reason} |")
    lines += ["", "## Findings", ""] + ([f"- {f}" for f in data["findings"]] or ["- none"])
    for key, step in data["steps"].items():
        lines += ["", f"## {key}. {step['title']}: {step['status']}", "", f"Log: `{step['log']}`", ""]
        lines += _figure_lines(step.get("figures") or {})
        if step.get("tail"):
            lines += ["", "```", step["tail"], "```"]
    return "\n".join(lines)
