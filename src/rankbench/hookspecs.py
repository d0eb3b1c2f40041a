"""The hooks a plugin implements, and the marker it implements them with (``hookimpl``, re-exported as
``rankbench.hookimpl``). Each register hook receives a ``register`` callback and calls it once per plugin class.

A plugin module (an entry point in group ``rankbench``, or a loose ``*.py`` file in ``--plugins-dir``) implements
one or more of these with ``@rankbench.hookimpl``::

    from rankbench import hookimpl, Selector

    class MySelector(Selector):
        name = "my-selector"
        ...

    @hookimpl
    def rankbench_register_selectors(register):
        register(MySelector)

Built-in plugins use exactly these hooks, through the same entry-point group.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("rankbench")
hookimpl = pluggy.HookimplMarker("rankbench")


@hookspec
def rankbench_register_tasks(register):
    """Register ``Task`` subclasses: ``register(TaskClass)``."""


@hookspec
def rankbench_register_selectors(register):
    """Register ``Selector`` subclasses: ``register(SelectorClass)``."""


@hookspec
def rankbench_register_factorizations(register):
    """Register ``Factorization`` subclasses (recovery solvers included): ``register(FactorizationClass)``."""


@hookspec
def rankbench_register_executors(register):
    """Register ``Executor`` subclasses: ``register(ExecutorClass)``."""


@hookspec
def rankbench_environment_info():
    """Return a dict of extra environment facts to store with each run (e.g. a library's version)."""
