"""A selector that imports fine and kills its interpreter with SIGSEGV when it selects ranks."""
import ctypes

from rankbench import Selector, hookimpl


class Segfault(Selector):
    name = "segfault"
    description = "crashes the process that runs it"

    def select(self, problem):
        ctypes.string_at(0)


@hookimpl
def rankbench_register_selectors(register):
    register(Segfault)
