"""`DataError`: a data problem stated in one line that names the problem and the fix."""

from __future__ import annotations

from mor_megatron.errors import UserError


class DataError(UserError, ValueError):
    """Bad data input or settings; the message is one line: what is wrong, then '; fix: ...'."""
