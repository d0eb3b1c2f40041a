"""The plugin host: discovers plugins, isolates their failures, and keeps a registry of plugin classes.

Load order (simonw/llm and datasette do the same):
1. every entry point in group ``rankbench`` -- the built-ins are registered this way too;
2. every ``*.py`` file in ``--plugins-dir`` (sorted by name).

``RANKBENCH_LOAD_PLUGINS`` (comma-separated entry-point names, distribution names or plugin-file stems) restricts
which of those load; set to the empty string it loads none. ``RANKBENCH_TRACE_PLUGINS=1`` logs every hook call
(pluggy's tracing, on stderr), the register hooks included.

A third-party plugin module (an entry point of another distribution, a ``--plugins-dir`` file) is first imported in
a throwaway child interpreter (``rankbench.import_probe``, verdicts cached per code): one that segfaults, exits or
hangs at import becomes a load failure with that reason instead of taking the host down. A plugin that fails to
import, implements a hook that has no spec (a typo such as ``rankbench_register_selector``),
raises inside its register hook, or registers something that is not a valid plugin class (not a subclass of the
kind's base, no ``name``, a name already taken, an abstract class), is recorded in ``Registry.failures`` -- shown
by ``bench plugins`` -- and skipped. It never takes the host down.

How the register hooks are called: every call goes through pluggy's hook callers, so tracing (and any hook-call
monitoring) sees it -- but not as one ``pm.hook.rankbench_register_selectors(register=...)`` for all plugins at
once. That single call would stop at the first plugin that raises (the later ones would never register), and a
shared ``register`` callback could only guess which plugin hands it a class (a class's module need not be the
plugin's: a plugin may register classes it imports). Instead, for each plugin that implements a register hook,
the host calls ``pm.subset_hook_caller(hook, remove_plugins=<every other plugin>)`` -- pluggy's caller of that
hook restricted to that one plugin -- with a ``register`` callback bound to that plugin (``_Register``). So each
registered class's origin (distribution, version, entry point or file) is the calling plugin's, known without
guessing; an exception is that plugin's alone (a ``LoadFailure`` naming it, and the next plugin is called); and
the trace shows one call per plugin, its ``register`` argument naming the plugin.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import importlib.util
import inspect
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pluggy

from rankbench import hookspecs
from rankbench.api import Executor, Factorization, Plugin, Selector, Task
from rankbench.import_probe import OK, fingerprint_file, probe_imports

ENTRY_POINT_GROUP = "rankbench"
HOST_DISTRIBUTION = "rankbench"  # its built-in plugins ship with the host: imported directly, not probed
LOAD_ENV = "RANKBENCH_LOAD_PLUGINS"
TRACE_ENV = "RANKBENCH_TRACE_PLUGINS"

# kind -> (register hook, required base class)
KINDS: dict[str, tuple[str, type[Plugin]]] = {
    "task": ("rankbench_register_tasks", Task),
    "selector": ("rankbench_register_selectors", Selector),
    "factorization": ("rankbench_register_factorizations", Factorization),
    "executor": ("rankbench_register_executors", Executor),
}


@dataclasses.dataclass
class PluginInfo:
    name: str
    kind: str
    cls: type[Plugin]
    distribution: str
    dist_version: str
    source: str  # entry point "name = module" or the loose file's path
    code_hash: str

    @property
    def version(self) -> str:
        """What goes into cell ids: the plugin's declared version and a hash of the file that defines it."""
        return f"{self.cls.version}+{self.code_hash}"


@dataclasses.dataclass
class LoadFailure:
    plugin: str
    distribution: str
    error: str


@dataclasses.dataclass
class Registry:
    plugins: dict[str, dict[str, PluginInfo]] = dataclasses.field(default_factory=lambda: {kind: {} for kind in KINDS})
    failures: list[LoadFailure] = dataclasses.field(default_factory=list)
    plugins_dir: str | None = None
    hook: object = None  # pluggy's hook relay, for hooks the host calls directly (environment info)

    def get(self, kind: str, name: str) -> PluginInfo:
        return self.plugins[kind][name]

    def names(self, kind: str) -> list[str]:
        return sorted(self.plugins[kind])

    def all(self) -> list[PluginInfo]:
        return [info for kind in KINDS for info in sorted(self.plugins[kind].values(), key=lambda i: i.name)]

    def default_executor(self) -> str:
        """The name of the one registered executor that declares itself the default (``Executor.default``); raises
        ``LookupError`` when none or several do."""
        claims = sorted(name for name, info in self.plugins["executor"].items() if info.cls.default)
        if len(claims) == 1:
            return claims[0]
        if claims:
            raise LookupError(f"several executors declare themselves the default ({', '.join(claims)})")
        loaded = ", ".join(self.names("executor")) or "none loaded"
        raise LookupError(f"no registered executor declares itself the default (executors: {loaded})")


@functools.lru_cache(maxsize=None)
def file_hash(path: str) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
    except OSError:
        return "unknown"


# Host modules whose code is part of a plugin's behaviour (the problem-kind protocols and their numerics): hashed
# into a plugin's code hash like the plugin's own helpers.
HASHED_HOST_PACKAGE = "rankbench.kinds"


def code_hash(cls: type) -> str:
    """Hash of the file defining ``cls`` and of every module it imports, transitively, of the same top-level package
    or of ``rankbench.kinds`` (the protocols and numerics every method runs through) -- so editing a shared helper
    module or a protocol also changes the plugin's cell ids. Imports are read from the source (at the top and inside
    functions alike) and located without importing them: plugins import their heavy modules lazily, and what a cell
    runs must be hashed whether or not this process has imported it yet."""
    root_module = sys.modules.get(cls.__module__)
    if root_module is None or getattr(root_module, "__file__", None) is None:
        return "unknown"
    package = cls.__module__.split(".")[0]

    def hashed(name: str) -> bool:
        return name.split(".")[0] == package or name == HASHED_HOST_PACKAGE or name.startswith(HASHED_HOST_PACKAGE + ".")

    seen: dict[str, str] = {}
    stack = [(cls.__module__, root_module.__file__)]
    while stack:
        name, path = stack.pop()
        if name in seen:
            continue
        seen[name] = file_hash(path)
        for imported in _imported_modules(path):
            if hashed(imported) and imported not in seen:
                origin = _module_file(imported)
                if origin is not None:
                    stack.append((imported, origin))
    digest = hashlib.sha256("".join(f"{k}={v};" for k, v in sorted(seen.items())).encode())
    return digest.hexdigest()[:12]


@functools.lru_cache(maxsize=None)
def _imported_modules(path: str) -> tuple[str, ...]:
    """Every module a source file imports anywhere in it: ``import a.b`` gives a.b; ``from a import b`` gives a and,
    where a.b is itself a module, a.b (resolved by ``_module_file``)."""
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return ()
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names.extend(f"{node.module}.{alias.name}" for alias in node.names)
    return tuple(dict.fromkeys(names))


@functools.lru_cache(maxsize=None)
def _module_file(name: str) -> str | None:
    """The source file of module ``name``, found on disk without importing it or its parents (importing a parent
    could import torch; None: not a module, e.g. ``package.module.ClassName``)."""
    top, *parts = name.split(".")
    try:
        spec = importlib.util.find_spec(top)  # a top-level name is located, not imported
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.has_location:
        return None
    origin, folders = spec.origin, list(spec.submodule_search_locations or [])
    for part in parts:
        for folder in folders:
            package, module = Path(folder) / part / "__init__.py", Path(folder) / f"{part}.py"
            if package.is_file():
                origin, folders = str(package), [str(package.parent)]
                break
            if module.is_file():
                origin, folders = str(module), []
                break
        else:
            return None
    return origin


def _allowed() -> set[str] | None:
    value = os.environ.get(LOAD_ENV)
    if value is None:
        return None
    return {item.strip() for item in value.split(",") if item.strip()}


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()


class _Loader:
    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.registry = Registry()
        self.origin: dict[str, tuple[str, str, str]] = {}  # pluggy plugin name -> (distribution, version, source)
        if os.environ.get(TRACE_ENV):
            self.pm.trace.root.setwriter(lambda message: print(message, end="", file=sys.stderr))
            self.pm.enable_tracing()

    def add_module(self, plugin_name: str, module: object, distribution: str, version: str, source: str) -> None:
        try:
            self.pm.register(module, name=plugin_name)
        except Exception as exc:  # PluginValidationError: a hook with a wrong signature
            self.registry.failures.append(LoadFailure(plugin_name, distribution, _describe(exc)))
            return
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(module)
            self.registry.failures.append(LoadFailure(plugin_name, distribution, f"hook without a spec: {exc}"))
            return
        self.origin[plugin_name] = (distribution, version, source)

    def load_entry_points(self, allowed: set[str] | None) -> None:
        chosen = []
        for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist else "unknown"
            if allowed is not None and ep.name not in allowed and dist not in allowed:
                continue
            if not self.pm.has_plugin(ep.name):
                chosen.append(ep)
        foreign = [ep for ep in chosen if not ep.dist or ep.dist.name != HOST_DISTRIBUTION]
        verdicts = probe_imports([
            ("module", ep.module, f"{ep.dist.name if ep.dist else ''}=={ep.dist.version if ep.dist else ''}:"
                                  f"{ep.value}".encode() if ep.dist else None)
            for ep in foreign
        ]) if foreign else {}
        for ep in chosen:
            dist = ep.dist.name if ep.dist else "unknown"
            version = ep.dist.version if ep.dist else ""
            if verdicts.get(ep.module, OK) != OK:
                self.registry.failures.append(LoadFailure(ep.name, dist, f"import failed: {verdicts[ep.module]}"))
                continue
            try:
                module = ep.load()
            except BaseException as exc:  # a plugin may even call sys.exit at import
                if isinstance(exc, KeyboardInterrupt):
                    raise
                self.registry.failures.append(LoadFailure(ep.name, dist, f"import failed: {_describe(exc)}"))
                continue
            self.add_module(ep.name, module, dist, version, f"{ep.name} = {ep.value}")

    def load_directory(self, directory: Path, allowed: set[str] | None) -> None:
        self.registry.plugins_dir = str(directory)
        paths = [p for p in sorted(directory.glob("*.py")) if allowed is None or p.stem in allowed]
        verdicts = probe_imports([("file", str(p), fingerprint_file(p)) for p in paths]) if paths else {}
        for path in paths:
            if verdicts.get(str(path), OK) != OK:
                self.registry.failures.append(
                    LoadFailure(path.name, "(plugins-dir)", f"import failed: {verdicts[str(path)]}"))
                continue
            module_name = f"rankbench_local_plugins.{path.stem}"
            try:
                spec = importlib.util.spec_from_file_location(module_name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[module_name] = module
                spec.loader.exec_module(module)
            except BaseException as exc:
                if isinstance(exc, KeyboardInterrupt):
                    raise
                sys.modules.pop(module_name, None)
                self.registry.failures.append(
                    LoadFailure(path.name, "(plugins-dir)", f"import failed: {_describe(exc)}")
                )
                continue
            self.add_module(path.stem, module, "(plugins-dir)", file_hash(str(path)), str(path))

    def collect(self) -> None:
        """Call every plugin's register hooks, one plugin at a time (see the module docstring)."""
        for kind, (hook_name, base) in KINDS.items():
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():  # registration order
                others = [plugin for plugin in self.pm.get_plugins() if plugin is not impl.plugin]
                call = self.pm.subset_hook_caller(hook_name, remove_plugins=others)
                try:
                    call(register=_Register(self, kind, base, impl.plugin_name))
                except Exception as exc:
                    distribution = self.origin[impl.plugin_name][0]
                    self.registry.failures.append(
                        LoadFailure(impl.plugin_name, distribution, f"{hook_name} raised {_describe(exc)}")
                    )

    def _register_class(self, kind: str, base: type[Plugin], cls: object, plugin_name: str) -> None:
        """Add ``cls`` to the registry as a ``kind`` plugin from pluggy plugin ``plugin_name``; raises (in the
        plugin's register hook, so it becomes that plugin's ``LoadFailure``) when ``cls`` is no valid plugin."""
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise TypeError(f"{cls!r} is not a subclass of rankbench.{base.__name__}")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{cls.__name__} has no `name`")
        known = self.registry.plugins[kind].get(name)
        if known is not None and known.cls is not cls:
            raise ValueError(f"{kind} name {name!r} is already registered by {known.source}")
        if inspect.isabstract(cls):
            missing = ", ".join(sorted(cls.__abstractmethods__))
            raise TypeError(f"{cls.__name__} is abstract: it does not implement {missing}")
        distribution, dist_version, source = self.origin[plugin_name]
        self.registry.plugins[kind][name] = PluginInfo(
            name, kind, cls, distribution, dist_version, source, code_hash(cls)
        )


class _Register:
    """The ``register`` callback handed to one plugin's register hook for one kind: it knows the plugin it serves
    (so the registry records where each class came from), and says so in a trace."""

    def __init__(self, loader: _Loader, kind: str, base: type[Plugin], plugin_name: str) -> None:
        self.loader, self.kind, self.base, self.plugin_name = loader, kind, base, plugin_name

    def __call__(self, cls: object) -> None:
        self.loader._register_class(self.kind, self.base, cls, self.plugin_name)

    def __repr__(self) -> str:
        return f"<register {self.kind} classes of plugin {self.plugin_name!r}>"


def load_plugins(plugins_dir: str | os.PathLike | None = None) -> Registry:
    loader = _Loader()
    allowed = _allowed()
    loader.load_entry_points(allowed)
    if plugins_dir is not None:
        loader.load_directory(Path(plugins_dir), allowed)
    loader.collect()
    loader.registry.hook = loader.pm.hook
    return loader.registry
