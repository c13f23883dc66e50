"""`python -m hf_graft.train RECIPE` / `accelerate launch -m hf_graft.train RECIPE` (see `hf_graft.cli.train`)."""

from hf_graft.cli.train import main, run_training  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
