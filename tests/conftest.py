import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
GOOD_PLUGINS = TESTS / "plugin_files" / "good"
BROKEN_PLUGINS = TESTS / "plugin_files" / "broken"
# one seed, the dense reference and uniform at 0.5 on the toy task of GOOD_PLUGINS: two cells
TOY_SUITE = """
name: toy
tasks: [{toy: {size: 24}}]
selectors: [uniform]
factorizations: [toy-svd]
budgets: [0.5]
seeds: [0]
timeout: 30
"""


def run_bench(*args, cwd=None, env=None, timeout=600):
    """Run the CLI in a fresh interpreter, exactly as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "rankbench.cli", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, env=full_env, timeout=timeout,
    )


@pytest.fixture
def bench():
    return run_bench


@pytest.fixture
def cli(capsys):
    """Run the CLI in this process (fast); returns (exit code, stdout, stderr)."""
    from rankbench.cli import main

    def call(*args):
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, captured.out, captured.err)

    return call


@pytest.fixture
def write_suite(tmp_path):
    def write(text: str, name: str = "suite.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch, _probe_verdicts):
    monkeypatch.setenv("RANKBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RANKBENCH_PLUGIN_PROBES", str(_probe_verdicts))
    monkeypatch.setenv("RANKBENCH_NO_DECOMPOSITION_CACHE", "1")  # ~1 GB per LLM factorization; tested on its own


@pytest.fixture(scope="session")
def _probe_verdicts(tmp_path_factory):
    """One cache of plugin-import probe verdicts for the session (the test plugin files are probed once, not once per
    test); tests of the probe itself set their own."""
    return tmp_path_factory.mktemp("plugin-probes")


@pytest.fixture(scope="module")
def single_torch_thread():
    """Small tensors: on a busy 2-core machine torch's intra-op threads mostly wait on each other. Use it with
    ``pytestmark = pytest.mark.usefixtures("single_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
