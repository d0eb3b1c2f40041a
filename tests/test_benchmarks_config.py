"""The asv configuration and benchmarks load from the project's venv (no benchmark is run here)."""

import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def test_asv_discovers_the_benchmarks():
    asv = Path(sys.executable).with_name("asv")
    result = subprocess.run([str(asv), "check", "--python=same"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No problems found" in result.stdout + result.stderr
