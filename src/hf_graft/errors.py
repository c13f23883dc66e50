"""What hf_graft refuses, and how a refusal is said: one line.

Every refusal derives from `HfGraftError` (most also from the built-in class a caller would expect:
ValueError for a bad value, RuntimeError for a run that cannot go on), so `except HfGraftError` catches
exactly what hf_graft refused and lets a bug's traceback through. The command lines print a refusal as
one line; `HF_GRAFT_DEBUG=1` (or `--debug`) prints its traceback too.
"""

from __future__ import annotations

import os

__all__ = ["HfGraftError", "debug_enabled", "one_line"]


class HfGraftError(Exception):
    """A refusal of hf_graft: bad input, a setting this machine cannot honour, a run that cannot go on."""


def one_line(error: BaseException, *, with_type: bool = False) -> str:
    """The first line of an error's message (its class name when it has none)."""
    lines = str(error).strip().splitlines()
    if not lines:
        return type(error).__name__
    return f"{type(error).__name__}: {lines[0]}" if with_type else lines[0]


def debug_enabled(argv: list[str] | None = None) -> bool:
    """`--debug` on the command line, or HF_GRAFT_DEBUG set to anything but 0/false/empty."""
    if argv is not None and "--debug" in argv:
        return True
    return os.environ.get("HF_GRAFT_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
