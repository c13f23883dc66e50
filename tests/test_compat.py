"""Every private member of another package that hf_graft touches is listed in `hf_graft._compat` and is
still where hf_graft expects it in the installed packages; a failure names the member and the version."""

from __future__ import annotations

import ast
import importlib
import re
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from hf_graft import _compat

PACKAGE = Path(_compat.__file__).resolve().parent


def _owner(path: str):
    module_path, _, class_name = path.partition(":")
    module = importlib.import_module(module_path)
    return getattr(module, class_name) if class_name else module


def _where(member: _compat.ForeignMember) -> str:
    return f"{member.owner.replace(':', '.')}.{member.name} ({member.package} {version(member.package)})"


def _instance_has(owner, name: str) -> bool:
    """Set on instances: the name appears in the class's source (its __init__ or a method)."""
    import inspect

    for cls in owner.__mro__:
        if cls is object:
            continue
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        if re.search(rf"\bself\.{re.escape(name)}\b", source):
            return True
    return False


@pytest.mark.parametrize("member", _compat.FOREIGN_MEMBERS, ids=lambda m: f"{m.package}-{m.name}")
def test_foreign_member_is_where_hf_graft_expects_it(member):
    try:
        owner = _owner(member.owner)
    except (ImportError, AttributeError) as err:
        pytest.fail(f"{_where(member)}: its owner is gone ({err}); hf_graft uses it for {member.why}")
    if member.kind == "instance":
        found = _instance_has(owner, member.name)
    elif member.kind == "reads":
        import inspect

        found = re.search(rf"\b{re.escape(member.name)}\b", inspect.getsource(owner)) is not None
    elif member.kind == "hook":
        found = callable(getattr(owner, member.name, None))
    else:
        found = hasattr(owner, member.name)
    assert found, f"{_where(member)} is gone; hf_graft uses it for {member.why} (see hf_graft/_compat.py)"


def test_every_overridden_hook_is_listed():
    """Each private method a hf_graft class overrides is named in OVERRIDDEN_HOOKS (and exists upstream)."""
    from transformers import Trainer

    from hf_graft.population.students import StudentPopulation
    from hf_graft.training.trainer import GraftingTrainer

    for cls, base, owner in ((GraftingTrainer, Trainer, "transformers.trainer:Trainer"),
                             (StudentPopulation, nn.Module, "torch.nn:Module")):
        overridden = {name for name in vars(cls) if name.startswith("_") and not name.startswith("__")
                      and hasattr(base, name)}
        assert overridden <= set(_compat.OVERRIDDEN_HOOKS[owner]), overridden - set(_compat.OVERRIDDEN_HOOKS[owner])


def test_no_private_member_of_another_package_outside_compat():
    """A static read of the package: private attributes of torch, timm, transformers, accelerate or datasets
    are reached only in _compat.py (a module's own private names are its business)."""
    foreign = re.compile(r"\b(?:torch|timm|transformers|accelerate|datasets|nn)\.(?:[A-Za-z]\w*\.)*_[a-z]\w*")
    attribute = re.compile(r"\.(_modules|_parameters|_buffers|_orig_mod|_indices|_tr_loss|_globalstep_last_logged|"
                           r"_created_lr_scheduler|_reversed_padding_repeated_twice|_model_args|tb_writer|training_bar)\b")
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "_compat.py":
            continue
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.module and any(
                    part.startswith("_") for part in node.module.split(".")[1:]) and not node.module.startswith("hf_graft"):
                offenders.append(f"{path.name}: from {node.module} import ...")
        for line_no, line in enumerate(text.splitlines(), 1):
            code = line.split("#")[0]
            if foreign.search(code) or attribute.search(code):
                offenders.append(f"{path.relative_to(PACKAGE)}:{line_no}: {line.strip()}")
    assert offenders == [], "\n".join(offenders)


def test_accessors_work_on_this_install():
    conv = nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")
    assert tuple(_compat.conv_padding(conv)) == (1, 1, 1, 1)
    bn = nn.BatchNorm2d(3)
    assert isinstance(bn, _compat.batchnorm_base()) and "running_mean" in _compat.own_buffers(bn)
    assert list(_compat.submodules(nn.Sequential(conv, bn))) == [conv, bn]
    grads = [torch.ones(4), torch.full((9,), 2.0)]
    assert [float(n) for n in _compat.foreach_norm(grads)] == [2.0, 6.0]
    _compat.foreach_mul_(grads, torch.tensor(0.5))
    assert float(grads[1][0]) == 1.0
    assert "reduce-overhead" in _compat.inductor_modes()
