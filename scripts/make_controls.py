"""Write the fair controls of every grafting recipe, and the recipe index of recipes/README.md.

    python scripts/make_controls.py           # writes recipes/controls/*.yaml and the index
    python scripts/make_controls.py --check   # exit status 1 when a file is stale (tests/test_recipes.py)

A recipe that reproduces a row of the paper (its first line: `# Reproduces: Table N, ...`) and grafts
(`graft_source` other than none) gets two controls, each differing from it by as little as possible:

- `<name>_independent`: the same K members, initialisations, learning rates, schedule, data orders,
  seeds and teachers, with `graft_source: none` (the settings that only configure the graft removed);
- `<name>_single`: member 0 alone: `num_students: 1` at member 0's learning rate (`learning_rate` times
  its `lr_spread` multiplier), with member 0's schedule, seed, initialisation and data order, no graft.

A control whose settings are those of a hand-written recipe (a one-learning-rate grafting run's single
network is the baseline; a grafting+ run's, the distillation recipe) is not written again: the index
names that recipe. The controls are generated so that they cannot drift from their recipes.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
CONTROLS = RECIPES / "controls"
INDEX = RECIPES / "README.md"
INDEX_BEGIN = "<!-- BEGIN recipe index: written by scripts/make_controls.py -->"
INDEX_END = "<!-- END recipe index -->"
KINDS = ("independent", "single")

ROW = re.compile(
    r"^# (?:Also reproduces|Reproduces): Table (?P<table>\d+), (?P<row>.+): "
    r"(?P<number>\d+(?:\.\d+)?(?: \+- \d+(?:\.\d+)?)? top-1(?:, \d+(?:\.\d+)? top-5)?) \(paper\)$"
)
KEY = re.compile(r"^([A-Za-z_]\w*):")


def _load(text: str) -> Any:
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # libyaml when installed


def graft_only(key: str) -> bool:
    """Settings that mean something only when a run grafts (a control without the graft drops them)."""
    return (key.startswith("graft_") and key != "graft_source") or key == "bn_recalibration_batches"


@dataclass
class Recipe:
    name: str
    text: str
    settings: dict[str, Any]
    rows: list[dict[str, str]] = field(default_factory=list)  # table, row, number of each row reproduced

    @classmethod
    def read(cls, path: Path) -> "Recipe":
        text = path.read_text()
        rows = [m.groupdict() for m in map(ROW.match, _leading_comments(text)) if m]
        return cls(path.stem, text, _load(text), rows)

    @property
    def grafts(self) -> bool:
        return bool(self.rows) and self.settings.get("graft_source", "external") != "none"


def _leading_comments(text: str) -> list[str]:
    lines = text.splitlines()
    end = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
    return lines[:end]


def hand_written() -> list[Recipe]:
    return [Recipe.read(p) for p in sorted(RECIPES.glob("*.yaml"))]


def lr_multipliers(settings: dict[str, Any]) -> list[float]:
    """Each member's multiplier of learning_rate, as `GraftingConfig.lr_multipliers` computes it."""
    from hf_graft.graft.schedule import cosine_lr_multipliers

    k = int(settings.get("num_students", 2))
    spread = settings.get("lr_spread", "none")
    words = spread.replace(",", " ").split() if isinstance(spread, str) else [str(w) for w in spread]
    if words in (["none"], []):
        return [1.0] * k
    if words == ["cosine"]:
        return cosine_lr_multipliers(k)
    return [float(w) for w in words]


# --- editing a flat recipe line by line, so that its comments stay


def _entries(lines: list[str]) -> dict[str, tuple[int, int]]:
    """key -> (first line, end line) of each top-level entry (a block list's `  - item` lines included)."""
    spans: dict[str, tuple[int, int]] = {}
    i = 0
    while i < len(lines):
        match = KEY.match(lines[i])
        if not match:
            i += 1
            continue
        end = i + 1
        while end < len(lines) and lines[end][:1] in (" ", "-") and lines[end].strip():
            end += 1
        spans[match.group(1)] = (i, end)
        i = end
    return spans


def _edit(body: list[str], set_: dict[str, tuple[Any, str]], drop: set[str]) -> list[str]:
    spans = _entries(body)
    missing = sorted(set(set_) - set(spans))
    if missing:
        raise ValueError(f"cannot write a control: the recipe has no {', '.join(missing)} line")
    out, i = [], 0
    starts = {start: (key, end) for key, (start, end) in spans.items()}
    while i < len(body):
        if i not in starts:
            out.append(body[i])
            i += 1
            continue
        key, end = starts[i]
        if key in set_:
            value, comment = set_[key]
            line = f"{key}: {value}"
            out.append(f"{line}   # {comment}" if comment else line)
        elif key not in drop:
            out.extend(body[i:end])
        i = end
    return out


def _number(value: float) -> str:
    return repr(float(value)).removesuffix(".0") if float(value).is_integer() else repr(float(value))


def control(source: Recipe, kind: str) -> Recipe:
    """The `kind` control of a grafting recipe, as a Recipe (name, text, settings)."""
    s = source.settings
    name = f"{source.name}_{kind}"
    drop = {k for k in s if graft_only(k)}
    set_: dict[str, tuple[Any, str]] = {"graft_source": ("none", "the only change to the grafting run: no graft")}
    expected = {k: v for k, v in s.items() if k not in drop}
    expected["graft_source"] = "none"
    k = int(s.get("num_students", 2))
    teachers = s.get("teacher_models")
    if kind == "independent":
        what = (f"# The same {k} member{'s' if k > 1 else ''}, initialisations, learning rates, schedule, data orders, seeds"
                f"{' and teachers' if teachers else ''},\n"
                "# trained without grafting (graft_source: none): the grafting run against this one isolates the graft.\n"
                "# Compare member 0 (eval_member0_top1), as the paper reports the first network; every member's\n"
                "# top-1, eval_members_mean_top1 and eval_ensemble_top1 are in all_results.json too.\n")
    else:
        multiplier = lr_multipliers(s)[0]
        rate = float(s.get("learning_rate", 0.1)) * multiplier
        set_["graft_source"] = ("none", "")
        set_["num_students"] = (1, "member 0 of the grafting run, alone")
        expected["num_students"] = 1
        drop |= {"lr_spread", "member_execution"}  # one network: no rate spread, nothing to fuse
        for key in ("lr_spread", "member_execution"):
            expected.pop(key, None)
        if multiplier != 1.0:
            set_["learning_rate"] = (_number(rate), f"member 0's rate: {_number(s['learning_rate'])} x {multiplier:.6g} "
                                                   f"(lr_spread {s['lr_spread']})")
            expected["learning_rate"] = float(_number(rate))
        what = (f"# Member 0 of the grafting run trained alone: one network with member 0's initialisation, data\n"
                f"# order, learning rate ({_number(rate)}), schedule{', teachers' if teachers else ''} and seed, no graft.\n")
        what += ("# It is distillation alone on the grafting run's schedule: against it, the grafting run's member 0\n"
                 "# isolates the graft (and the other students).\n" if teachers else
                 "# Against the published baseline this run isolates the schedule; against the grafting run's\n"
                 "# member 0, the graft (and the other members).\n")
    set_["output_dir"] = (f"out/{name}", "")
    expected["output_dir"] = f"out/{name}"
    lines = source.text.splitlines()
    body = lines[len(_leading_comments(source.text)):]
    first = _leading_comments(source.text)[0].removeprefix("# Reproduces: ")
    title = "without the graft" if kind == "independent" else "with one network"
    head = (f"# Control {title} for {first}\n"
            f"# Written by scripts/make_controls.py from recipes/{source.name}.yaml, whose data and teachers it\n"
            "# uses: change that recipe, then run `python scripts/make_controls.py`.\n"
            + what + f"#   accelerate launch -m hf_graft.train recipes/controls/{name}.yaml\n")
    text = head + "\n".join(_edit(body, set_, drop)) + "\n"
    settings = _load(text)
    if settings != expected:  # the line edits did what the settings say
        raise AssertionError(f"{name}: written {settings} != expected {expected}")
    return Recipe(name, text, settings)


# --- which settings are the same run


def _defaults() -> dict[str, Any]:
    from hf_graft.config import DataArguments, GraftingConfig

    out = {}
    for cls in (DataArguments, GraftingConfig):
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
    return out


def _normal(value: Any) -> Any:
    value = getattr(value, "value", value)  # enums as their values
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (list, tuple)):
        return tuple(_normal(v) for v in value)
    return str(value)


def run_settings(settings: dict[str, Any], defaults: dict[str, Any]) -> frozenset:
    """What a run does: the settings that differ from the defaults, output_dir aside."""
    out = set()
    for key, value in settings.items():
        if key == "output_dir":
            continue
        default = defaults.get(key, dataclasses.MISSING)
        if isinstance(default, list) and not isinstance(value, list):
            value = [value]  # `lr_spread: none` is the list ["none"]
        if default is dataclasses.MISSING or _normal(value) != _normal(default):
            out.add((key, _normal(value)))
    return frozenset(out)


@dataclass
class Controls:
    source: Recipe
    names: dict[str, str]  # kind -> the control's path under recipes/ (a hand-written recipe when reused)


def plan(recipes: list[Recipe]) -> tuple[list[Controls], dict[str, Recipe]]:
    """Every grafting recipe's controls, and the control files to write (name -> Recipe)."""
    defaults = _defaults()
    known = {run_settings(r.settings, defaults): f"{r.name}.yaml" for r in recipes}
    written: dict[str, Recipe] = {}
    out = []
    for source in recipes:
        if not source.grafts:
            continue
        names = {}
        for kind in KINDS:
            made = control(source, kind)
            key = run_settings(made.settings, defaults)
            if key not in known:
                known[key] = f"controls/{made.name}.yaml"
                written[made.name] = made
            elif known[key].startswith("controls/"):  # one run controls several recipes: say so in its file
                shared = written[Path(known[key]).stem]
                lines = shared.text.splitlines(keepends=True)
                lines.insert(3, f"# It is also the {kind} control of recipes/{source.name}.yaml (the same run).\n")
                shared.text = "".join(lines)
            names[kind] = known[key]
        out.append(Controls(source, names))
    return out, written


_DATASETS = ("CIFAR-100", "CIFAR-10", "ImageNet")  # CIFAR-100 first: its name contains CIFAR-10's
_MODELS = ("ResNet-18", "ResNet-34", "ResNet-50", "ResNet-32", "ResNet-56", "ResNet-110", "MobileNetV2", "WRN-28-10")
_METHODS = ("baseline", "noise", "internal", "external", "l1", "entropy", "filter grafting", "distillation",
            "grafting+", "models grafting", "grafting")


def _row_order(table: int, row: str) -> tuple:
    """The paper's order within a table: dataset, network, then baseline first and the methods as it lists them."""
    def rank(names, text, missing):
        return next((i for i, name in enumerate(names) if name in text), missing)

    dataset = {0: 1, 1: 0}.get(rank(_DATASETS, row, 2), 2)
    model = min([row.find(m) for m in _MODELS if m in row], default=-1)
    model = rank(_MODELS, row[model:model + 12], -1) if model >= 0 else -1
    method = row.rsplit(", ", 1)[-1]
    return table, dataset, model, rank(_METHODS, method, len(_METHODS)), row


def render_index(recipes: list[Recipe], controls: list[Controls]) -> str:
    by_source = {c.source.name: c.names for c in controls}
    rows = []
    for recipe in recipes:
        for row in recipe.rows:
            names = by_source.get(recipe.name, {})
            cells = [f"`{names[k]}`" if k in names else "—" for k in KINDS]
            rows.append((int(row["table"]), row["row"], row["number"], f"`{recipe.name}.yaml`", *cells))
    rows.sort(key=lambda r: _row_order(r[0], r[1]))
    lines = ["| Table | row | paper | recipe | control without the graft | control with one network |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {t} | {row} | {number} | {recipe} | {ind} | {single} |" for t, row, number, recipe, ind, single in rows]
    return "\n".join([INDEX_BEGIN, *lines, INDEX_END])


def render() -> dict[Path, str]:
    """Every file this script owns, with its content: the controls and recipes/README.md."""
    recipes = hand_written()
    controls, written = plan(recipes)
    files = {CONTROLS / f"{name}.yaml": r.text for name, r in sorted(written.items())}
    readme = INDEX.read_text()
    start, end = readme.index(INDEX_BEGIN), readme.index(INDEX_END) + len(INDEX_END)
    files[INDEX] = readme[:start] + render_index(recipes, controls) + readme[end:]
    return files


def stale(files: dict[Path, str]) -> list[str]:
    """What differs on disk from `files`: stale or missing files, and control files nothing writes."""
    out = [str(p.relative_to(ROOT)) for p, text in files.items() if not p.is_file() or p.read_text() != text]
    out += [str(p.relative_to(ROOT)) + " (not a control of any recipe)" for p in sorted(CONTROLS.glob("*.yaml"))
            if p not in files]
    return out


def main(argv: list[str]) -> int:
    files = render()
    if "--check" in argv:
        problems = stale(files)
        for problem in problems:
            print(f"stale: {problem}; run python scripts/make_controls.py", file=sys.stderr)
        return 1 if problems else 0
    CONTROLS.mkdir(exist_ok=True)
    for path in CONTROLS.glob("*.yaml"):
        if path not in files:
            path.unlink()
    for path, text in files.items():
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
