"""What tests/test_docs.py checks in the documentation: every relative link of README.md, docs/**/*.md (and
recipes/README.md) resolves to a file or folder, every `#anchor` to a heading (GitHub's slugs), every
`recipes/...yaml` path to a recipe, and every command-line flag in a command example or in backticks is
a flag of the command it belongs to.

Which command a flag belongs to: in a shell code block (or a backticked command), the command it follows
(`hf-graft export ... --out`, `accelerate launch --config_file ... -m hf_graft.train ... --output_dir`).
A backticked flag on its own (`--overwrite`) belongs to the commands of the last backticked command in
its paragraph, else of the last shell block in its section (or the section above it), else to training.
Training flags are the fields of `DataArguments` / `GraftingConfig` (dashes or underscores); `hf-graft
export | evaluate | analyze` accept what their parsers' `--help` lists; accelerate, torchrun,
pytest, pip and docker have the short lists below; a repository script accepts the flags its source
names.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the launchers' flags these docs use (accelerate takes each with dashes or underscores)
ACCELERATE_FLAGS = {"--help", "--config_file", "--num_processes", "--num_machines", "--machine_rank", "--main_process_ip",
                    "--main_process_port", "--multi_gpu", "--mixed_precision", "--cpu", "--gpu_ids", "--use_fsdp",
                    "--fsdp_version", "--same_network", "--rdzv_backend", "--dynamo_backend", "--quiet"}
TORCHRUN_FLAGS = {"--help", "--nnodes", "--nproc_per_node", "--nproc-per-node", "--node_rank", "--node-rank",
                  "--master_addr", "--master-addr", "--master_port", "--master-port", "--standalone",
                  "--rdzv_backend", "--rdzv-backend", "--rdzv_endpoint", "--rdzv-endpoint"}
PYTEST_FLAGS = {"--help", "--maxfail", "--durations", "--timeout", "--basetemp", "--lf", "--ff", "--tb", "--co",
                "--collect-only", "--exitfirst", "--quiet", "--verbose"}
PIP_FLAGS = {"--help", "--upgrade", "--editable", "--index-url", "--extra-index-url", "--no-deps", "--constraint"}
DOCKER_FLAGS = {"--help", "--rm", "--gpus", "--shm-size", "--volume", "--build-arg", "--tag", "--ipc", "--env",
                "--network", "--entrypoint", "--interactive", "--tty", "--user", "--workdir"}
PLACEHOLDERS = {"--field", "--field_name", "--field-name"}  # "every field is a flag: `--field value`"
HF_GRAFT_SUBCOMMANDS = ("train", "export", "evaluate", "analyze", "env")
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console", "zsh"}
# `python -m MODULE` -> the command it runs
MODULE_COMMANDS = {"hf_graft.train": "train", "hf_graft.cli.train": "train", "pytest": "pytest",
                   **{f"hf_graft.cli.{name}": name for name in HF_GRAFT_SUBCOMMANDS if name != "train"}}
# scripts whose arguments are the training fields (HfArgumentParser over DataArguments and GraftingConfig)
TRAINING_SCRIPTS = {"examples/finetune_pretrained.py"}

FLAG = re.compile(r"^--[A-Za-z][\w-]*")
FLAG_IN_TEXT = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([\w+-]*)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.S)  # a span may continue on the next line
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
RECIPE_PATH = re.compile(r"recipes/[\w./{},-]+?\.ya?ml\b")
NEW_PARAGRAPH = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s|^\s*\|")


# ----------------------------------------------------------------------------- which flags a command takes
def _flags_in_help(parser) -> frozenset[str]:
    return frozenset(FLAG_IN_TEXT.findall(parser.format_help()))


@functools.lru_cache(maxsize=None)
def command_flags(command: str, root: Path = ROOT) -> frozenset[str] | None:
    """The long flags `command` accepts (`train`, `export`, ..., `accelerate`, `script:PATH` of the repository
    at `root`), None if unknown."""
    if command == "train":
        from hf_graft.config import DataArguments, GraftingConfig

        names = {f.name for cls in (DataArguments, GraftingConfig) for f in dataclasses.fields(cls) if f.init}
        return frozenset(f"--{n}" for n in names | {"help"}) | frozenset(f"--{n.replace('_', '-')}" for n in names)
    if command in HF_GRAFT_SUBCOMMANDS:
        import importlib

        try:
            module = importlib.import_module(f"hf_graft.cli.{command}")
        except ImportError:
            return None
        build_parser = getattr(module, "build_parser", None)
        return _flags_in_help(build_parser()) if build_parser else frozenset({"--help"})
    if command == "hf-graft":
        return frozenset({"--help"})
    if command == "accelerate":
        return frozenset(ACCELERATE_FLAGS) | frozenset(f.replace("_", "-") for f in ACCELERATE_FLAGS)
    if command == "torchrun":
        return frozenset(TORCHRUN_FLAGS)
    if command == "docker":  # the image's entry point is `accelerate launch`: what follows the image is its
        return frozenset(DOCKER_FLAGS) | command_flags("accelerate")
    if command in ("pytest", "pip"):
        return frozenset(PYTEST_FLAGS if command == "pytest" else PIP_FLAGS)
    if command.startswith("script:"):
        path = command.removeprefix("script:")
        if path in TRAINING_SCRIPTS:
            return command_flags("train")
        source = (root / path).read_text() if (root / path).is_file() else None
        return None if source is None else frozenset(FLAG_IN_TEXT.findall(source))
    return None


def _tokens(command_line: str) -> list[str]:
    try:
        return shlex.split(command_line, comments=True)
    except ValueError:  # unbalanced quotes in a prose example: whitespace is enough to find the flags
        return command_line.split()


def split_command(command_line: str) -> list[tuple[str, list[str]]]:
    """[(command, its arguments)] for one shell command line: `accelerate launch --config_file F -m
    hf_graft.train R --x 1` -> [("accelerate", ["--config_file", "F"]), ("train", ["R", "--x", "1"])]."""
    parts = []
    for simple in re.split(r"&&|\|\||;|\|", command_line):
        tokens = [t for t in _tokens(simple.strip().removeprefix("$ ")) if t != "\\"]
        while tokens and re.match(r"^[A-Za-z_]\w*=", tokens[0]):  # VAR=value before the program
            tokens = tokens[1:]
        if tokens:
            parts.extend(_split_program(tokens))
    return parts


def _after_module_or_script(launcher: str, tokens: list[str]) -> list[tuple[str, list[str]]]:
    """A launcher's own arguments, then the module (`-m X`) or script (`x.py`) it runs with the rest."""
    for i, token in enumerate(tokens):
        if token in ("-m", "--module") and i + 1 < len(tokens):
            module = tokens[i + 1]
            return [(launcher, tokens[:i]), (MODULE_COMMANDS.get(module, f"module:{module}"), tokens[i + 2:])]
        if token.endswith(".py") and not token.startswith("-"):
            return [(launcher, tokens[:i]), (f"script:{token.removeprefix('./')}", tokens[i + 1:])]
    return [(launcher, tokens)]


def _split_program(tokens: list[str]) -> list[tuple[str, list[str]]]:
    program, rest = Path(tokens[0]).name, tokens[1:]
    if re.fullmatch(r"python(3(\.\d+)?)?", program):
        rest = [t for t in rest if t not in ("-u", "-O", "-B")]
        return _after_module_or_script("python", rest)[1:] or [("python", rest)]
    if program == "hf-graft":
        if rest and rest[0] in HF_GRAFT_SUBCOMMANDS:
            return [(rest[0], rest[1:])]
        return [("hf-graft", rest)]
    if program in ("accelerate", "torchrun", "docker"):
        return _after_module_or_script(program, rest[1:] if program == "accelerate" and rest[:1] == ["launch"] else rest)
    if program in ("pytest", "pip"):
        return [(program, rest)]
    if "/" in tokens[0] and tokens[0].endswith((".sh", ".py")):
        return [(f"script:{tokens[0].removeprefix('./')}", rest)]
    return [(f"program:{program}", rest)]


def looks_like_a_command(text: str) -> bool:
    first = next(iter(_tokens(text)), "")
    return (re.fullmatch(r"(python(3(\.\d+)?)?|hf-graft|accelerate|torchrun|docker|pytest|pip)", Path(first).name)
            is not None or bool(re.match(r"^[A-Za-z_]\w*=\S*\s", text)) or (
                "/" in first and first.endswith((".py", ".sh"))))


# ----------------------------------------------------------------------------- reading a Markdown file
def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@dataclass
class Page:
    """A Markdown file split into prose lines and fenced code blocks."""

    path: Path
    prose: list[tuple[int, str]]  # (line number, text)
    blocks: list[tuple[int, str, list[str]]]  # (line number of the fence, language, lines)

    @classmethod
    def read(cls, path: Path) -> "Page":
        prose, blocks, fence = [], [], None
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            match = FENCE.match(line)
            if fence is None and match:
                fence, language = match.group(1), match.group(2).lower()
                blocks.append((number, language, []))
            elif fence is not None and line.strip().startswith(fence[0] * len(fence)) and not line.strip(fence[0]).strip():
                fence = None
                prose.append((number, ""))  # a block ends a paragraph
            elif fence is not None:
                blocks[-1][2].append(line)
            else:
                prose.append((number, line))
        return cls(path, prose, blocks)

    def paragraphs(self) -> list[tuple[int, str]]:
        """(first line number, text) of each paragraph of prose: a heading, a list item or a table row
        starts one, a blank line or a code block ends one."""
        paragraphs: list[tuple[int, list[str]]] = []
        previous = (0, "")  # the line before, and its number
        for number, line in self.prose:
            continues = (line.strip() and previous[1].strip() and number == previous[0] + 1
                         and not HEADING.match(line) and not NEW_PARAGRAPH.match(line) and not HEADING.match(previous[1]))
            if continues:
                paragraphs[-1][1].append(line)
            elif line.strip():
                paragraphs.append((number, [line]))
            previous = (number, line)
        return [(number, "\n".join(lines)) for number, lines in paragraphs]

    def anchors(self) -> set[str]:
        """The headings' anchors; a repeated heading gets -1, -2, ... as on GitHub."""
        anchors, seen = set(), {}
        for _, line in self.prose:
            match = HEADING.match(line)
            if match:
                slug = github_slug(match.group(2))
                anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
                seen[slug] = seen.get(slug, 0) + 1
        return anchors


@dataclass
class Checker:
    root: Path

    def check(self, path: Path) -> list[str]:
        page = Page.read(path)
        where = path.relative_to(self.root)
        problems = [f"{where}:{n}: {p}" for n, p in self._links(page)]
        problems += [f"{where}:{n}: {p}" for n, p in self._recipes(page)]
        problems += [f"{where}:{n}: {p}" for n, p in self._flags(page)]
        return problems

    # --- links
    def _links(self, page: Page):
        for start, text in page.paragraphs():
            without_code = INLINE_CODE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)  # offsets kept
            targets = [(m.start(), m.group(1)) for m in LINK.finditer(without_code)]
            for offset, line in _line_offsets(without_code):
                reference = REFERENCE_LINK.match(line)
                if reference:
                    targets.append((offset, reference.group(1)))
            for offset, target in targets:
                problem = self._link_problem(page.path, target)
                if problem:
                    yield start + without_code.count("\n", 0, offset), problem

    def _link_problem(self, source: Path, target: str) -> str | None:
        if not target or re.match(r"^[A-Za-z][\w+.-]*:", target):  # a URL (https:, mailto:) is not checked here
            return None
        file_part, _, anchor = target.partition("#")
        resolved = (source.parent / file_part).resolve() if file_part else source.resolve()
        if not resolved.is_relative_to(self.root.resolve()):
            return f"link {target!r} leaves the repository"
        if not resolved.exists():
            return f"link {target!r}: no such file or folder"
        if anchor:
            if resolved.suffix != ".md" or not resolved.is_file():
                return f"link {target!r}: an anchor into something other than a Markdown file"
            if anchor not in Page.read(resolved).anchors():
                return f"link {target!r}: no heading with the anchor #{anchor} in {resolved.relative_to(self.root.resolve())}"
        return None

    # --- recipe paths
    def _recipes(self, page: Page):
        lines = page.prose + [(start + i + 1, text) for start, _, block in page.blocks for i, text in enumerate(block)]
        for number, line in lines:
            for match in RECIPE_PATH.finditer(line):
                for path in expand_braces(match.group(0)):
                    if not (self.root / path).is_file():
                        yield number, f"recipe {path} does not exist"

    # --- flags
    def _flags(self, page: Page):
        block_context: dict[int, set[str]] = {}  # heading level -> the commands of that section's last shell block
        level = 0
        shell_blocks = [(n, "block", lines) for n, language, lines in page.blocks if language in SHELL_LANGUAGES]
        events = sorted([(n, "paragraph", text) for n, text in page.paragraphs()] + shell_blocks,
                        key=lambda event: event[0])
        for number, kind, content in events:
            if kind == "block":
                commands = set()
                for offset, command_line in join_continued_lines(content):
                    for command, arguments in split_command(command_line):
                        commands.add(command)
                        for problem in self._argument_problems(command, arguments):
                            yield number + 1 + offset, problem
                block_context = {k: v for k, v in block_context.items() if k < level} | {level: commands}
                continue
            heading = HEADING.match(content)
            if heading:
                level = len(heading.group(1))
                block_context = {k: v for k, v in block_context.items() if k < level}
            paragraph_context = None
            for match in INLINE_CODE.finditer(content):
                line = number + content.count("\n", 0, match.start())
                span = " ".join(match.group(2).split())
                if looks_like_a_command(span):
                    commands = split_command(span)
                    for command, arguments in commands:
                        for problem in self._argument_problems(command, arguments):
                            yield line, problem
                    paragraph_context = {command for command, _ in commands}
                    continue
                context = paragraph_context or (block_context[max(block_context)] if block_context else {"train"})
                for flag in (t.split("=")[0] for t in _tokens(span) if FLAG.match(t)):
                    if flag not in PLACEHOLDERS and not any(self.accepts(c, flag) for c in context):
                        yield line, f"{flag}: not a flag of {' or '.join(sorted(context))}"

    def accepts(self, command: str, flag: str) -> bool:
        flags = command_flags(command, self.root)
        return flags is not None and flag.split("=")[0] in flags

    def _argument_problems(self, command: str, arguments: list[str]):
        flags = [a.split("=")[0] for a in arguments if FLAG.match(a)]
        if not flags:
            return
        if command_flags(command, self.root) is None:
            yield f"{flags[0]}: a flag of {command}, a command this check does not know"
            return
        for flag in flags:
            if not self.accepts(command, flag) and flag not in PLACEHOLDERS:
                yield f"{flag}: not a flag of {command}"


def _line_offsets(text: str) -> list[tuple[int, str]]:
    offsets, position = [], 0
    for line in text.split("\n"):
        offsets.append((position, line))
        position += len(line) + 1
    return offsets


def join_continued_lines(lines: list[str]) -> list[tuple[int, str]]:
    """(offset of the first line, the command) with `\\` continuations joined and comment lines dropped."""
    commands, current, first = [], "", 0
    for offset, line in enumerate(lines):
        if not current:
            first = offset
        stripped = line.rstrip()
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        if current.strip() and not current.lstrip().startswith("#"):
            commands.append((first, current))
        current = ""
    if current.strip():
        commands.append((first, current))
    return commands


def expand_braces(text: str) -> list[str]:
    """Shell brace expansion: `a{1,2}b` -> `a1b`, `a2b`."""
    match = re.search(r"\{([^{}]*,[^{}]*)\}", text)
    if not match:
        return [text]
    return list(itertools.chain.from_iterable(
        expand_braces(text[:match.start()] + option + text[match.end():]) for option in match.group(1).split(",")))


def documentation_files(root: Path = ROOT) -> list[Path]:
    files = [root / "README.md", *sorted((root / "docs").rglob("*.md"))]
    return files + ([root / "recipes" / "README.md"] if (root / "recipes" / "README.md").is_file() else [])
