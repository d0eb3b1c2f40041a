"""Architecture rules that import-linter does not express: no module imports a private name (``_x``, or anything
from a private module) owned by another package. Private helpers stay inside their own family."""

import ast
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
