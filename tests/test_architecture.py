"""Architecture rules that import-linter does not express: no module imports a private name (``_x``, or anything
from a private module) owned by another package. Private helpers stay inside their own family."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def private_imports_across_packages() -> list[str]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        importer = ".".join(path.relative_to(SRC).with_suffix("").parts[:-1])
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.module != "__future__"):
                continue
            for alias in node.names:
                parts = [*node.module.split("."), alias.name]
                private = next((i for i, part in enumerate(parts) if part.startswith("_")), None)
                if private is not None and ".".join(parts[:private]) != importer:
                    found.append(f"{path.relative_to(SRC)}: from {node.module} import {alias.name}")
    return found


def test_no_private_name_is_imported_from_another_package():
    assert private_imports_across_packages() == []


def test_the_rule_catches_a_cross_package_private_import(tmp_path, monkeypatch):
    package = tmp_path / "rankbench_plugins" / "selectors"
    package.mkdir(parents=True)
    (package / "leaky.py").write_text("from rankbench_plugins.solvers._factored import FactoredSolver\n")
    monkeypatch.setitem(globals(), "SRC", tmp_path)
    assert private_imports_across_packages() == [
        "rankbench_plugins/selectors/leaky.py: from rankbench_plugins.solvers._factored import FactoredSolver"
    ]


HEAVY_LIBRARIES = ("torch", "scipy", "pandas", "ray", "transformers", "pyro", "matplotlib", "tensorly", "submitit")


def _modules_imported_by(code: str) -> set[str]:
    """Top-level package names in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    probe = f"{code}\nimport sys, json\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    env = {**os.environ, "RANKBENCH_TRACE_PLUGINS": ""}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_loading_every_plugin_imports_no_heavy_library():
    """Plugin registration is light (heavy libraries are imported inside the functions that use them), so that
    ``bench plugins``, ``bench check`` and a resume with nothing to do answer without importing torch & co."""
    code = ("from rankbench.plugins import load_plugins\n"
            "registry = load_plugins()\n"
            "assert not registry.failures, registry.failures\n"
            "assert len(registry.all()) > 30, len(registry.all())")
    heavy = _modules_imported_by(code) & set(HEAVY_LIBRARIES)
    assert not heavy, f"loading the plugins imported {sorted(heavy)}"


def test_expanding_and_checking_a_suite_imports_no_heavy_library():
    """``bench check`` expands a suite (parameters validated, pairings decided) without torch, pandas or scipy."""
    suite = SRC.parent / "suites" / "llm.yaml"
    code = ("from rankbench.cli import main\n"
            f"code = main(['check', {str(suite)!r}, '--device', 'cpu'])\nassert code == 0, code")
    heavy = _modules_imported_by(code) & set(HEAVY_LIBRARIES)
    assert not heavy, f"bench check imported {sorted(heavy)}"
