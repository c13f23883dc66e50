"""Print a pip constraints file pinning every dependency of pyproject.toml to its lower bound.

    python scripts/floor_constraints.py [EXTRA ...] > floors.txt

Covers `project.dependencies` and the named optional extras (default: test). A requirement
without a `>=` bound is left out (pip picks its newest version).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: pip vendors a TOML reader
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
FLOOR = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(?:\[[^\]]*\])?\s*>=\s*([0-9][0-9A-Za-z.+\-]*)")


def floor_pins(extras: list[str]) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project.get("optional-dependencies", {}).get(extra, [])
    pins: dict[str, str] = {}
    for requirement in requirements:
        match = FLOOR.match(requirement.split(";")[0])
        if match:
            name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
            pins[name] = f"{name}=={match.group(2)}"
    return sorted(pins.values())


if __name__ == "__main__":
    print("\n".join(floor_pins(sys.argv[1:] or ["test"])))
