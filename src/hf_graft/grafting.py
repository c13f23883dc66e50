"""Import path kept for user code: the graft lives in `hf_graft.graft`."""

from hf_graft.graft.grafting import *  # noqa: F401,F403
from hf_graft.graft.grafting import __all__  # noqa: F401
