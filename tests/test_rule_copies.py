"""The self-contained Hugging Face model's copies of the MoR rules match their sources.

`hf/modeling_mor.py` ships without this package, so it carries copies of the functions of
`mor_megatron/model/rules.py` it needs, each under a `# Copied from mor_megatron.model.rules.<name>`
line (as transformers' `utils/check_copies.py`): the same code, without the docstring (the
source's docstring is the documentation; comparing syntax trees ignores formatting and comments). The recursion plan of `hf/configuration_mor.py`
has another shape (a dict of lists) than `sharing.build_plan`: it is checked on every valid
(sharing, depth, recursions) instead.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

from mor_megatron import sharing
from mor_megatron.hf import configuration_mor

MARKER = re.compile(r"^# Copied from (mor_megatron(?:\.\w+)+)\.(\w+)\b")
COPIES = Path(__file__).resolve().parents[1] / "mor_megatron" / "hf" / "modeling_mor.py"
# the rules the HF model applies: each must be a marked copy
REQUIRED = {
    "expert_choice_gate", "threshold_continue", "gated_update", "token_choice_probs",
    "token_choice_depth", "token_choice_gate", "token_choice_runs", "token_choice_combine",
}


def code_of(function: ast.FunctionDef) -> str:
    """The function's syntax tree without its docstring."""
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return ast.dump(ast.FunctionDef(**{**vars(function), "body": body}), include_attributes=False)


def marked_copies(source: str) -> dict[str, tuple[str, ast.FunctionDef]]:
    """name -> (source module, the copy) for every marked function in `source`."""
    functions = {
        node.lineno: node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)
    }
    found = {}
    for number, line in enumerate(source.splitlines(), start=1):
        match = MARKER.match(line)
        if match is None:
            continue
        node = functions.get(number + 1)
        assert node is not None, f"line {number}: a '# Copied from' marker must sit right above a function"
        assert node.name == match.group(2), f"line {number}: marker names {match.group(2)}, function is {node.name}"
        found[node.name] = (match.group(1), node)
    return found


def copy_problems(source: str) -> list[str]:
    """Every marked copy in `source` whose code differs from its source function, one line each."""
    problems = []
    for name, (module, copy) in marked_copies(source).items():
        original = ast.parse(inspect.getsource(getattr(importlib.import_module(module), name))).body[0]
        if code_of(copy) != code_of(original):
            problems.append(f"{name} differs from {module}.{name}")
    return problems


def test_hf_copies_equal_their_sources():
    source = COPIES.read_text()
    assert copy_problems(source) == []
    assert REQUIRED <= set(marked_copies(source)), "every rule the HF model applies is a marked copy"


@pytest.mark.parametrize(
    "old, new", [("decide.detach() >= 0", "decide.detach() > 0"), ("alpha * act(logits)", "act(logits)"),
                 ("argmax", "argmin"), ("h1 + gate", "h1 - gate")],
)
def test_check_catches_an_edited_copy(old, new):
    """The check fails on a copy that drifted (one operator, a dropped factor, another op)."""
    source = COPIES.read_text()
    start = source.index("# Copied from")
    assert old in source[start:]
    assert copy_problems(source[:start] + source[start:].replace(old, new, 1)) != []


def test_hf_recursion_plan_equals_build_plan():
    for strategy in sharing.SHARING_STRATEGIES:
        for layers in range(1, 25):
            for recursions in range(1, 7):
                if sharing.depth_error(strategy, layers, recursions) is not None:
                    continue
                ours = sharing.build_plan(strategy, layers, recursions)
                theirs = configuration_mor.recursion_plan(strategy, layers, recursions)
                for part in ("unrolled", "prefix", "block", "suffix"):
                    assert list(getattr(ours, part)) == list(theirs[part]), (strategy, layers, recursions, part)
