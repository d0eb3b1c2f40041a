"""Atomic file writes: the one way rankbench (host and plugins) puts a file where a reader, a resume or another
process may look. The content goes to a hidden temporary file beside the target (same filesystem), is flushed and
fsynced, and is renamed over the target (``os.replace`` is atomic on POSIX): a reader sees the old file or the new
one, never half of one, and a crash leaves at most a hidden temporary file, which readers (pandas, pyarrow, DuckDB)
ignore."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


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
