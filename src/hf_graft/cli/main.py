"""`hf-graft` console script: train | export | analyze | evaluate | env."""

from __future__ import annotations

import sys
from typing import Sequence

USAGE = """usage: hf-graft <command> [args]

commands:
  train RECIPE.yaml [--field value ...]   train a grafted population (same as python -m hf_graft.train;
                                          TRL's spelling works too: train --config RECIPE.yaml)
  export CHECKPOINT_DIR --member K --out FOLDER [--overwrite] [--push_to_hub REPO]
                                          write one member of a training checkpoint as a timm/transformers model
  analyze PATH [PATH ...] [--reference PATH] [--json F] [--plot F]
                                          filter statistics (invalid filters, entropy) of models or checkpoints
  evaluate MODEL --dataset_name NAME [--split S] [--extra_metrics M ...] [--json F]
                                          top-1/top-5 (and evaluate metrics) of a model or checkpoint member
  evaluate MODEL --task reid --dataset_name market1501 --data_dir DIR [--json F]
                                          mAP and CMC rank-k of a re-identification model's features
  env                                     the versions a bug report needs

Every flag is --field_name (or --field-name); `hf-graft <command> --help` lists them. --debug (or
HF_GRAFT_DEBUG=1) prints the traceback of a refusal too.
"""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from hf_graft.cli.train import main as run
    elif command == "export":
        from hf_graft.cli.export import main as run
    elif command == "analyze":
        from hf_graft.cli.analyze import main as run
    elif command == "evaluate":
        from hf_graft.cli.evaluate import main as run
    elif command == "env":
        from hf_graft.cli.env import main as run
    else:
        print(f"hf-graft: unknown command {command!r}; allowed: train, export, analyze, evaluate, env", file=sys.stderr)
        return 2
    return run(rest)


if __name__ == "__main__":
    raise SystemExit(main())
