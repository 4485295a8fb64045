"""Parameter-sharing strategies: which unique layer each unrolled layer uses (docs/DESIGN.md 2)."""

from __future__ import annotations

from dataclasses import dataclass

SHARING_STRATEGIES = ("cycle", "sequence", "middle_cycle", "middle_sequence", "none")
ROUTABLE_STRATEGIES = ("cycle", "middle_cycle")


@dataclass(frozen=True)
class RecursionPlan:
    """The unrolled depth as unique-layer indices, plus the recursion structure for routing.

    `unrolled[l]` is the unique layer run at effective depth l. For cycle and middle-cycle the
    unrolled list is `prefix + block * num_recursions + suffix`: one recursion step is one pass
    through `block`, and routing happens once per step.
    """

    unrolled: tuple[int, ...]
    prefix: tuple[int, ...]
    block: tuple[int, ...]
    suffix: tuple[int, ...]
    num_recursions: int

    @property
    def num_unique_layers(self) -> int:
        return len(set(self.unrolled))


def nearest_valid_depths(effective_layers: int, num_recursions: int, middle: bool) -> tuple[int, int]:
    """The valid effective depths just below and above `effective_layers` for a strategy."""
    fixed = 2 if middle else 0
    body = effective_layers - fixed
    lower = fixed + num_recursions * max(1, body // num_recursions)
    upper = fixed + num_recursions * max(1, -(-body // num_recursions))
    return lower, upper


def depth_error(sharing: str, effective_layers: int, num_recursions: int) -> str | None:
    """A one-line message when the depth does not split into recursions, else None."""
    middle = sharing.startswith("middle_")
    body = effective_layers - (2 if middle else 0)
    if sharing == "none" or (body > 0 and body % num_recursions == 0):
        return None
    lower, upper = nearest_valid_depths(effective_layers, num_recursions, middle)
    what = "(L-2)" if middle else "L"
    return (
        f"{sharing} sharing needs {what} divisible by num_recursions={num_recursions}, "
        f"but effective_layers={effective_layers}: set effective_layers to {lower} or {upper}"
    )


def build_plan(sharing: str, effective_layers: int, num_recursions: int) -> RecursionPlan:
    """Map each unrolled layer to a unique layer for a validated (sharing, L, Nr)."""
    L, nr = effective_layers, num_recursions
    if sharing == "none":
        layers = tuple(range(L))
        return RecursionPlan(layers, (), layers, (), 1)
    if sharing in ("cycle", "sequence"):
        depth = L // nr
        block = tuple(range(depth))
        if sharing == "cycle":
            return RecursionPlan(block * nr, (), block, (), nr)
        unrolled = tuple(layer for layer in block for _ in range(nr))
        return RecursionPlan(unrolled, (), (), (), nr)
    depth = (L - 2) // nr
    block = tuple(range(1, depth + 1))
    last = depth + 1
    if sharing == "middle_cycle":
        return RecursionPlan((0,) + block * nr + (last,), (0,), block, (last,), nr)
    unrolled = (0,) + tuple(layer for layer in block for _ in range(nr)) + (last,)
    return RecursionPlan(unrolled, (0,), (), (last,), nr)
