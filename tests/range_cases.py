"""Values on either side of a `ranges.Range`'s bounds: the generated cases of the range tests
(config settings in test_ranges.py, CLI arguments in test_cli_args.py)."""

from __future__ import annotations

import math

from mor_megatron.ranges import Range


def outside(valid: Range) -> list:
    """Just past each bound (the bound itself where it is open), non-finite values, a fraction."""
    nudge = 1 if valid.integer else 1e-3
    values = [math.nan, math.inf, -math.inf]
    if valid.low is not None:
        values.append(valid.low if valid.low_open else valid.low - nudge)
    if valid.high is not None:
        values.append(valid.high if valid.high_open else valid.high + nudge)
    if valid.integer:
        values.append((valid.low or 0) + 1.5)
    return values


def inside(valid: Range) -> list:
    """Each bound itself, or just inside it where it is open."""
    nudge = 1 if valid.integer else 1e-3
    values = []
    if valid.low is not None:
        values.append(valid.low + nudge if valid.low_open else valid.low)
    if valid.high is not None:
        values.append(valid.high - nudge if valid.high_open else valid.high)
    return values
