"""Importing a plugin module in a throwaway process first, so one that cannot be imported safely never takes the
host down.

A Python exception at import is harmless (the host catches it and lists a load failure); what the host cannot survive
is a module that segfaults, calls ``os._exit``, or hangs while it is imported. Before the host imports a third-party
entry point or a ``--plugins-dir`` file, ``probe_imports`` imports it in a short-lived child interpreter (several
modules in one child, one after another, each acknowledged on the child's stdout): a module the child dies in, or
that does not finish importing within ``RANKBENCH_PLUGIN_IMPORT_TIMEOUT`` seconds (default 60), is reported with the
reason, and the host lists it as a load failure instead of importing it. Verdicts (not timeouts) are cached per
module code and interpreter (``$RANKBENCH_CACHE/plugin-probes/``, or ``RANKBENCH_PLUGIN_PROBES``), so a module is
probed once until its file changes. The built-in plugins ship with the host and are imported directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rankbench.files import atomic_write

TIMEOUT_ENV = "RANKBENCH_PLUGIN_IMPORT_TIMEOUT"
CACHE_ENV = "RANKBENCH_PLUGIN_PROBES"
OK = "ok"

# The child: import each module named on stdin (a JSON list of [kind, target]) in turn and acknowledge each on stdout.
# What a module prints while imported goes to stderr (discarded), so it cannot be mistaken for an acknowledgement.
START, DONE = "@@rankbench-probe-start@@", "@@rankbench-probe-done@@"
_CHILD = r"""
import importlib, importlib.util, json, sys
acks, sys.stdout = sys.stdout, sys.stderr
for kind, target in json.loads(sys.stdin.read()):
    print("\n@@rankbench-probe-start@@", file=acks, flush=True)
    try:
        if kind == "module":
            importlib.import_module(target)
        else:
            spec = importlib.util.spec_from_file_location("rankbench_probe_" + str(abs(hash(target))), target)
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
    except BaseException:
        pass  # an exception is the host's to report when it imports the module itself
    print("\n@@rankbench-probe-done@@", file=acks, flush=True)
"""


def _cache_dir() -> Path:
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit)
    root = os.environ.get("RANKBENCH_CACHE") or Path.home() / ".cache" / "rankbench"
    return Path(root) / "plugin-probes"


def fingerprint_file(path: str | os.PathLike) -> bytes | None:
    """What identifies a plugin file's code: its content (None when unreadable: never cached)."""
    try:
        return Path(path).read_bytes()
    except OSError:
        return None


def _key(fingerprint: bytes | None) -> str | None:
    if fingerprint is None:
        return None
    return hashlib.sha256(fingerprint + sys.executable.encode() + sys.version.encode()).hexdigest()[:24]


def _describe_death(code: int) -> str:
    if code < 0:
        try:
            return f"the interpreter was killed by {signal.Signals(-code).name} while importing it"
        except ValueError:
            return f"the interpreter was killed by signal {-code} while importing it"
    return f"the interpreter exited with code {code} while importing it (os._exit or sys.exit at import)"


def _run_child(items: list[tuple[str, str]], timeout: float) -> tuple[int, str | None]:
    """Import ``items`` in one child; returns (how many finished, why the next one failed or None). The child's
    lines are read by a thread into a queue (a ``select`` on a buffered pipe misses lines already buffered)."""
    import queue
    import threading

    proc = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    proc.stdin.write(json.dumps(items))
    proc.stdin.close()
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put("")  # end of output: the child exited

    threading.Thread(target=read, daemon=True).start()
    finished = 0
    deadline = time.monotonic() + timeout
    try:
        while finished < len(items):
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return finished, f"importing it did not finish within {timeout:g} s ({TIMEOUT_ENV})"
            if not line:
                return finished, _describe_death(proc.wait())
            if line.strip().endswith(START):
                deadline = time.monotonic() + timeout
            elif line.strip().endswith(DONE):
                finished += 1
        return finished, None
    finally:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                proc.kill()
        proc.wait()


def probe_imports(items: list[tuple[str, str, bytes | None]]) -> dict[str, str]:
    """Verdicts for ``items`` = (kind, target, fingerprint): kind ``module`` (target an importable module name) or
    ``file`` (target a path); ``fingerprint`` identifies the code (a file's content; an entry point's distribution,
    version and target) and keys the cached verdict (None: not cached). Returns target -> ``OK`` or the reason it
    cannot be imported safely. Verdicts of a timeout are not cached (a cold disk can be slow)."""
    timeout = float(os.environ.get(TIMEOUT_ENV) or 60)
    cache = _cache_dir()
    verdicts: dict[str, str] = {}
    pending: list[tuple[str, str, str | None]] = []
    for kind, target, fingerprint in items:
        key = _key(fingerprint)
        cached = cache / f"{key}.json" if key else None
        if cached is not None and cached.exists():
            try:
                verdicts[target] = json.loads(cached.read_text())["verdict"]
                continue
            except (OSError, ValueError, KeyError):
                pass
        pending.append((kind, target, key))
    while pending:
        finished, reason = _run_child([(kind, target) for kind, target, _ in pending], timeout)
        outcome = [(entry, OK) for entry in pending[:finished]]
        if reason is not None:
            outcome.append((pending[finished], reason))
        for (_, target, key), verdict in outcome:
            verdicts[target] = verdict
            if key and "did not finish" not in verdict:
                try:
                    atomic_write(cache / f"{key}.json", json.dumps({"target": target, "verdict": verdict}))
                except OSError:
                    pass  # a read-only cache only costs a probe next time
        pending = pending[len(outcome):]
    return verdicts
