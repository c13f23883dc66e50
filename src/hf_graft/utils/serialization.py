"""Values made ready for JSON files (config.json, model cards, run identities)."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["to_json_value"]


def to_json_value(value: Any, what: str) -> Any:
    """`value` with tuples as lists and keys as strings; a one-line ValueError naming `what` when it
    cannot be written as JSON."""
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, list):
        return [to_json_value(v, what) for v in value]
    if isinstance(value, dict):
        return {str(k): to_json_value(v, what) for k, v in value.items()}
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}={value!r} is not JSON serialisable; pass a serialisable replacement") from e
    return value
