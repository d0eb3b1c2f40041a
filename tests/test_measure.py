"""Measurement: phase timers, per-cell peak RSS, and the CUDA path (synchronised timers, per-phase peaks)."""

import mmap
import sys
import time
import types

import numpy as np
import pytest

from rankbench import measure
from rankbench.envinfo import resolve_device


def test_phase_timer_accumulates_per_phase():
    timer = measure.PhaseTimer("cpu")
    for _ in range(2):
        with timer.phase("solve"):
            time.sleep(0.02)
    with timer.phase("select"):
        pass
    assert timer.seconds["solve"] >= 0.04
    assert timer.seconds["select"] < timer.seconds["solve"]
    assert timer.cuda_peak_mb == {}


@pytest.mark.skipif(not measure.reset_peak_rss(), reason="needs /proc/self/clear_refs (Linux)")
def test_peak_rss_is_reset_per_cell():
    measure.reset_peak_rss()
    # 300 MiB of fresh anonymous pages, every one touched: a mapping of its own, so the pages cannot come from freed
    # heap memory the process still holds (a long test session can hold hundreds of MB of it, and np.ones could then
    # reuse resident pages without the peak moving)
    block = mmap.mmap(-1, 300 * 2**20)
    np.frombuffer(block, dtype=np.uint8)[:] = 1
    high = measure.peak_rss_mb()
    block.close()
    measure.reset_peak_rss()
    low = measure.peak_rss_mb()
    assert high - low > 250


class FakeCuda:
    """Stands in for torch.cuda to check the order of calls on the CUDA path."""

    def __init__(self):
        self.calls = []
        self.allocated = 0

    def is_available(self):
        return True

    def is_initialized(self):
        return True

    def synchronize(self):
        self.calls.append("sync")

    def reset_peak_memory_stats(self):
        self.calls.append("reset")

    def max_memory_allocated(self):
        self.calls.append("peak")
        return self.allocated


def test_cuda_phases_synchronise_and_reset_peaks(monkeypatch):
    fake = FakeCuda()
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=fake))
    timer = measure.PhaseTimer("cuda")
    with timer.phase("solve"):
        fake.calls.append("work")
        fake.allocated = 512 * 2**20
    # the clock starts after the device is idle and stops only after queued kernels finished
    assert fake.calls == ["sync", "reset", "work", "sync", "peak"]
    fake.allocated = 128 * 2**20
    with timer.phase("evaluate"):
        pass
    assert timer.cuda_peak_mb == {"solve": 512.0, "evaluate": 128.0}


def test_device_resolution():
    import torch

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")
