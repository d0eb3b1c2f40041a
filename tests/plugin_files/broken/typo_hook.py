"""A plugin whose hook name has a typo (no such spec): reported and skipped."""
from rankbench import hookimpl


@hookimpl
def rankbench_register_selector(register):  # missing the final "s"
    pass
