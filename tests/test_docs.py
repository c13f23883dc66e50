"""The documentation is true to the repository (README.md, docs/**/*.md, recipes/README.md): links,
anchors, recipe paths and command-line flags, as `tests/_docs_checker.py` reads them; and the checker
itself finds what is broken."""

from __future__ import annotations

import re

import pytest

from _docs_checker import LINK, ROOT, Checker, Page, documentation_files, github_slug, split_command


# ----------------------------------------------------------------------------- the repository's documentation
@pytest.mark.parametrize("path", documentation_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_documentation_is_true_to_the_repository(path):
    problems = Checker(ROOT).check(path)
    assert problems == [], "\n".join(problems)


def test_every_page_of_docs_is_reachable_from_the_index():
    index = Page.read(ROOT / "docs" / "index.md")
    linked = {(ROOT / "docs" / m.group(1).partition("#")[0]).resolve()
              for _, text in index.paragraphs() for m in LINK.finditer(text) if not re.match(r"^\w+:", m.group(1))}
    pages = {p.resolve() for p in (ROOT / "docs").rglob("*.md")} - {(ROOT / "docs" / "index.md").resolve()}
    assert sorted(str(p.relative_to(ROOT.resolve())) for p in pages - linked) == []


def test_readme_keeps_the_two_commands_byte_for_byte():
    readme = (ROOT / "README.md").read_text()
    quickstart = ("pip install torch==2.14.1 torchvision==0.29.1 && pip install -e . && "
                  "python -m hf_graft.train recipes/quickstart.yaml")
    suite = ("pip install torch==2.14.1 torchvision==0.29.1 && pip install -e \".[test]\" && "
             "HF_HUB_OFFLINE=1 python -m pytest -n 2")
    assert f"\n{quickstart}\n" in readme and f"\n{suite}\n" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"\n{suite}\n" in ci  # CI runs the README's second command as written
    assert len(readme.splitlines()) <= 200


# ----------------------------------------------------------------------------- the check itself can fail
BAD_PAGE = """# Title

## Running

See [the method](method.md#2-the-information-of-a-layer) and [gone](missing.md), [bad anchor](#no-such-heading),
[fine](#running) and [outside](../../etc/passwd).

```bash
python -m hf_graft.train recipes/quickstart.yaml --num_studnets 3
accelerate launch --config_file recipes/accelerate/1node_8gpu_bf16.yaml --no_such_accelerate_flag -m hf_graft.train recipes/nope.yaml
hf-graft export out/run/checkpoint-10 --member 1 --out student --push-to-hub user/m --colour
```

Then `--output_dir` is fine here, `--outptu_dir` is not; `hf-graft evaluate M --dataset_name x --no_such`.
Recipes `recipes/cifar{10,100}_resnet56_grafting.yaml` exist, `recipes/cifar{10,1000}_resnet56_baseline.yaml` not.

## Export

```bash
hf-graft export out/run/checkpoint-10 --member 0 --out student
```

`--overwrite` belongs to export here, `--num_students` does not.
"""


def test_the_checker_finds_broken_links_unknown_flags_and_missing_recipes(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "recipes" / "accelerate").mkdir(parents=True)
    for name in ("quickstart.yaml", "cifar10_resnet56_grafting.yaml", "cifar100_resnet56_grafting.yaml",
                 "cifar10_resnet56_baseline.yaml", "accelerate/1node_8gpu_bf16.yaml"):
        (tmp_path / "recipes" / name).write_text("seed: 0\n")
    (tmp_path / "docs" / "method.md").write_text("# Method\n\n## 2. The information of a layer\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text(BAD_PAGE)

    problems = "\n".join(Checker(tmp_path).check(page))
    expected = [
        "link 'missing.md': no such file or folder",
        "link '#no-such-heading': no heading with the anchor #no-such-heading",
        "link '../../etc/passwd' leaves the repository",
        "--num_studnets: not a flag of train",
        "--no_such_accelerate_flag: not a flag of accelerate",
        "recipe recipes/nope.yaml does not exist",
        "--colour: not a flag of export",
        "--outptu_dir: not a flag of accelerate or export or train",
        "--no_such: not a flag of evaluate",
        "recipe recipes/cifar1000_resnet56_baseline.yaml does not exist",
        "--num_students: not a flag of export",
    ]
    for message in expected:
        assert message in problems
    assert len(problems.splitlines()) == len(expected), problems  # and nothing else: the good ones pass
    assert "method.md#2-the-information-of-a-layer" not in problems and "--output_dir" not in problems.replace(
        "--outptu_dir", "")


def test_github_slugs():
    assert github_slug("Grafting+ (teachers)") == "grafting-teachers"
    assert github_slug("2. The information of a layer (`information.py`)") == "2-the-information-of-a-layer-informationpy"
    assert github_slug("Output folders, checks and failures") == "output-folders-checks-and-failures"
    assert github_slug("`hf-graft export`") == "hf-graft-export"
    assert github_slug("data_on_device: the data on the GPU") == "data_on_device-the-data-on-the-gpu"


def test_repeated_headings_get_numbered_anchors(tmp_path):
    page = tmp_path / "x.md"
    page.write_text("# A\n\n## Notes\n\n## Notes\n\n```bash\n# Notes\n```\n")
    assert Page.read(page).anchors() == {"a", "notes", "notes-1"}


def test_split_command_finds_each_commands_arguments():
    line = "HF_HUB_OFFLINE=1 accelerate launch --num_processes 2 -m hf_graft.train r.yaml --seed 1 && pytest -q"
    assert split_command(line) == [("accelerate", ["--num_processes", "2"]), ("train", ["r.yaml", "--seed", "1"]),
                                   ("pytest", ["-q"])]
    assert split_command("python examples/finetune_pretrained.py --seed 1") == [
        ("script:examples/finetune_pretrained.py", ["--seed", "1"])]
    assert split_command("hf-graft analyze a b --json f.json") == [("analyze", ["a", "b", "--json", "f.json"])]
