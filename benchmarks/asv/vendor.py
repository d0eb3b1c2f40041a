"""The nightly site offline: the JavaScript and CSS libraries that ``asv publish``'s pages load from CDNs (jQuery, flot
and its plugins, stupidtable, blueimp-md5, bootstrap), copied into the site, with the pages pointing at the copies.

Without a network, asv's page cannot load them and sends the reader to ``error.html`` ("Can not determine continental
origin of swallow"). Nothing here is a benchmark (asv discovers none: no name starts with ``time_``, ``track_``, ...),
and only the standard library is used, so ``make asv-vendor`` runs before any virtual environment exists.

* ``fetch(vendor_dir)``: ``npm pack NAME@VERSION`` from the npm registry for every package in ``PACKAGES`` that is not
  in ``vendor_dir`` yet, unpacked into ``vendor_dir/NAME@VERSION/`` (npm checks each tarball against the registry's
  integrity hash). Run once: later calls find the folders and do nothing.
* ``vendor_site(html_dir, vendor_dir)``: copies the files the pages need into ``html_dir/vendor/`` and rewrites
  every ``<script src>`` and ``<link href>`` that points at a CDN to the copy, dropping the tag's ``integrity``,
  ``crossorigin`` and ``referrerpolicy`` attributes (a page opened from ``file://`` has no origin, so a
  ``crossorigin`` load of a local file fails; the copies' provenance is npm's checked tarball). A CDN address that
  ``ASSETS`` does not map (a newer asv naming other libraries) is an error, not a page that silently breaks.

``python benchmarks/asv/vendor.py fetch [VENDOR_DIR]`` and ``python benchmarks/asv/vendor.py site HTML_DIR
[VENDOR_DIR]`` (fetch, then vendor the site); VENDOR_DIR defaults to ``$ASV_VENDOR_DIR``, else
``$RANKBENCH_CACHE/asv-vendor`` (``~/.cache/rankbench/asv-vendor``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

# The versions asv 0.6's www/index.html names. stupidtable 1.0.1 is on cdnjs only; npm's stupid-table-plugin starts
# at 1.1.3, the same plugin with the same ``$(table).stupidtable()`` call that asv makes.
PACKAGES = {
    "jquery": "3.3.1",
    "flot": "0.8.3",
    "flot-orderbars": "1.0.0",
    "stupid-table-plugin": "1.1.3",
    "blueimp-md5": "2.19.0",
    "bootstrap": "3.1.1",
}

# CDN address in asv's pages -> (npm package, file inside it). npm's flot ships the unminified files.
ASSETS = {
    "https://code.jquery.com/jquery-3.3.1.min.js": ("jquery", "dist/jquery.min.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.min.js": ("flot", "jquery.flot.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.time.min.js": ("flot", "jquery.flot.time.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.selection.min.js": (
        "flot",
        "jquery.flot.selection.js",
    ),
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.categories.min.js": (
        "flot",
        "jquery.flot.categories.js",
    ),
    "https://cdn.jsdelivr.net/npm/flot-orderbars@1.0.0/js/jquery.flot.orderBars.js": (
        "flot-orderbars",
        "js/jquery.flot.orderBars.js",
    ),
    "https://cdnjs.cloudflare.com/ajax/libs/stupidtable/1.0.1/stupidtable.min.js": (
        "stupid-table-plugin",
        "stupidtable.min.js",
    ),
    "https://cdnjs.cloudflare.com/ajax/libs/blueimp-md5/2.19.0/js/md5.min.js": ("blueimp-md5", "js/md5.min.js"),
    "https://cdn.jsdelivr.net/npm/bootstrap@3.1.1/dist/js/bootstrap.min.js": ("bootstrap", "dist/js/bootstrap.min.js"),
    "https://cdn.jsdelivr.net/npm/bootstrap@3.1.1/dist/css/bootstrap.min.css": (
        "bootstrap",
        "dist/css/bootstrap.min.css",
    ),
}
# Files a copied file refers to by a relative address: bootstrap's CSS loads its icon font from ../fonts/.
SUPPORT = {("bootstrap", "dist/css/bootstrap.min.css"): [("bootstrap", "dist/fonts")]}

SITE_FOLDER = "vendor"
_TAG = re.compile(r"<(script|link)\b[^>]*>", re.IGNORECASE)
_ADDRESS = re.compile(r"""\b(src|href)\s*=\s*(["'])(.*?)\2""", re.IGNORECASE | re.DOTALL)
_DROPPED = re.compile(r"""\s+(integrity|crossorigin|referrerpolicy)(\s*=\s*(["']).*?\3)?""", re.IGNORECASE | re.DOTALL)
_REL = re.compile(r"""\brel\s*=\s*(["'])(.*?)\1""", re.IGNORECASE)


class VendorError(RuntimeError):
    pass


def default_vendor_dir() -> Path:
    if os.environ.get("ASV_VENDOR_DIR"):
        return Path(os.environ["ASV_VENDOR_DIR"])
    cache = os.environ.get("RANKBENCH_CACHE") or Path.home() / ".cache" / "rankbench"
    return Path(cache) / "asv-vendor"


def package_dir(vendor_dir: Path, name: str) -> Path:
    return Path(vendor_dir) / f"{name}@{PACKAGES[name]}"


def missing(vendor_dir: Path) -> list[str]:
    """The packages of ``PACKAGES`` not (completely) unpacked in ``vendor_dir``."""
    return [name for name in PACKAGES if not (package_dir(vendor_dir, name) / "package.json").is_file()]


def _unpack(tarball: Path, target: Path) -> None:
    """Unpack an npm tarball's ``package/`` folder into ``target`` (written next to it, then renamed)."""
    partial = target.with_name(target.name + ".part")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with tarfile.open(tarball) as archive:
        for member in archive.getmembers():
            parts = Path(member.name).parts
            if not parts or parts[0] != "package" or len(parts) == 1:
                continue
            if not (member.isfile() or member.isdir()) or ".." in parts or Path(member.name).is_absolute():
                raise VendorError(f"{tarball.name}: unexpected entry {member.name!r}")
            destination = partial.joinpath(*parts[1:])
            if member.isdir():
                destination.mkdir(parents=True, exist_ok=True)
                continue
            destination.parent.mkdir(parents=True, exist_ok=True)
            with archive.extractfile(member) as source, open(destination, "wb") as sink:
                shutil.copyfileobj(source, sink)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)


def fetch(vendor_dir: Path, npm: str = "npm") -> list[str]:
    """``npm pack`` every package of ``PACKAGES`` that ``vendor_dir`` lacks, unpacked there; the names fetched."""
    vendor_dir = Path(vendor_dir)
    todo = missing(vendor_dir)
    if not todo:
        return []
    if shutil.which(npm) is None:
        raise VendorError(f"{npm} not found: install Node.js and npm (Debian: apt-get install nodejs npm)")
    vendor_dir.mkdir(parents=True, exist_ok=True)
    specs = [f"{name}@{PACKAGES[name]}" for name in todo]
    with tempfile.TemporaryDirectory(dir=vendor_dir) as tmp:
        result = subprocess.run(
            [npm, "pack", "--json", "--pack-destination", tmp, *specs],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode != 0:
            raise VendorError(f"npm pack {' '.join(specs)} failed:\n{result.stderr.strip()[-2000:]}")
        packed = {entry["name"]: entry["filename"] for entry in json.loads(result.stdout)}
        for name in todo:
            if name not in packed:
                raise VendorError(f"npm pack did not return {name}@{PACKAGES[name]}")
            _unpack(Path(tmp) / packed[name], package_dir(vendor_dir, name))
    return todo


def _site_path(name: str, inner: str) -> str:
    return f"{SITE_FOLDER}/{name}@{PACKAGES[name]}/{inner}"


def _copy(vendor_dir: Path, html_dir: Path, name: str, inner: str) -> None:
    source = package_dir(vendor_dir, name) / inner
    target = html_dir / _site_path(name, inner)
    if not source.exists():
        raise VendorError(f"{source} is missing: fetch the libraries first (make asv-vendor)")
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, target, dirs_exist_ok=True)
    else:
        shutil.copy2(source, target)


def remote_addresses(page: str) -> list[str]:
    """The http(s) addresses that ``<script src>`` and stylesheet/icon ``<link href>`` tags of ``page`` load."""
    found = []
    for tag in _TAG.finditer(page):
        address = _resource(tag.group(0), tag.group(1).lower())
        if address and re.match(r"(https?:)?//", address, re.IGNORECASE):
            found.append(address)
    return found


def _resource(tag: str, kind: str) -> str | None:
    """The address a ``<script>``/``<link>`` tag loads (links: stylesheets, icons, preloads only), else None."""
    if kind == "link":
        rel = _REL.search(tag)
        if not rel or not {"stylesheet", "icon", "preload", "modulepreload"} & set(rel.group(2).lower().split()):
            return None
    for attribute in _ADDRESS.finditer(tag):
        if attribute.group(1).lower() == ("href" if kind == "link" else "src"):
            return attribute.group(3).strip()
    return None


def rewrite_page(page: str) -> tuple[str, set[tuple[str, str]]]:
    """``page`` with every CDN address of ``ASSETS`` replaced by its copy under ``vendor/``; the (package, file)
    pairs it now needs. Raises VendorError for a remote script or stylesheet that ``ASSETS`` does not know."""
    needed: set[tuple[str, str]] = set()
    unknown: list[str] = []

    def replace(match: re.Match) -> str:
        tag, kind = match.group(0), match.group(1).lower()
        address = _resource(tag, kind)
        if not address or not re.match(r"(https?:)?//", address, re.IGNORECASE):
            return tag
        if address not in ASSETS:
            unknown.append(address)
            return tag
        needed.add(ASSETS[address])
        local = _site_path(*ASSETS[address])
        tag = tag.replace(address, local)
        return _DROPPED.sub("", tag)

    rewritten = _TAG.sub(replace, page)
    if unknown:
        raise VendorError(
            "no local copy is known for " + ", ".join(unknown) + " (a newer asv? add it to ASSETS in "
            "benchmarks/asv/vendor.py)"
        )
    return rewritten, needed


def vendor_site(html_dir: Path, vendor_dir: Path) -> list[Path]:
    """Make the published site in ``html_dir`` load its libraries from ``html_dir/vendor/`` (copied from
    ``vendor_dir``, see ``fetch``); the pages rewritten. Idempotent: a rewritten page has no CDN address left."""
    html_dir, vendor_dir = Path(html_dir), Path(vendor_dir)
    pages = sorted(html_dir.glob("*.html"))
    if not pages:
        raise VendorError(f"no HTML pages in {html_dir} (run asv publish first)")
    rewritten = {}
    needed: set[tuple[str, str]] = set()
    for page in pages:
        text, files = rewrite_page(page.read_text(encoding="utf-8"))
        rewritten[page] = text
        needed |= files
    for name, inner in sorted(needed):
        _copy(vendor_dir, html_dir, name, inner)
        for support in SUPPORT.get((name, inner), []):
            _copy(vendor_dir, html_dir, *support)
    changed = []
    for page, text in rewritten.items():
        if text != page.read_text(encoding="utf-8"):
            page.write_text(text, encoding="utf-8")
            changed.append(page)
    return changed


def main(argv: list[str]) -> int:
    usage = "usage: vendor.py fetch [VENDOR_DIR] | vendor.py site HTML_DIR [VENDOR_DIR]"
    try:
        if argv[:1] == ["fetch"] and len(argv) <= 2:
            vendor_dir = Path(argv[1]) if len(argv) > 1 and argv[1] else default_vendor_dir()
            fetched = fetch(vendor_dir)
            print(f"asv-vendor: {'fetched ' + ', '.join(fetched) + ' into' if fetched else 'using'} {vendor_dir}")
            return 0
        if argv[:1] == ["site"] and 2 <= len(argv) <= 3:
            vendor_dir = Path(argv[2]) if len(argv) > 2 and argv[2] else default_vendor_dir()
            fetch(vendor_dir)
            changed = vendor_site(Path(argv[1]), vendor_dir)
            print(f"asv-vendor: {len(changed)} page(s) of {argv[1]} now load their libraries from {SITE_FOLDER}/")
            return 0
    except (VendorError, OSError, subprocess.SubprocessError) as error:
        print(f"asv-vendor: {error}", file=sys.stderr)
        return 1
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
