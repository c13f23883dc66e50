#!/usr/bin/env bash
# Run the test suite against the lowest versions pyproject.toml allows.
#
#   scripts/test_floors.sh [pytest args ...]
#
# Creates a fresh virtual environment (FLOORS_VENV, default .venv-floors) with FLOORS_PYTHON
# (default python3), installs hf_graft[test] with every dependency pinned to its `>=` bound
# (scripts/floor_constraints.py writes the pins), records what was installed in
# FLOORS_VENV/installed.txt, and runs pytest offline with FLOORS_WORKERS processes (default 1).
# Slow (torch alone is a large download): not part of .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${FLOORS_VENV:-.venv-floors}"
python="${FLOORS_PYTHON:-python3}"

"$python" -m venv --clear "$venv"
"$venv/bin/python" scripts/floor_constraints.py test > "$venv/floors.txt"
echo "floor pins:" && sed 's/^/  /' "$venv/floors.txt"
"$venv/bin/python" -m pip install --quiet --constraint "$venv/floors.txt" -e ".[test]"
"$venv/bin/python" -m pip freeze --exclude-editable > "$venv/installed.txt"
echo "python: $("$venv/bin/python" -V 2>&1); installed: $venv/installed.txt"
HF_HUB_OFFLINE=1 nice "$venv/bin/python" -m pytest -n "${FLOORS_WORKERS:-1}" -p no:cacheprovider "$@"
