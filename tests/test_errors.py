"""Every refusal is an HfGraftError said in one line; HF_GRAFT_DEBUG=1 (or --debug) shows its traceback."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import hf_graft
from hf_graft.errors import HfGraftError, one_line

ROOT = Path(__file__).resolve().parents[1]


def _error_classes():
    found = {}
    for info in pkgutil.walk_packages(hf_graft.__path__, "hf_graft."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if (inspect.isclass(value) and issubclass(value, Exception) and value.__module__ == info.name
                    and not name.startswith("_")):  # a private class is an internal signal, not a refusal
                found[f"{info.name}.{name}"] = value
    return found


def test_every_error_class_of_the_package_is_a_refusal():
    classes = _error_classes()
    assert len(classes) >= 10
    assert [name for name, cls in classes.items() if not issubclass(cls, HfGraftError)] == []


def test_one_line():
    assert one_line(ValueError("first\nsecond")) == "first"
    assert one_line(KeyError()) == "KeyError"
    assert one_line(ValueError("x\ny"), with_type=True) == "ValueError: x"


@pytest.mark.parametrize("debug", ["env", "flag", None])
def test_a_refused_run_shows_its_traceback_only_when_asked(debug, tmp_path, monkeypatch, capsys):
    from hf_graft.cli.train import main

    monkeypatch.delenv("HF_GRAFT_DEBUG", raising=False)
    if debug == "env":
        monkeypatch.setenv("HF_GRAFT_DEBUG", "1")
    argv = [str(ROOT / "recipes/quickstart.yaml"), "--output_dir", str(tmp_path / "o"), "--student_model", "nope_xyz"]
    assert main(argv + (["--debug"] if debug == "flag" else [])) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("hf-graft train:")]
    assert len(lines) == 1 and "GraftingConfig.student_model" in lines[0]
    assert ("Traceback (most recent call last)" in err) == (debug is not None)
    assert not (tmp_path / "o").exists()
