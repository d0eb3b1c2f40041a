"""Files in and out. ``read_yaml_mapping``: the one reader of YAML input files (suites, claims), with one style of
error. ``atomic_write``: the one way rankbench (host and plugins) puts a file where a reader, a resume or another
process may look. The content goes to a hidden temporary file beside the target (same filesystem), is flushed and
fsynced, and is renamed over the target (``os.replace`` is atomic on POSIX): a reader sees the old file or the new
one, never half of one, and a crash leaves at most a hidden temporary file, which readers (pandas, pyarrow, DuckDB)
ignore."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

CACHE_ENV = "RANKBENCH_CACHE"


def cache_root() -> Path:
    """The folder of everything rankbench caches across runs ($RANKBENCH_CACHE, default ~/.cache/rankbench)."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "rankbench"))


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object] | bytes | str) -> Path:
    """Write ``path`` atomically. ``write`` is the content (bytes, or text as UTF-8) or a function that writes into
    the open binary file it is given. Parent folders are created. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as handle:
            if callable(write):
                write(handle)
            else:
                handle.write(write.encode("utf-8") if isinstance(write, str) else write)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class InputFileError(ValueError):
    """A YAML input file that cannot be used: ``where`` (a line and column, or "") and ``message`` ("expected ...")."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}" if where else message)
        self.where, self.message = where, message


MAX_INPUT_BYTES = 1_000_000  # a suite or claims file; the shipped ones are < 10 kB
MAX_INPUT_NODES = 200_000  # scalars, sequences and mappings of the document with every alias expanded


def excerpt(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: what an error message may quote of the user's input."""
    return cut(repr(value), limit)


def cut(text: str, limit: int = 120) -> str:
    """``text`` cut to ``limit`` characters (an error message's quote of something the user wrote)."""
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


def _strict_loader(text: str):
    """A safe YAML loader whose mappings refuse duplicate keys (PyYAML keeps the last one silently)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        pass

    def construct_mapping(loader, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base constructor explains it
                break
            if first is not None:
                raise InputFileError(
                    f"line {key_node.start_mark.line + 1}",
                    f"expected each key once in a mapping (duplicate key {excerpt(key, 40)}, first on line "
                    f"{first.start_mark.line + 1})")
            seen[key] = key_node
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return StrictLoader(text)


def _expanded_size(root) -> int:
    """Nodes of the YAML node graph with aliases expanded, counted without expanding them (an alias bomb of a few
    hundred bytes expands to billions of nodes)."""
    import yaml

    sizes: dict[int, int] = {}
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        children = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        if children_done or not children:
            sizes[id(node)] = min(1 + sum(sizes.get(id(c), 0) for c in children), 10 * MAX_INPUT_NODES)
            continue
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes.get(id(root), 0)


def read_yaml_mapping(path: str | os.PathLike, what: str, mapping: str) -> dict:
    """The YAML mapping in ``path`` (a suite, a claims file, ...), or an ``InputFileError`` saying what was expected:
    ``what`` names the file ("a suite file"), ``mapping`` the keys its top level should have. Refused as well: files
    over ``MAX_INPUT_BYTES``, documents over ``MAX_INPUT_NODES`` nodes once aliases are expanded, and duplicate keys
    (named with both lines). Messages quote at most a short excerpt of the input."""
    import yaml

    try:
        size = os.path.getsize(path)
        if size > MAX_INPUT_BYTES:
            raise InputFileError("", f"expected {what} of at most {MAX_INPUT_BYTES:,} bytes (got {size:,})")
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputFileError("", f"expected {what} (no such file)") from None
    except IsADirectoryError:
        raise InputFileError("", f"expected {what} (got a folder)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFileError("", f"expected a readable file ({cut(str(exc))})") from None
    loader = _strict_loader(text)
    try:
        root = loader.get_single_node()
        nodes = _expanded_size(root) if root is not None else 0
        if nodes > MAX_INPUT_NODES:
            capped = "over " if nodes >= 10 * MAX_INPUT_NODES else ""
            raise InputFileError("", f"expected {what} of at most {MAX_INPUT_NODES:,} values once aliases are "
                                     f"expanded (this one expands to {capped}{nodes:,})")
        data = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise InputFileError(where, f"expected valid YAML ({cut(problem)})") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise InputFileError("", f"expected a mapping with {mapping}")
    return data


class FolderBusy(RuntimeError):
    """Another live process holds the folder's lock; the message names it."""


class FolderLock:
    """An exclusive OS lock (``fcntl.flock``) on ``FOLDER/.lock`` for as long as the ``with`` block runs. The kernel
    releases it when its holder dies in any way (kill -9 included), so a stale lock never blocks; the file keeps the
    holder's pid, host and start time only to name it in the ``FolderBusy`` message of a second taker."""

    def __init__(self, folder: str | os.PathLike, what: str = "a `bench run`"):
        self.path, self.what, self.fd = Path(folder) / ".lock", what, None

    def __enter__(self) -> FolderLock:
        if self.fd is None:
            self.acquire()
        return self

    def acquire(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode("utf-8", "replace")
            os.close(fd)
            try:
                info = json.loads(holder)
                who = f"pid {info['pid']} on {info['host']}, started {info['started']}"
            except (ValueError, KeyError, TypeError):
                who = "another process"
            raise FolderBusy(f"{self.path.parent}: in use by {self.what} ({who}); wait for it or choose another "
                             f"--out") from None
        os.ftruncate(fd, 0)
        stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": stamp}).encode())
        os.fsync(fd)
        self.fd = fd

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None
