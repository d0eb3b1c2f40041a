"""The HTML report (``DIR/report/index.html``) and the offline nightly site, checked where a reader sees them: in a real
headless Chromium (Debian's ``chromium`` and ``chromium-driver``, driven by selenium) with the network blocked.

The ``browser`` tests run in ``make test`` and CI (``make test`` installs the browser: ``make browser``; and the
nightly site's libraries: ``make asv-vendor``). Without Chromium they fail under ``CI``; elsewhere they skip, saying
what is missing. The rendering and the page rewriting are also checked without a browser."""

import functools
import http.server
import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import GOOD_PLUGINS, ROOT
from rankbench import stats
from rankbench.html_report import render_html, write_html_report


def _load_vendor():
    spec = importlib.util.spec_from_file_location("asv_vendor", ROOT / "benchmarks" / "asv" / "vendor.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


vendor = _load_vendor()
# read while the module is imported: the autouse fixture points RANKBENCH_CACHE at a temporary folder during tests
VENDOR_DIR = vendor.default_vendor_dir()
CHROMIUM = Path(os.environ.get("RANKBENCH_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("RANKBENCH_CHROMEDRIVER", "/usr/bin/chromedriver"))
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
SWALLOW = "continental origin of swallow"


def _unavailable(reason: str) -> None:
    """Missing browser pieces: a failure in CI (which must run these tests), a skip elsewhere."""
    if IN_CI:
        pytest.fail(f"{reason}; CI must run the browser tests (`make test` installs them)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium with the network cut off: every host name resolves to nothing and every non-loopback request
    goes to a closed proxy port, so only file:// pages and the test's own 127.0.0.1 server can load."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.is_file()]
    if missing:
        _unavailable(f"headless Chromium is missing ({', '.join(missing)}): run `make browser`")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("selenium is not installed: pip install -e '.[test]'")
    profile = tempfile.mkdtemp(prefix="rankbench-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1400,1000",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--proxy-server=http://127.0.0.1:9",
    ]:
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _open(driver, url: str, ready: str = "return document.readyState === 'complete'", timeout: float = 30) -> list:
    """Load ``url``, wait until the ``ready`` script returns true; the console entries the page logged."""
    driver.get_log("browser")  # drop what earlier pages logged
    driver.get(url)
    deadline = time.monotonic() + timeout
    while not driver.execute_script(ready):
        assert time.monotonic() < deadline, f"{url}: not ready after {timeout} s ({ready})"
        time.sleep(0.2)
    time.sleep(0.5)  # late errors (a failed script, a plot that throws) reach the log
    return driver.get_log("browser")


def _errors(log: list) -> list:
    return [entry for entry in log if entry["level"] == "SEVERE"]


# ------------------------------------------------------------------------------------------------ the HTML report

SUITE = """
name: html
tasks: [{toy: {size: 30}}, {toy: {size: 20}}, {toy: {size: 16}}]
selectors: [uniform, energy]
factorizations: [toy-svd]
budgets: [0.6, 0.3]
seeds: [0, 1, 2]
"""


@pytest.mark.browser
def test_html_report_renders_offline_in_chromium(cli, write_suite, tmp_path, browser):
    out = tmp_path / "out"
    run = cli("run", write_suite(SUITE), "--out", out, "--plugins-dir", GOOD_PLUGINS, "--executor", "inprocess")
    assert run.returncode == 0, run.stderr
    result = cli("report", out)
    assert result.returncode == 0, result.stderr
    page = out / "report" / "index.html"
    assert page.is_file() and (out / "report" / "report.md").is_file()
    text = page.read_text()
    assert not re.search(r"<script[^>]+\bsrc=", text) and not re.search(r"<link[^>]+href=[\"']?https?:", text)

    log = _open(browser, page.as_uri())
    assert not _errors(log), log
    assert browser.title.startswith("rankbench report")
    # charts: per configuration one quality chart and one rank heatmap, plus the ranking chart; each drawn
    charts = browser.execute_script("""
        return Array.from(document.querySelectorAll('.plotly-graph-div')).map(div => ({
            id: div.id, traces: (div.data || []).length, svg: div.querySelectorAll('.main-svg').length,
            width: div.getBoundingClientRect().width, height: div.getBoundingClientRect().height,
            points: div.querySelectorAll('.scatterlayer .point, .heatmaplayer image, .hm image').length}));""")
    assert len(charts) == 3 * 2 + 1, charts
    for chart in charts:
        assert chart["traces"] > 0 and chart["svg"] > 0 and chart["width"] > 300 and chart["height"] > 100, chart
        assert chart["points"] > 0, chart
    # the leaderboard: per configuration, the dense reference and 2 selectors x 2 budgets, with intervals (3 seeds)
    rows = browser.execute_script("""
        return Array.from(document.querySelectorAll('table.leaderboard tbody tr')).map(
            tr => Array.from(tr.cells).map(td => td.innerText));""")
    assert len(rows) == 3 * 5, rows
    assert sum(row[3].count("[") == 1 and "(n=3)" in row[3] for row in rows) == len(rows)
    assert {row[1] for row in rows} == {"none + dense", "uniform + toy-svd", "energy + toy-svd"}
    toc = browser.execute_script("return Array.from(document.querySelectorAll('nav.toc a')).map(a => a.hash)")
    assert len(toc) == 3 + 2 and all(browser.execute_script(f"return !!document.querySelector('{h}')") for h in toc)
    assert "python" in browser.find_element("id", "environment").text

    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1400, min(int(height), 8000))
    shot = out / "report" / "screenshot.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 20000
    browser.set_window_size(1400, 1000)


def _board() -> pd.DataFrame:
    rows = []
    for method, factorization, budget, estimate, ratio in [
        ("none + dense", "dense", math.nan, 0.1, 1.0),
        ("uniform + svd", "svd", 0.5, 0.3, 0.5),
        ("uniform + svd", "svd", 0.25, 0.6, 0.25),
        ("ard + svd", "svd", math.nan, 0.2, 0.7),
    ]:
        selector = method.split(" + ")[0]
        rows.append({"task_config": "toy[size=3]", "task": "toy", "method": method, "selector": selector,
                     "factorization": factorization, "budget": budget, "budget_kind": "param_ratio",
                     "metric": "rel_error", "higher_is_better": False, "n": 3, "estimate": estimate,
                     "low": estimate - 0.01, "high": estimate + 0.02, "text": f"{estimate:.4g} [...] (n=3)",
                     "param_ratio": ratio, "is_reference": factorization == "dense", "rank": 0.0,
                     "vs_reference": "" if factorization == "dense" else "loss -0.1 [-0.2, -0.05] (n=3)",
                     "verdict_vs_reference": "" if factorization == "dense" else "loss"})
    board = pd.DataFrame(rows)
    board["rank"] = board["estimate"].rank()
    return board


def test_render_html_from_a_leaderboard_frame_with_claims():
    """The page is rendered from its inputs: a leaderboard frame, rankings, rank tables, claims, the environment."""
    ranking = stats.Ranking(pd.Series({"a": 1.2, "b": 2.0, "c": 2.8}), 0.01, 0.9, 6)
    tables = {"toy[size=3]": pd.DataFrame([[3, 2], [1, 1]], index=["uniform + svd @0.5", "uniform + svd @0.25"],
                                          columns=["layer.1", "layer.10"])}
    claims = pd.DataFrame([{"claim": "ARD matches <dense>", "source": "paper §4", "verdict": "refuted",
                            "numbers": "0.2 vs 0.1"}])
    page = render_html("r", _board(), {"rel_error": ranking}, tables, ("x.json", {"environment": {"python": "3.11",
                       "packages": {"torch": "2.13"}}}), claims, {"ok": 4})
    assert page.count('class="plotly-graph-div') == 3  # quality, heatmap, ranking
    assert "ARD matches &lt;dense&gt;" in page and 'badge bad">refuted' in page and 'href="#claims"' in page
    assert '"layer.1","layer.10"' in page.replace(", ", ",")  # heatmap columns keep the given (model) order
    assert "<b>torch</b> 2.13" in page and "0.9" in page
    two_metrics = render_html("r", pd.concat([_board(), _board().assign(metric="time_s")]), {}, {}, None, None, {})
    assert two_metrics.count('<table class="leaderboard">') == 2 and "Leaderboard: time_s" in two_metrics
    without = render_html("r", _board(), {}, {}, None, None, {})
    assert 'id="claims"' not in without and "No run environment" in without and "No ranking" in without


def test_write_html_report_takes_claims(cli, write_suite, tmp_path):
    out = tmp_path / "out"
    suite = SUITE.replace("seeds: [0, 1, 2]", "seeds: [0]").replace(", {toy: {size: 16}}", "")
    cli("run", write_suite(suite), "--out", out, "--plugins-dir", GOOD_PLUGINS, "--executor", "inprocess")
    claims = pd.DataFrame([{"claim": "energy beats uniform", "source": "README", "verdict": "supported",
                            "numbers": "0.5 vs 0.6"}])
    text = write_html_report(out, claims=claims).read_text()
    assert "energy beats uniform" in text and "n too small" in text and "toy[size=20]" in text


# ----------------------------------------------------------------------------------------- the nightly site offline

def _asv_www() -> Path:
    import asv

    return Path(asv.__file__).parent / "www"


def test_every_cdn_address_of_asvs_pages_has_a_local_copy():
    for page in sorted(_asv_www().glob("*.html")):
        text = page.read_text()
        assert set(vendor.remote_addresses(text)) <= set(vendor.ASSETS), page
        rewritten, needed = vendor.rewrite_page(text)
        assert vendor.remote_addresses(rewritten) == []
        assert vendor.rewrite_page(rewritten)[0] == rewritten  # idempotent
        if page.name == "index.html":
            assert needed == set(vendor.ASSETS.values())
            assert "integrity=" not in rewritten and "crossorigin=" not in rewritten
            assert 'href="https://github.com/airspeed-velocity/asv/"' in rewritten  # a link, not a resource
    with pytest.raises(vendor.VendorError, match="cdn.example"):
        vendor.rewrite_page('<script src="https://cdn.example/x.js"></script>')


def test_vendor_site_copies_the_files_and_fetch_is_cached(tmp_path):
    store = tmp_path / "store"
    for name in vendor.PACKAGES:
        (vendor.package_dir(store, name)).mkdir(parents=True)
        (vendor.package_dir(store, name) / "package.json").write_text("{}")
    for name, inner in vendor.ASSETS.values():
        path = vendor.package_dir(store, name) / inner
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"/* {name} {inner} */")
    fonts = vendor.package_dir(store, "bootstrap") / "dist" / "fonts"
    fonts.mkdir()
    (fonts / "glyphicons-halflings-regular.woff").write_text("font")
    assert vendor.fetch(store, npm="no-such-npm") == []  # all there: npm is not even looked for
    site = tmp_path / "site"
    shutil.copytree(_asv_www(), site)
    assert vendor.main(["site", str(site), str(store)]) == 0  # what `make nightly` runs after `asv publish`
    assert (site / "vendor" / "jquery@3.3.1" / "dist" / "jquery.min.js").is_file()
    assert (site / "vendor" / "bootstrap@3.1.1" / "dist" / "fonts" / "glyphicons-halflings-regular.woff").is_file()
    assert "vendor/jquery@3.3.1/dist/jquery.min.js" in (site / "index.html").read_text()
    assert vendor.vendor_site(site, store) == []
    with pytest.raises(vendor.VendorError, match="no HTML pages"):
        vendor.vendor_site(tmp_path / "store", store)


def test_unpack_refuses_entries_outside_the_package(tmp_path):
    import io
    import tarfile

    tarball = tmp_path / "evil.tgz"
    with tarfile.open(tarball, "w:gz") as archive:
        for name in ["package/package.json", "package/../../escape.js"]:
            info = tarfile.TarInfo(name)
            info.size = 2
            archive.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(vendor.VendorError, match="unexpected entry"):
        vendor._unpack(tarball, tmp_path / "out")
    assert not (tmp_path / "escape.js").exists()


BENCHMARK = '''from pathlib import Path


def track_quality():
    return float((Path(__file__).parent / "value.txt").read_text())


track_quality.unit = "rel_error"
'''


def _published_site(root: Path) -> Path:
    """A real ``asv publish`` of five commits of a one-benchmark project, the last two worse (a regression): the
    benchmark's source stays the same (asv drops results of other benchmark versions), a data file changes."""
    asv = Path(sys.executable).with_name("asv")
    project = root / "project"
    (project / "benchmarks").mkdir(parents=True)
    (project / "benchmarks" / "__init__.py").write_text("")
    (project / "benchmarks" / "bench.py").write_text(BENCHMARK)
    (project / "asv.conf.json").write_text(
        '{"version": 1, "project": "offline", "repo": ".", "dvcs": "git", "branches": ["main"], '
        '"environment_type": "virtualenv", "benchmark_dir": "benchmarks", "results_dir": ".asv/results", '
        '"html_dir": ".asv/html", "env_dir": ".asv/env"}'
    )
    env = {**os.environ, "HOME": str(root / "home")}  # asv machine writes ~/.asv-machine.json

    def run(*args):
        result = subprocess.run([str(a) for a in args], cwd=project, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, f"{args}: {result.stdout}{result.stderr}"
        return result.stdout.strip()

    run("git", "init", "-q", "-b", "main")
    run(asv, "machine", "--yes", "--machine", "ci")
    for value in ["0.5", "0.5", "0.5", "1.0", "1.0"]:
        (project / "benchmarks" / "value.txt").write_text(value)
        run("git", "add", "-A")
        run("git", "-c", "user.name=test", "-c", "user.email=test@example.org", "commit", "-q", "-m", value)
        run(asv, "run", "--python=same", "--machine", "ci", "--set-commit-hash", run("git", "rev-parse", "HEAD"))
    run(asv, "publish")
    site = project / ".asv" / "html"
    assert "track_quality" in (site / "regressions.json").read_text()
    return site


class _Server:
    """The published site over http://127.0.0.1 (as ``asv preview`` serves it: the pages fetch their JSON)."""

    def __init__(self, folder: Path):
        class Quiet(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=folder))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return f"http://127.0.0.1:{self.httpd.server_port}"

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.browser
def test_nightly_site_works_offline_once_vendored(tmp_path, browser):
    if vendor.missing(VENDOR_DIR):
        _unavailable(f"the nightly site's libraries are not in {VENDOR_DIR}: run `make asv-vendor`")
    published = _published_site(tmp_path)
    before, after = tmp_path / "before", tmp_path / "after"
    shutil.copytree(published, before)
    shutil.copytree(published, after)
    assert [p.name for p in vendor.vendor_site(after, VENDOR_DIR)] == ["index.html"]

    loaded = "return document.readyState === 'complete'"
    # as asv publishes it, offline: the CDN scripts fail and the page sends the reader to the swallow
    with _Server(before) as base:
        _open(browser, f"{base}/index.html", loaded)
        deadline = time.monotonic() + 15
        while "error.html" not in browser.current_url and time.monotonic() < deadline:
            time.sleep(0.2)
        assert browser.current_url.endswith("/error.html") and SWALLOW in browser.page_source

    # vendored: the grid and the regressions page draw from the local copies, without a console error
    with _Server(after) as base:
        shown = ("return document.readyState === 'complete' && window.$ !== undefined && "
                 "$('#summarygrid-display .benchmark-container canvas.flot-base').length > 0")  # flot drew it
        log = _open(browser, f"{base}/index.html", shown)
        assert browser.current_url.startswith(f"{base}/index.html") and SWALLOW not in browser.page_source
        assert not _errors(log), log
        assert "track_quality" in browser.find_element("tag name", "body").text

        table = "return window.$ !== undefined && $('#regressions-body table tbody tr').length > 0"
        log = _open(browser, f"{base}/index.html#/regressions", table)
        assert SWALLOW not in browser.page_source and not _errors(log), log
        body = browser.find_element("id", "regressions-body").text
        assert "track_quality" in body
        browser.save_screenshot(str(tmp_path / "regressions.png"))

    # opened straight from disk the libraries load too (asv's data requests need a server: `asv preview`)
    libraries = ("return [typeof jQuery, typeof jQuery.plot, typeof jQuery.fn.stupidtable, typeof jQuery.fn.modal, "
                 "typeof md5].every(t => t === 'function')")
    log = _open(browser, (after / "index.html").as_uri(), loaded)
    assert "error.html" not in browser.current_url and SWALLOW not in browser.page_source
    assert browser.execute_script(libraries)
    assert not [e for e in _errors(log) if re.search(r"\.(js|css)\b", e["message"]) and ".json" not in e["message"]]
