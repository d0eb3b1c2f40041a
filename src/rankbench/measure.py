"""Honest measurement: phase timers synchronised with the device, peak host RSS and peak CUDA memory.

* Time: ``time.perf_counter`` around each phase; on CUDA the device is synchronised before the clock is read at both
  ends, so asynchronous kernel launches are never mistaken for finished work.
* Host memory: the process's peak resident set (``VmHWM``). On Linux the peak is reset at the start of each cell
  by writing ``5`` to ``/proc/self/clear_refs``, so a long-lived worker still reports per-cell peaks. Where that is
  not possible the peak is the process's lifetime peak (``ru_maxrss``) and ``peak_rss_scope`` says so.
* CUDA memory: ``torch.cuda.reset_peak_memory_stats`` at each phase start, ``max_memory_allocated`` at its end.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Iterator


def _torch_cuda():
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda
    return None


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        cuda = _torch_cuda()
        if cuda is not None:
            cuda.synchronize()


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter for this process; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    scale = 1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def release_freed_memory() -> None:
    """Hand the C heap's freed pages back to the OS (glibc ``malloc_trim``; nothing elsewhere). Tensors of a few MB
    come from the heap, and a loop that frees them between long-lived allocations (a streamed compression's
    per-block statistics and decompositions) otherwise keeps the freed memory resident."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PhaseTimer:
    """Accumulates wall time (and CUDA peaks) per named phase of one cell."""

    def __init__(self, device: str):
        self.device = device
        self.seconds: dict[str, float] = {}
        self.cuda_peak_mb: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        cuda = _torch_cuda() if self.device.startswith("cuda") else None
        if cuda is not None:
            cuda.synchronize()
            cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            yield
        finally:
            if cuda is not None:
                cuda.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            if cuda is not None:
                peak = cuda.max_memory_allocated() / 2**20
                self.cuda_peak_mb[name] = max(self.cuda_peak_mb.get(name, 0.0), peak)
