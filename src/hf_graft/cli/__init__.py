"""Command lines: `hf-graft train | export | analyze | evaluate` and `python -m hf_graft.train`."""

from hf_graft.cli.main import main  # noqa: E402  (the console script of installs made before the cli package)

__all__ = ["main"]
