"""One run in one output folder: the folder claim and lock, checkpoints, preflight checks, and the results a run reports."""
