"""A plugin that registers something that is not a Selector subclass."""
from rankbench import hookimpl


@hookimpl
def rankbench_register_selectors(register):
    register(dict)
