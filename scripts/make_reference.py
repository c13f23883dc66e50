"""Write the reference pages of docs/reference/ from the code: every field of `GraftingConfig` (its own,
beyond `TrainingArguments`) and `DataArguments` with its default and help, and every `TrainingArguments`
field with what hf_graft does with it (`hf_graft.trainer_fields`).

    python scripts/make_reference.py           # writes the pages
    python scripts/make_reference.py --check   # exit status 1 when a page is stale (tests/test_trainer_fields.py)
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = {
    "config.md": "render_config",
    "training_arguments.md": "render_training_arguments",
}


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
    import transformers
    from transformers import TrainingArguments

    from hf_graft.trainer_fields import FIELD_NOTES

    names = [f.name for f in dataclasses.fields(TrainingArguments) if f.init]
    lines = [
        "# `TrainingArguments` in a `GraftingTrainer`",
        "",
        "Generated from `hf_graft/trainer_fields.py` by `scripts/make_reference.py`. Every field of",
        f"`transformers.TrainingArguments` ({transformers.__version__}) either works (as described) or is",
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
