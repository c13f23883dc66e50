"""Import path kept for user code: the builder lives in `hf_graft.training.builder`."""

from hf_graft.training.builder import *  # noqa: F401,F403
from hf_graft.training.builder import __all__  # noqa: F401
