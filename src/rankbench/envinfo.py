"""Environment capture: versions, device, CPU, threads, git sha -- stored once per run in ``DIR/runs/*.json``."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGES = ("rankbench", "torch", "numpy", "scipy", "pandas", "pyarrow", "pluggy", "pydantic", "tensorly")


def resolve_device(requested: str | None) -> str:
    """The run's device. ``auto`` (also ``None``) picks ``cuda`` exactly when a GPU driver file is visible
    (``gpu_driver_present``) and ``torch.cuda.is_available()`` is true -- torch was built with CUDA and sees at least
    one device -- else ``cpu``. Asking for ``cuda`` without one is bad input. Under ``auto`` a task may still keep its
    cells on the CPU (``task_device``)."""
    requested = requested or "auto"
    if requested == "cpu" or (requested == "auto" and not gpu_driver_present()):
        return "cpu"  # without a GPU driver torch sees no device: no need to import it to ask
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    return "cuda"


def task_device(task, requested: str | None, resolved: str) -> str:
    """Where the cells of ``task`` (a configured ``Task``) run, given the requested device (``auto``/``None``, ``cpu``,
    ``cuda``) and the run's device ``resolved`` from it by ``resolve_device``: the run's device, except that under
    ``auto`` a task whose ``gpu_benefit`` is False stays on the CPU. An explicit ``cuda`` is honoured for every task."""
    if (requested or "auto") == "auto" and resolved.startswith("cuda") and not getattr(task, "gpu_benefit", True):
        return "cpu"
    return resolved


GPU_DRIVER_FILES = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")


def gpu_driver_present() -> bool:
    """Whether a CUDA (NVIDIA, also under WSL) or ROCm driver is visible to this process. torch can only see a GPU
    through one of them, so without any ``bench`` answers ``auto`` as the CPU without importing torch (~1 s)."""
    return any(os.path.exists(path) for path in GPU_DRIVER_FILES)


GIT_SHA_ENV = "RANKBENCH_GIT_SHA"  # set by a caller that knows the installed commit better (asv's per-commit builds)


def git_sha() -> str:
    """The commit of the rankbench source tree (with ``-dirty`` if it has uncommitted changes), else ''.
    ``$RANKBENCH_GIT_SHA`` wins: an installed (non-editable) build has no git tree of its own."""
    if os.environ.get(GIT_SHA_ENV):
        return os.environ[GIT_SHA_ENV]
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        if not sha:
            return ""
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str, registry=None, deterministic: bool = False) -> dict:
    """The run record's environment. ``device``: the run's resolved device (``resolve_device``; under ``auto`` the
    cells of tasks with ``gpu_benefit = False`` run on the CPU); ``deterministic``: ``bench run --deterministic``."""
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device.startswith("cuda") else cpu_model(),
        "cuda": torch.version.cuda,
        "deterministic": bool(deterministic),
        "packages": versions,
        "git_sha": git_sha(),
    }
    if registry is not None and registry.hook is not None:
        extra: dict = {}
        for facts in registry.hook.rankbench_environment_info():
            if isinstance(facts, dict):
                extra.update(facts)
        if extra:
            info["plugins"] = extra
    return info
