"""Write the reference pages of docs/reference/ from the code: every field of `GraftingConfig` (its own,
beyond `TrainingArguments`) and `DataArguments` with its default and help, every `TrainingArguments`
field with what hf_graft does with it (`hf_graft.trainer_fields`), and the `hf-graft` subcommands with
their parsers' `--help`.

    python scripts/make_reference.py           # writes the pages
    python scripts/make_reference.py --check   # exit status 1 when a page is stale (tests/test_trainer_fields.py)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import pkgutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = {
    "config.md": "render_config",
    "training_arguments.md": "render_training_arguments",
    "cli.md": "render_cli",
}
HELP_WIDTH = 100  # the terminal's width would change the page from one machine to the next


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    return f"`{value!r}`" if value is not None else "`None`"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _table(fields) -> list[str]:
    lines = ["| field | default | what it does |", "|---|---|---|"]
    for field in fields:
        lines.append(f"| `{field.name}` | {_cell(_default(field))} | {_cell(field.metadata.get('help', ''))} |")
    return lines


def render_config() -> str:
    from transformers import TrainingArguments

    from hf_graft.config import DataArguments, GraftingConfig

    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    own = [f for f in dataclasses.fields(GraftingConfig) if f.init and f.name not in inherited]
    changed = [f for f in dataclasses.fields(GraftingConfig)
               if f.init and f.name in inherited and f.metadata.get("help") and _default(f) != _default(
                   next(g for g in dataclasses.fields(TrainingArguments) if g.name == f.name))]
    lines = [
        "# Configuration reference",
        "",
        "Generated from the dataclasses by `scripts/make_reference.py` (a test fails when this page is stale).",
        "A recipe is a flat YAML file of these fields; every field is also a command-line flag",
        "(`--field value`, `--field null`).",
        "",
        "## `GraftingConfig`: hf_graft's own fields",
        "",
        *_table(own),
        "",
        "## `GraftingConfig`: `TrainingArguments` fields with another default",
        "",
        *_table(changed),
        "",
        "Every other `TrainingArguments` field keeps its default; [training_arguments.md](training_arguments.md)",
        "says what each does in a `GraftingTrainer`.",
        "",
        "## `DataArguments`",
        "",
        *_table([f for f in dataclasses.fields(DataArguments) if f.init]),
        "",
    ]
    return "\n".join(lines)


def render_training_arguments() -> str:
    from transformers import TrainingArguments

    from hf_graft.trainer_fields import FIELD_NOTES

    names = [f.name for f in dataclasses.fields(TrainingArguments) if f.init]
    lines = [
        "# `TrainingArguments` in a `GraftingTrainer`",
        "",
        "Generated from `hf_graft/trainer_fields.py` by `scripts/make_reference.py`. Every field of",
        "`transformers.TrainingArguments` either works (as described) or is",
        "refused in one line when set to a value that cannot work with a population of image classifiers.",
        "A test fails when a transformers release adds a field this table does not list.",
        "",
        "| field | in hf_graft | notes |",
        "|---|---|---|",
    ]
    for name in names:
        status, note = FIELD_NOTES.get(name, ("not listed", ""))
        lines.append(f"| `{name}` | {status} | {_cell(note)} |")
    lines.append("")
    return "\n".join(lines)


def _help_text(parser: argparse.ArgumentParser) -> str:
    parser.formatter_class = functools.partial(parser.formatter_class, width=HELP_WIDTH)
    if hasattr(parser, "color"):  # Python >= 3.14 colours help on a terminal
        parser.color = False
    return parser.format_help().rstrip()


def render_cli() -> str:
    import hf_graft.cli
    from hf_graft.cli.main import USAGE

    lines = [
        "# Command-line reference",
        "",
        "Generated from the parsers by `scripts/make_reference.py` (a test fails when this page is stale).",
        "A refused command prints one line and exits with status 2 (bad input, found before any work) or 1",
        "(a failure during the work); `HF_GRAFT_DEBUG=1` prints the traceback as well.",
        "",
        "## `hf-graft`",
        "",
        "```text",
        USAGE.strip(),
        "```",
        "",
        "## `hf-graft train`",
        "",
        "`hf-graft train RECIPE.yaml [--field value ...]`, the same as `python -m hf_graft.train` (and",
        "`accelerate launch -m hf_graft.train` on several processes). Every field of `DataArguments` and",
        "`GraftingConfig` is a flag, listed with its default in [config.md](config.md) (and the inherited",
        "`TrainingArguments` fields in [training_arguments.md](training_arguments.md)); the recipe's values",
        "are the defaults and the command line is parsed on top of them. `--field null` sets a field that may",
        "be null to null, and a bare true/false flag means true. `hf-graft train --help` prints every field",
        "with its help.",
        "",
    ]
    for module_info in sorted(pkgutil.iter_modules(hf_graft.cli.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"hf_graft.cli.{module_info.name}")
        build_parser = getattr(module, "build_parser", None)
        if build_parser is None:
            continue
        lines += [f"## `hf-graft {module_info.name}`", "", "```text", _help_text(build_parser()), "```", ""]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(ROOT / "src"))
    folder = ROOT / "docs" / "reference"
    stale = []
    for name, render in PAGES.items():
        text = globals()[render]()
        path = folder / name
        if "--check" in argv:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path.relative_to(ROOT)))
        else:
            folder.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print(f"stale: {', '.join(stale)}; run python scripts/make_reference.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
