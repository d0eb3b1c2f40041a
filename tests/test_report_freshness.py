"""`bench report` on a folder whose report is already up to date redraws nothing, prints the same text, and imports
no plotting or pandas; any change of cells, claims or report files redraws it."""

import subprocess
import sys

import pytest

from conftest import GOOD_PLUGINS
import rankbench.cli as cli_module

SUITE = """
name: toy
tasks: [{toy: {size: 20}}]
selectors: [uniform, energy]
factorizations: [toy-svd]
budgets: [0.6]
seeds: [0, 1, 2]
"""


@pytest.fixture
def reported(cli, write_suite, tmp_path):
    out = tmp_path / "out"
    assert cli("run", write_suite(SUITE), "--out", out, "--plugins-dir", GOOD_PLUGINS, "--executor",
               "inprocess").returncode == 0
    first = cli("report", out)
    assert first.returncode == 0, first.stderr
    assert "up to date" not in first.stdout
    return out, first


def _count_redraws(monkeypatch):
    calls = []
    real = cli_module._write_report
    monkeypatch.setattr(cli_module, "_write_report", lambda *a: calls.append(a) or real(*a))
    return calls


def test_an_unchanged_folder_is_not_redrawn(reported, cli, monkeypatch):
    out, first = reported
    calls = _count_redraws(monkeypatch)
    again = cli("report", out)
    assert again.returncode == 0 and calls == []
    assert again.stdout.startswith(first.stdout) and "up to date" in again.stdout
    # in a fresh interpreter the up-to-date path loads neither pandas nor a plotting library
    code = ("import sys; from rankbench.cli import main; code = main(['report', sys.argv[1]]); "
            "print(sorted(m for m in ('pandas', 'matplotlib', 'seaborn', 'plotly', 'scipy') if m in sys.modules)); "
            "sys.exit(code)")
    probe = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.rstrip().endswith("[]") and "up to date" in probe.stdout


def test_a_deleted_report_file_or_new_claims_redraw(reported, cli, monkeypatch, tmp_path):
    out, _ = reported
    calls = _count_redraws(monkeypatch)
    (out / "report" / "quality_vs_params.png").unlink()
    assert cli("report", out).returncode == 0 and len(calls) == 1
    assert (out / "report" / "quality_vs_params.png").stat().st_size > 5000
    claims = tmp_path / "claims.yaml"
    claims.write_text("claims: []\n")
    result = cli("report", out, "--claims", claims)
    assert len(calls) == 2, result.stdout + result.stderr
    missing = cli("report", out, "--claims", tmp_path / "absent.yaml")
    assert missing.returncode == 2 and "absent.yaml" in missing.stderr and len(calls) == 2


def test_a_new_cell_redraws(reported, cli, write_suite, monkeypatch):
    out, _ = reported
    calls = _count_redraws(monkeypatch)
    more = SUITE.replace("seeds: [0, 1, 2]", "seeds: [0, 1, 2, 3]")
    assert cli("run", write_suite(more, "more.yaml"), "--out", out, "--plugins-dir", GOOD_PLUGINS, "--executor",
               "inprocess").returncode == 0
    result = cli("report", out)
    assert result.returncode == 0 and len(calls) == 1 and "up to date" not in result.stdout
