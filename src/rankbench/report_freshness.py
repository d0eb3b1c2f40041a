"""Whether ``DIR/report/`` is already the report of what ``DIR`` holds, so ``bench report`` can skip the drawing.

A report is a pure function of (a) the verified cells of the folder -- every marker, which records its cell's
status, metadata and the SHA-256 of each of its parts --, (b) the claims file given with ``--claims``, (c) the code
that computes and draws it (the sources of the report, HTML, leaderboard and statistics modules) and (d) the
drawing libraries' versions. ``inputs_digest`` hashes exactly these; after a report is written, ``record`` keeps the
digest, the terminal text and the list of files in ``report/.inputs.json``. ``fresh`` answers the stored terminal
text when the digest is unchanged and every listed file still exists, so a report of an unchanged folder (after a
resume that had nothing to run, or a second ``bench report``) costs the folder's verification, not seconds of
plotting. Any change of cells, claims, code or library versions, or a deleted report file, redraws everything.

Light on purpose: it imports neither pandas nor the plotting libraries (only the marker scan's pyarrow).
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path

from rankbench.files import atomic_write

STATE = ".inputs.json"
_CODE = ("report.py", "html_report.py", "leaderboard.py", "stats.py", "results.py", "report_freshness.py")
_LIBRARIES = ("matplotlib", "seaborn", "plotly", "pandas", "tabulate", "autorank")


def inputs_digest(markers: dict[str, dict], claims: str | None) -> str:
    """SHA-256 of everything a report of these verified cells (``ResultsScan.markers``) depends on."""
    digest = hashlib.sha256()
    for cell_id in sorted(markers):
        record = {k: v for k, v in markers[cell_id].items() if k != "_parts"}
        digest.update(json.dumps([cell_id, record], sort_keys=True, default=str).encode())
    digest.update(b"claims:" + (Path(claims).read_bytes() if claims else b""))
    here = Path(__file__).parent
    for name in _CODE:
        digest.update(name.encode() + (here / name).read_bytes())
    for library in _LIBRARIES:
        try:
            version = metadata.version(library)
        except metadata.PackageNotFoundError:
            version = "absent"
        digest.update(f"{library}={version}".encode())
    return digest.hexdigest()


def fresh(folder: Path, digest: str) -> str | None:
    """The stored terminal text when ``folder`` (``DIR/report``) is the report of ``digest``, else None."""
    try:
        state = json.loads((folder / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or state.get("digest") != digest:
        return None
    files = state.get("files")
    if not isinstance(files, list) or not all((folder / str(name)).is_file() for name in files):
        return None
    text = state.get("terminal")
    return text if isinstance(text, str) else None


def record(folder: Path, digest: str, terminal: str, files: list[str]) -> None:
    """Remember that ``folder`` now holds the report of ``digest`` (its ``files``, by name) and what it printed."""
    atomic_write(folder / STATE, json.dumps({"digest": digest, "files": sorted(files), "terminal": terminal}))
