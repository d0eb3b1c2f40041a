"""Files in and out. ``read_yaml_mapping``: the one reader of YAML input files (suites, claims), with one style of
error. ``atomic_write``: the one way rankbench (host and plugins) puts a file where a reader, a resume or another
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


class InputFileError(ValueError):
    """A YAML input file that cannot be used: ``where`` (a line and column, or "") and ``message`` ("expected ...")."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}" if where else message)
        self.where, self.message = where, message


def read_yaml_mapping(path: str | os.PathLike, what: str, mapping: str) -> dict:
    """The YAML mapping in ``path`` (a suite, a claims file, ...), or an ``InputFileError`` saying what was expected:
    ``what`` names the file ("a suite file"), ``mapping`` the keys its top level should have."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputFileError("", f"expected {what} (no such file)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFileError("", f"expected a readable file ({exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise InputFileError(where, f"expected valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise InputFileError("", f"expected a mapping with {mapping}")
    return data
