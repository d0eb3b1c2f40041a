"""A plugin that registers a selector without ``select``: an abstract class, refused at registration."""
from rankbench import Selector, hookimpl


class HalfDone(Selector):
    name = "half-done"


@hookimpl
def rankbench_register_selectors(register):
    register(HalfDone)
