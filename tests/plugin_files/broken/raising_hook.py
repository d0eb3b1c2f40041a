"""A plugin whose register hook raises: reported and skipped."""
from rankbench import hookimpl


@hookimpl
def rankbench_register_selectors(register):
    raise RuntimeError("boom at registration")
