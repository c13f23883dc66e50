"""The one command-line convention of `hf-graft export | evaluate | analyze`, the same as `train`'s (and TRL's
scripts'): a dataclass of arguments parsed by `transformers.HfArgumentParser`.

* `--field_name value`, or `--field-name value` (HfArgumentParser adds both spellings of every field);
* a bare `--flag` of a true / false field means true, also when the field may be null (as in `train`);
* the command's main input may also be given without its flag (`hf-graft export CHECKPOINT_DIR ...`);
* `--debug` (or HF_GRAFT_DEBUG=1) prints the traceback of a refusal too;
* a bad argument is one line, `prog: error: ...`, and exit status 2;
* a renamed flag keeps working for one release, with a one-line note naming the new spelling.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from typing import Any, Mapping, Sequence

from transformers import HfArgumentParser

from hf_graft.errors import HfGraftError, debug_enabled, one_line

__all__ = ["ArgumentsError", "CommandLineParser", "command_parser", "parse_arguments"]

DEBUG_HELP = "--debug (or HF_GRAFT_DEBUG=1): print the traceback of a refusal too."
_POSITIONAL = "positional_input"  # the parser's name for the input given without its flag


class ArgumentsError(HfGraftError, ValueError):
    """A command line that cannot be used; the message is one line."""


class CommandLineParser(HfArgumentParser):
    """HfArgumentParser whose errors are one line (argparse would print the whole usage first)."""

    def error(self, message: str):
        raise ArgumentsError(f"{message} (see --help)")


def command_parser(arguments: type, *, prog: str, description: str, positional: str | None = None) -> CommandLineParser:
    """The parser of the dataclass `arguments`; its field `positional` may also be given without its flag."""
    parser = CommandLineParser(arguments, prog=prog, description=description, epilog=DEBUG_HELP)
    if positional is not None:
        many = _is_list(typing.get_type_hints(arguments)[positional])
        parser.add_argument(_POSITIONAL, metavar=_metavar(arguments, positional), nargs="*" if many else "?",
                            default=None, help=f"the same as --{positional}")
    return parser


def parse_arguments(
    parser: CommandLineParser,
    arguments: type,
    argv: Sequence[str],
    *,
    positional: str | None = None,
    renamed: Mapping[str, str] | None = None,
) -> tuple[Any, bool]:
    """(an instance of the dataclass `arguments`, whether to print tracebacks) from `argv`.

    Raises `ArgumentsError` (one line) for an unknown flag, a bad value, a missing or twice-given input, or a
    value the dataclass refuses. `renamed` maps old flags to their new spelling; each old one used is noted
    on stderr.
    """
    debug = debug_enabled(list(argv))
    tokens = [token for token in argv if token != "--debug"]
    tokens = _bare_flags(_renamed(parser.prog, tokens, renamed or {}), arguments)
    values = vars(parser.parse_intermixed_args(tokens))
    if positional is not None:
        given = values.pop(_POSITIONAL)
        metavar = _metavar(arguments, positional)
        if given:
            if values[positional]:
                raise ArgumentsError(f"{metavar} is given twice, with and without --{positional}; give it once")
            values[positional] = given
        if not values[positional]:
            raise ArgumentsError(f"the following arguments are required: {metavar} (see --help)")
    try:
        return arguments(**values), debug
    except ValueError as error:  # a value the dataclass refuses
        raise ArgumentsError(one_line(error)) from None


def _metavar(arguments: type, name: str) -> str:
    field = next(f for f in dataclasses.fields(arguments) if f.name == name)
    return field.metadata.get("metavar", name.upper())


def _is_list(hint: Any) -> bool:
    """`list[X]` or `list[X] | None`."""
    return any(typing.get_origin(h) is list for h in (hint, *typing.get_args(hint)))


def _renamed(prog: str, tokens: list[str], renamed: Mapping[str, str]) -> list[str]:
    """`tokens` with every old flag of `renamed` (also as `--old=value`) in its new spelling, noted on stderr."""
    result = []
    for token in tokens:
        flag, equals, value = token.partition("=")
        if flag in renamed:
            print(f"{prog}: note: {flag} is now {renamed[flag]}; the old spelling works in this release only",
                  file=sys.stderr)
            token = renamed[flag] + equals + value
        result.append(token)
    return result


def _bare_flags(tokens: list[str], arguments: type) -> list[str]:
    """A bare `--flag` of a true / false / null field means true (HfArgumentParser would ask for a value)."""
    nullable_flags = set()
    for name, hint in typing.get_type_hints(arguments).items():
        if set(typing.get_args(hint)) == {bool, type(None)}:
            nullable_flags |= {f"--{name}", f"--{name.replace('_', '-')}"}
    result = []
    for i, token in enumerate(tokens):
        result.append(token)
        following = tokens[i + 1] if i + 1 < len(tokens) else None
        if token in nullable_flags and (following is None or following.startswith("-")):
            result.append("true")
    return result
