"""Command lines: `hf-graft train | export | analyze | evaluate` and `python -m hf_graft.train`."""
