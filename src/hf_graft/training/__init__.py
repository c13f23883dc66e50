"""The Trainer side: `GraftingTrainer`, its callbacks, the per-member optimisation, and building a run from arguments."""
