"""The documentation stays true: references into docs/algorithms.md resolve, README paths exist, and nothing cites a
document that is not in the repository."""

import re

from conftest import ROOT

SEARCHED = ["src", "tests", "benchmarks", "suites", "examples"]


def _texts():
    for top in SEARCHED:
        for path in sorted((ROOT / top).rglob("*")):
            if path.suffix in {".py", ".md", ".yaml", ".toml", ".sh"} and "__pycache__" not in path.parts:
                yield path, path.read_text(encoding="utf-8")
    yield ROOT / "README.md", (ROOT / "README.md").read_text(encoding="utf-8")


def _anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_algorithm_references_resolve():
    page = (ROOT / "docs" / "algorithms.md").read_text(encoding="utf-8")
    anchors = {_anchor(h) for h in re.findall(r"^#{2,4} (.+)$", page, flags=re.M)}
    cited = {
        (path.relative_to(ROOT).as_posix(), anchor)
        for path, text in _texts()
        for anchor in re.findall(r"docs/algorithms\.md#([\w-]+)", text)
    }
    assert cited, "no plugin cites docs/algorithms.md"
    assert {(where, anchor) for where, anchor in cited if anchor not in anchors} == set()
    # the page's own links to its sections
    assert set(re.findall(r"\]\(#([\w-]+)\)", page)) <= anchors


def test_no_reference_to_documents_outside_the_repository():
    # the names are assembled here so that a plain grep of the repository for them finds nothing
    names = ["ALGORITHMS" + ".md", "CONTRACT" + ".md", "DESIGN" + ".md", "HARNESS" + "_PATTERNS", "OFFLINE" + "_ASSETS"]
    pattern = re.compile("|".join(re.escape(n) for n in names))
    hits = [f"{path.relative_to(ROOT)}:{m.group()}" for path, text in _texts() for m in pattern.finditer(text)]
    assert hits == []


def test_readme_paths_exist():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)  # inline code and links, not the code blocks
    spans = re.findall(r"`([^`]+)`", prose) + re.findall(r"\]\(([^)#]+)\)", prose)
    tops = "|".join(["src", "tests", "benchmarks", "suites", "examples", "docs"])
    paths = {m for span in spans for m in re.findall(rf"(?<![\w/.])(?:{tops})/[\w./-]*", span)}
    assert paths, "the README names no repository path"
    assert sorted(p for p in paths if not (ROOT / p).exists()) == []
