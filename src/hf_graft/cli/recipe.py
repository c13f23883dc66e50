"""Recipes: a flat YAML file of `DataArguments` / `GraftingConfig` fields, plus `--field value` overrides
(`--field null` for null, as in the YAML).

As TRL and timm do, the recipe's values become the command-line parser's defaults, and the command
line is parsed on top of them. Every YAML value is checked against its field's type first, so that
a wrong value is one line naming the file, the field and the value, never an argparse usage dump:

    recipes/x.yaml: num_students: got 'two'; allowed: an integer

A value of the right type that a field does not allow is refused by the dataclass itself, and the
line says where it was written:

    recipes/x.yaml: GraftingConfig.member_execution: got 'wide'; allowed: loop, fused
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any, Sequence

import yaml
from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

from hf_graft.config import DataArguments, GraftingConfig
from hf_graft.training.builder import check_run_inputs
from hf_graft.errors import HfGraftError

__all__ = ["RecipeError", "parse_recipe", "recipe_argument"]

# TrainingArguments silently replaces a missing output_dir by "trainer_output": in a recipe, a blank
# output_dir is a mistake, not a request for that default
_NULL_NOT_ALLOWED = {"output_dir"}


class RecipeError(HfGraftError, ValueError):
    """A recipe or override that cannot be used; the message names the file and the field."""


class _Mismatch(Exception):
    pass


_NOT_A_BOOLEAN = re.compile(r"argument --([\w-]+)(?:/--[\w-]+)?: Truthy value expected: got (.*?) but expected")


class _RecipeParser(HfArgumentParser):
    fields: dict[str, Any] = {}

    def error(self, message: str):  # argparse would print the whole usage first; one line says enough
        wrong = _NOT_A_BOOLEAN.search(message)
        if wrong:  # said as a recipe's wrong value is said
            name = wrong.group(1).replace("-", "_")
            nullable = type(None) in typing.get_args(self.fields.get(name))
            allowed = "true, false or null" if nullable else "true or false"
            raise RecipeError(f"command line: --{name}: got {wrong.group(2)!r}; allowed: {allowed}")
        raise RecipeError(f"command line: {message} (see `hf-graft train --help`)")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice (YAML would keep the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"{key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        # sorted: typing caches Union[dict, str] and Union[str, dict] as one object, so the order of
        # `args` is whichever some module spelled first
        return " or ".join(sorted(_describe(a) for a in args if a is not type(None)))
    if origin is list:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if isinstance(hint, type) and issubclass(hint, Enum):
        return "one of " + ", ".join(str(e.value) for e in hint)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}
    return names.get(hint, names.get(origin, getattr(hint, "__name__", str(hint))))


def _coerce(value: Any, hint: Any, convert: bool) -> Any:
    """`value` as the type `hint` describes, or `_Mismatch`; `convert` allows strings and numbers to be
    read as the command line reads them (e.g. '1e-3' as a number, which YAML leaves a string)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        enums = [a for a in options if isinstance(a, type) and issubclass(a, Enum)]
        if enums and isinstance(value, str):  # e.g. HubStrategy | str: the enum's values are the choices
            return _coerce(value, enums[0], convert)
        for converting in (False, True) if convert else (False,):  # an exact match first
            for option in options:
                try:
                    return _coerce(value, option, converting)
                except _Mismatch:
                    continue
        raise _Mismatch
    if origin is list:
        items = value if isinstance(value, list) else [value]  # a single value is a one-item list
        return [_coerce(item, args[0] if args else Any, convert) for item in items]
    if origin is dict or hint is dict:
        if isinstance(value, dict):
            return value
        raise _Mismatch
    if origin is typing.Literal:
        if value in args:
            return value
        raise _Mismatch
    if isinstance(hint, type) and issubclass(hint, Enum):
        if str(value) in {str(e.value) for e in hint}:
            return str(value)
        raise _Mismatch
    if hint is bool:
        if isinstance(value, bool):
            return value
        if convert and isinstance(value, str):
            try:
                return string_to_bool(value)
            except Exception:
                pass
        raise _Mismatch
    if hint in (int, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if hint is float:
                return float(value)
            if isinstance(value, int):
                return value
        if convert and isinstance(value, str):
            try:
                return hint(value)
            except ValueError:
                pass
        raise _Mismatch
    if hint is str:
        if isinstance(value, str):
            return value
        if convert and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch
    return value  # a type the recipe cannot spell better than the dataclass checks it


def _recipe_defaults(recipe: str | os.PathLike, fields: dict[str, Any]) -> dict[str, Any]:
    path = Path(recipe)
    if not path.is_file():
        raise RecipeError(f"{recipe}: recipe file not found")
    try:
        content = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError(f"{recipe}: not valid YAML{where} ({problem})") from None
    if content is None:
        raise RecipeError(f"{recipe}: empty recipe; a recipe is a flat mapping of field: value")
    if not isinstance(content, dict):
        raise RecipeError(f"{recipe}: a recipe is a flat mapping of field: value")
    unknown = sorted(str(k) for k in content if k not in fields)
    if unknown:
        close = {k: difflib.get_close_matches(k, list(fields), n=1) for k in unknown}
        hints = "; ".join(f"did you mean {match[0]!r} for {k!r}?" for k, match in close.items() if match)
        raise RecipeError(
            f"{recipe}: unknown key(s) {', '.join(map(repr, unknown))} "
            "(not a field of DataArguments or GraftingConfig; see `hf-graft train --help`)" + (f"; {hints}" if hints else "")
        )
    defaults = {}
    for key, value in content.items():
        hint = fields[key]
        nullable = type(None) in typing.get_args(hint) and key not in _NULL_NOT_ALLOWED
        if value is None and nullable:
            defaults[key] = None
            continue
        try:
            if value is None:
                raise _Mismatch
            defaults[key] = _coerce(value, hint, convert=True)
        except _Mismatch:
            shown = "null (a blank value)" if value is None else repr(value)
            allowed = _describe(hint)
            if nullable:
                allowed = "true, false or null" if allowed == "true or false" else f"{allowed}, or null"
            raise RecipeError(f"{recipe}: {key}: got {shown}; allowed: {allowed}") from None
    return defaults


def parse_recipe(
    recipe: str | os.PathLike | None, overrides: Sequence[str] = ()
) -> tuple[DataArguments, GraftingConfig]:
    """Recipe YAML (flat keys, as in TRL / alignment-handbook recipes) + `--key value` overrides.

    Unknown keys and values of the wrong type fail here, in one line naming the field, before any
    data or model is touched; `GraftingConfig` / `DataArguments` then check what the values mean, and
    `check_run_inputs` the models and metrics they name (so a run built from it skips that check).
    """
    fields: dict[str, Any] = {}
    for cls in (DataArguments, GraftingConfig):
        hints = typing.get_type_hints(cls)
        fields.update({f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init})
    for token in overrides:
        name, option = _option_name(token), token.split("=", 1)[0]
        if name is not None and name not in fields and not option.startswith("--no_"):
            raise RecipeError(f"command line: unknown option {option} (not a field of DataArguments or GraftingConfig)")
    parser = _RecipeParser((DataArguments, GraftingConfig))
    parser.fields = fields
    defaults = _recipe_defaults(recipe, fields) if recipe is not None else {}
    arguments, given = _nulls_and_bare_flags(overrides, fields)
    parser.set_defaults(**{**defaults, **given})
    try:
        data_args, config, remaining = parser.parse_args_into_dataclasses(
            args=arguments, return_remaining_strings=True)
    except RecipeError:
        raise
    except ValueError as err:  # a value the dataclasses refuse: say where it was written
        raise RecipeError(f"{_source(err, recipe, defaults, overrides)}: {err}") from None
    if remaining:
        raise RecipeError(f"command line: could not use {' '.join(remaining)!r}")
    try:  # what the config names outside itself (models, metrics), before any data or folder is touched
        check_run_inputs(config)
    except ValueError as err:
        raise RecipeError(f"{_source(err, recipe, defaults, overrides)}: {err}") from None
    return data_args, config


def recipe_argument(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """The recipe a command line names, leading (`train RECIPE.yaml ...`) or as `--config RECIPE.yaml` (TRL's
    spelling), and the other arguments; a recipe given twice is refused."""
    rest, named = [], []
    tokens = list(argv)
    if tokens and not tokens[0].startswith("-"):
        named.append(tokens.pop(0))
    i = 0
    while i < len(tokens):
        flag, equals, value = tokens[i].partition("=")
        if flag != "--config":
            rest.append(tokens[i])
            i += 1
            continue
        if not equals:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise RecipeError("command line: --config: expected a recipe file (--config RECIPE.yaml)")
            value, i = tokens[i + 1], i + 1
        named.append(value)
        i += 1
    if len(named) > 1:
        raise RecipeError(f"command line: the recipe is given twice ({' and '.join(named)}); give one, either "
                          "first or as --config")
    return (named[0] if named else None), rest


def _option_name(token: str) -> str | None:
    """The field a command-line token names (`--field`, `--field=value`, `--fie-ld`), or None for a value."""
    return token[2:].split("=", 1)[0].replace("-", "_") if token.startswith("--") else None


def _nulls_and_bare_flags(overrides: Sequence[str], fields: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """`--field null` (or `--field=null`) for a field that may be null means null, as `field: null` does
    in a recipe (argparse would read the word as a value of the field's type); a bare `--field` of a
    true / false / null field means true, as it does for the true / false ones. Returns the other
    arguments and the fields so set."""
    arguments, values = [], {}
    tokens = list(overrides)
    i = 0
    while i < len(tokens):
        name = _option_name(tokens[i])
        _, has_value, value = tokens[i].partition("=")
        options = typing.get_args(fields.get(name))
        nullable = type(None) in options and name not in _NULL_NOT_ALLOWED
        following = tokens[i + 1] if i + 1 < len(tokens) else None
        if nullable and has_value and value.lower() == "null":
            values[name] = None
            i += 1
        elif nullable and not has_value and following is not None and following.lower() == "null":
            values[name] = None
            i += 2
        elif nullable and bool in options and not has_value and (following is None or following.startswith("--")):
            values[name] = True
            i += 1
        else:
            arguments.append(tokens[i])
            i += 1
    return arguments, values


def _source(err: ValueError, recipe, recipe_values: dict[str, Any], overrides: Sequence[str]) -> str:
    """Where the value an error names came from: the command line, the recipe file, or (for an error
    that names no field, or a field left at its default) the recipe with its overrides."""
    match = re.match(r"\w+\.(\w+)", str(err))
    field = match.group(1) if match else None
    given = {_option_name(t) for t in overrides} - {None}
    if field in given:
        return "command line"
    if recipe is None:
        return "command line" if overrides else "defaults"
    if field in recipe_values or not overrides:
        return str(recipe)
    return f"{recipe} with the command line"
