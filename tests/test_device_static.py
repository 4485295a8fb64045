"""Static check: library code never creates a tensor on an implicit device.

`mor_megatron.device` owns the answer to "where does this process compute"; a tensor factory
called without `device=` lands on torch's default device (the host), which on a GPU run means a
host tensor met by a CUDA one (an error, or a silent copy and sync) or handed to an NCCL
collective (refused). So every factory call in `mor_megatron/` and `kernels/` must either name
its device (`device=compute_device()`, `device=x.device`, ...) or say why it belongs on the host
with a `# host: <reason>` comment on one of the call's lines. Pure AST: nothing is imported.

What counts as a factory (`FACTORIES`): the calls that make a new tensor (or generator) from
sizes or Python data, on the default device unless told otherwise. Not in the list:
- `torch.*_like` and tensor methods (`x.new_zeros`, `x.new_tensor`): they take their input's
  device;
- `torch.from_numpy`: always the host, and says so by its name (it has no `device=` at all);
- `torch.normal` and other ops that take tensors: their device is their inputs'.
`torch.as_tensor` / `torch.asarray` are in: from a tensor they keep its device, but from a list
or a NumPy array they build a host tensor, and the scanner cannot tell which it is looking at;
`device=` is free where the input is already there. `torch.Generator` is in: a host generator
handed to `torch.multinomial` / `randint` on CUDA tensors is refused at run time.

A call passes when it has a `device=` keyword other than a literal `None` (a forwarded
`**kwargs` counts: it may carry one), or, for `torch.Generator(dev)` and
`torch.as_tensor(data, dtype, dev)`, the positional device. A literal host device
(`device="cpu"`, `device=torch.device("cpu")`) is a host tensor and needs the marker too.
"""

from __future__ import annotations

import ast
import io
import re
import sys
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("mor_megatron", "kernels")

FACTORIES = frozenset({
    "tensor", "as_tensor", "asarray", "scalar_tensor",
    "zeros", "ones", "empty", "full", "empty_strided",
    "arange", "range", "linspace", "logspace", "eye",
    "rand", "randn", "randint", "randperm",
    "tril_indices", "triu_indices",
    "Generator",
    # legacy constructors (host tensors of a dtype)
    "Tensor", "FloatTensor", "DoubleTensor", "HalfTensor", "BFloat16Tensor", "LongTensor",
    "IntTensor", "ShortTensor", "CharTensor", "ByteTensor", "BoolTensor",
})
# factories whose device may also be given positionally: name -> index of that argument
POSITIONAL_DEVICE = {"Generator": 0, "as_tensor": 2}

MARKER = re.compile(r"#\s*host:(.*)$")
ADVICE = "(add device=... or '# host: reason')"


def _comments(source: str) -> dict[int, str]:
    """Line -> the comment on it."""
    found = {}
    try:
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.COMMENT:
                found[token.start[0]] = token.string
    except (tokenize.TokenError, SyntaxError):
        pass
    return found


class _Names(ast.NodeVisitor):
    """The names under which this file reaches torch and its factories."""

    def __init__(self) -> None:
        self.modules: set[str] = set()  # names bound to the torch module
        self.factories: dict[str, str] = {}  # local name -> factory (from-imports, aliases)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name == "torch" or (alias.asname is None and alias.name.startswith("torch.")):
                self.modules.add(alias.asname or "torch")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module == "torch" and node.level == 0:
            for alias in node.names:
                if alias.name in FACTORIES:
                    self.factories[alias.asname or alias.name] = alias.name

    def factory_of(self, node: ast.AST):
        """The factory an expression names (`torch.zeros`, an imported or aliased name), or None."""
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id in self.modules and node.attr in FACTORIES:
                return node.attr
        if isinstance(node, ast.Name):
            return self.factories.get(node.id)
        return None


def _find_names(tree: ast.AST) -> _Names:
    names = _Names()
    names.visit(tree)
    assignments = [node for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AnnAssign))]
    changed = True
    while changed:  # `zeros = torch.zeros`, `make = zeros`, ...
        changed = False
        for node in assignments:
            if node.value is None:
                continue
            factory = names.factory_of(node.value)
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if factory and isinstance(target, ast.Name) and names.factories.get(target.id) != factory:
                    names.factories[target.id] = factory
                    changed = True
    return names


def _is_none(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value is None


def _is_host_literal(node: ast.AST, names: _Names) -> bool:
    """`"cpu"`, `"cpu:0"` or `torch.device("cpu")` written out."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value.split(":")[0] == "cpu"
    if (
        isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "device"
        and isinstance(node.func.value, ast.Name) and node.func.value.id in names.modules and node.args
    ):
        return _is_host_literal(node.args[0], names)
    return False


def _device_argument(call: ast.Call, factory: str):
    """("given", node) / ("forwarded", None) / ("missing", None)."""
    for keyword in call.keywords:
        if keyword.arg is None:
            return "forwarded", None
        if keyword.arg == "device":
            return ("missing", None) if _is_none(keyword.value) else ("given", keyword.value)
    index = POSITIONAL_DEVICE.get(factory)
    if index is not None and len(call.args) > index and not isinstance(call.args[index], ast.Starred):
        device = call.args[index]
        return ("missing", None) if _is_none(device) else ("given", device)
    if any(isinstance(arg, ast.Starred) for arg in call.args) and index is not None:
        return "forwarded", None
    return "missing", None


def scan_source(source: str, path: str = "<source>") -> list[str]:
    """The offences of one file's source, `path:line: ...` each, in line order."""
    tree = ast.parse(source, filename=path)
    names = _find_names(tree)
    if not names.modules and not names.factories:
        return []
    comments = _comments(source)
    offences = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        factory = names.factory_of(node.func)
        if factory is None:
            continue
        state, device = _device_argument(node, factory)
        host = state == "given" and _is_host_literal(device, names)
        if state != "missing" and not host:
            continue
        markers = [
            MARKER.search(comments[line]) for line in range(node.lineno, (node.end_lineno or node.lineno) + 1)
            if line in comments
        ]
        markers = [m for m in markers if m is not None]
        if any(m.group(1).strip() for m in markers):
            continue
        what = f"torch.{factory}(...)"
        if host:
            message = f"{path}:{node.lineno}: {what} on the host (device={ast.unparse(device)}) without '# host: reason'"
        else:
            message = f"{path}:{node.lineno}: {what} without device= {ADVICE}"
        if markers:
            message += " ['# host:' needs a reason after it]"
        offences.append((node.lineno, node.col_offset, message))
    return [message for _, _, message in sorted(offences)]


def library_files(root: Path = REPO) -> list[Path]:
    return sorted(
        path for top in SCANNED for path in (root / top).rglob("*.py") if "__pycache__" not in path.parts
    )


def scan_tree(root: Path = REPO) -> list[str]:
    offences = []
    for path in library_files(root):
        offences += scan_source(path.read_text(encoding="utf-8"), str(path.relative_to(root)))
    return offences


# -- the check ----------------------------------------------------------------------------------


def test_library_creates_every_tensor_on_a_named_device():
    files = library_files()
    assert len(files) > 20, f"the scan found only {len(files)} files under {SCANNED}: wrong root?"
    offences = scan_tree()
    assert not offences, f"{len(offences)} tensor(s) created without a device:\n" + "\n".join(offences)


# -- the scanner itself -------------------------------------------------------------------------


def _scan(code: str) -> list[str]:
    return scan_source(code.lstrip("\n"), "m.py")


def test_scanner_catches_a_call_without_device():
    found = _scan("import torch\nx = torch.zeros(3, dtype=torch.long)\n")
    assert found == ["m.py:2: torch.zeros(...) without device= (add device=... or '# host: reason')"]


def test_scanner_catches_every_factory_spelling():
    code = """
import torch as th
from torch import arange, tensor as make
ones = th.ones
also = ones
a = th.randn(2)
b = arange(4)
c = make([1, 2])
d = ones(3)
e = also(3)
f = th.Generator()
g = th.as_tensor([1], th.long)
h = th.full((2,), 1, device=None)
"""
    lines = [int(message.split(":")[1]) for message in _scan(code)]
    assert lines == [5, 6, 7, 8, 9, 10, 11, 12]


def test_scanner_accepts_a_device():
    code = """
import torch
def f(x, device, **kwargs):
    a = torch.zeros(3, device=x.device)
    b = torch.arange(4, device=device)
    c = torch.Generator(device)
    d = torch.as_tensor([1], torch.long, device)
    e = torch.empty(2, **kwargs)
    return a, b, c, d, e
"""
    assert _scan(code) == []


def test_scanner_accepts_like_and_tensor_methods():
    code = """
import torch
def f(x):
    return torch.zeros_like(x), torch.full_like(x, 2), x.new_zeros(3), x.new_tensor([1]), torch.ones_like(x)
"""
    assert _scan(code) == []


def test_scanner_accepts_a_host_marker_with_a_reason():
    code = """
import torch
a = torch.tensor([1, 2])  # host: indices for numpy
b = torch.zeros(
    3,
    dtype=torch.long,
)  # host: CPU-side bookkeeping read by Python each tick
"""
    assert _scan(code) == []


def test_scanner_refuses_a_host_marker_without_a_reason():
    found = _scan("import torch\na = torch.tensor([1, 2])  # host:\nb = torch.ones(2)  #host:   \n")
    assert [message.split(":")[1] for message in found] == ["2", "3"]
    assert all("needs a reason" in message for message in found)


def test_scanner_wants_a_marker_for_a_literal_host_device():
    found = _scan('import torch\na = torch.zeros(2, device="cpu")\nb = torch.ones(2, device=torch.device("cpu"))\n'
                  'c = torch.ones(2, device="cpu")  # host: staging buffer for a file\n')
    assert [message.split(":")[1] for message in found] == ["2", "3"]
    assert "on the host" in found[0]


def test_scanner_ignores_files_without_torch():
    assert _scan("def zeros(n):\n    return [0] * n\nx = zeros(3)\n") == []


if __name__ == "__main__":  # the offence list, one a line
    found = scan_tree()
    print("\n".join(found))
    sys.exit(1 if found else 0)
