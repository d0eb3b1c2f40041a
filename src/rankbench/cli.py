"""The ``bench`` command line:

* ``bench run SUITE`` -- expand a suite into cells, run the unfinished ones, write results (resumes);
* ``bench check SUITE`` -- validate a suite without running it; print the cells per task;
* ``bench plugins`` -- list the plugins and the ones that failed to load;
* ``bench report DIR`` -- summary table, plots and ``DIR/report/report.md`` for a results folder;
* ``bench check-results DIR`` -- verify every cell's part files against its marker; list the damaged ones;
* ``bench compare A B`` -- compare two results folders per configuration; flag changes beyond seed noise;
* ``bench test-plugin NAME`` -- run one plugin through the conformance checks every built-in passes;
* ``bench verify CLAIMS RESULTS_DIR...`` -- judge published claims on results folders (writes nothing).

Exit codes: 0 success; 1 at least one cell failed (``run``), a regression beyond noise (``compare``), a damaged
cell (``check-results``), a failed check (``test-plugin``) or a contradicted claim (``verify``); 2 bad input (one
message on stderr naming the file, the key and what was expected; no traceback; nothing written) or a results
folder in use by another ``bench run``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class BadInput(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench", description="rankbench: benchmark low-rank methods at equal budgets")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="expand a suite into cells, run them, write results (resumes by default)")
    run.add_argument("suite", help="suite YAML file")
    run.add_argument("--out", help="output folder (default: results/<suite name>/)")
    run.add_argument("--force", action="store_true", help="re-run cells that already finished")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"],
                     help="default: the suite's, else auto: cuda when torch sees a GPU, except for tasks too small "
                          "to gain from one (gpu_benefit = False), which stay on the cpu; cuda runs every task there")
    run.add_argument("--executor", help="executor plugin (default: the suite's, else the one `bench plugins` marks)")
    run.add_argument("--plugins-dir", help="also load every *.py plugin file in this folder")
    run.add_argument("--timeout", type=float, help="seconds per cell (overrides the suite); 0 disables the limit")
    run.add_argument("--threads", type=int, help="torch CPU threads in the process that runs cells (default: torch's)")
    run.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                     help="deterministic torch where cells run: torch.use_deterministic_algorithms(True) (an op "
                          "without a deterministic version fails its cell), CUBLAS_WORKSPACE_CONFIG=:4096:8, cudnn "
                          "deterministic, no cudnn benchmark; recorded in the run's environment (default: the "
                          "suite's `deterministic`, else off)")

    check = sub.add_parser("check", help="validate a suite without running it; print cells per task")
    check.add_argument("suite")
    check.add_argument("--plugins-dir")
    check.add_argument("--device", choices=["auto", "cpu", "cuda"])

    plugins = sub.add_parser("plugins", help="list plugins: name, kind, distribution, version, load failures")
    plugins.add_argument("--plugins-dir")

    report = sub.add_parser("report", help="summary table, plots (PNG) and a Markdown report for a results folder")
    report.add_argument("dir", help="results folder written by `bench run`")
    report.add_argument("--claims", help="claims file: add the verdicts of `bench verify CLAIMS DIR` to the report")

    check_results = sub.add_parser("check-results", help="verify every part file of a results folder; list damaged cells")
    check_results.add_argument("dir", help="results folder written by `bench run`")

    compare = sub.add_parser("compare", help="compare two results folders per configuration; flag changes beyond noise")
    compare.add_argument("a", help="baseline results folder")
    compare.add_argument("b", help="results folder to check against the baseline")
    compare.add_argument("--out", help="output folder (default: B/compare-vs-<name of A>/)")
    compare.add_argument("--threshold", action="append", metavar="KIND=FRACTION", help="e.g. quality=0.05 (repeatable)")
    compare.add_argument("--fail-on", metavar="KINDS", help="kinds whose regressions exit 1 (default: quality)")

    test = sub.add_parser(
        "test-plugin",
        help="run a plugin through the checks every built-in passes (loads, parameters, tiny runs, budget, seed)",
    )
    test.add_argument("name", help="plugin name (or the file stem of a --plugins-dir plugin that fails to load)")
    test.add_argument("--plugins-dir", help="also load every *.py plugin file in this folder")
    test.add_argument("--kind", choices=["task", "selector", "factorization", "executor"],
                      help="the plugin's kind, where the name is taken by several")
    test.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu", help="where the tiny cells run")
    test.add_argument("--timeout", type=float, help="seconds per tiny cell (default 300)")
    test.add_argument("--out", help="keep the tiny runs' results in this folder (default: a temporary folder)")

    verify = sub.add_parser("verify", help="judge the claims of a claims file on results folders (writes nothing)")
    verify.add_argument("claims", help="claims YAML file (e.g. claims/seeds.yaml)")
    verify.add_argument("dirs", nargs="+", metavar="RESULTS_DIR", help="results folders written by `bench run`")
    return parser


def _plugins_dir(value: str | None) -> str | None:
    if value is None:
        return None
    if not Path(value).is_dir():
        raise BadInput(f"--plugins-dir: expected an existing folder (got {value!r})")
    return str(Path(value).resolve())


def _prepare(args):
    """Load plugins, the suite and its cells; every problem becomes BadInput/SuiteError before anything is written."""
    from rankbench.envinfo import resolve_device
    from rankbench.plugins import load_plugins
    from rankbench.suite import expand, load_suite

    plugins_dir = _plugins_dir(args.plugins_dir)
    suite = load_suite(args.suite)
    registry = load_plugins(plugins_dir)
    requested = args.device or suite.spec.device or "auto"
    try:
        device = resolve_device(requested)
    except ValueError as exc:
        raise BadInput(f"--device: {exc}") from None
    timeout = suite.spec.timeout
    if getattr(args, "timeout", None) is not None:
        if not (args.timeout >= 0 and math.isfinite(args.timeout)):
            raise BadInput(f"--timeout: expected finite seconds >= 0, 0 for no limit (got {args.timeout})")
        timeout = args.timeout or None
    cells = expand(suite, registry, device, timeout, device_is_auto=requested == "auto")
    return suite, registry, device, timeout, cells, plugins_dir


def cmd_check(args) -> int:
    suite, registry, device, _, cells, _ = _prepare(args)
    _executor(args, suite, registry)  # the suite's executor and its parameters are checked too
    from tabulate import tabulate

    rows: dict[str, list[int]] = {}
    for cell in cells:
        counts = rows.setdefault(cell.task, [0, 0, 0])
        counts[0 if cell.is_reference else (2 if cell.skip_reason else 1)] += 1
    table = [[task, ref, run, skip, ref + run + skip] for task, (ref, run, skip) in rows.items()]
    on_cpu = sorted({cell.task for cell in cells if cell.device != device})
    kept = f" (auto keeps {', '.join(on_cpu)} on the cpu: gpu_benefit = False)" if on_cpu else ""
    print(f"{suite.path}: suite {suite.name!r} is valid: {len(cells)} cells on {device}{kept}")
    print(tabulate(table, headers=["task", "reference", "to run", "skipped", "cells"]))
    for failure in registry.failures:
        print(f"warning: plugin {failure.plugin} failed to load: {failure.error}", file=sys.stderr)
    return EXIT_OK


def _executor(args, suite, registry):
    """The executor: ``--executor NAME`` (with the suite's parameters when the suite names the same one), else the
    suite's ``executor`` (a name or ``{name: {param: value}}``), else the executor plugin that declares itself the
    default (``Executor.default``)."""
    from rankbench.suite import SuiteError, resolve_ref

    ref = suite.spec.executor
    suite_name = None if ref is None else (ref if isinstance(ref, str) else next(iter(ref)))
    wanted = getattr(args, "executor", None)  # `bench check` has no --executor
    if wanted is not None and wanted != suite_name:
        if wanted not in registry.plugins["executor"]:
            known = ", ".join(registry.names("executor")) or "none loaded"
            raise BadInput(f"--executor: unknown executor {wanted!r}; expected one of: {known}")
        ref = wanted
    if isinstance(ref, dict) and len(ref) != 1:
        raise SuiteError(suite.path, "executor", f"expected a name or {{name: {{param: value}}}} (got {ref!r})")
    if not ref:
        try:
            ref = registry.default_executor()
        except LookupError as exc:
            raise BadInput(f"{exc}: name one with --executor or the suite's `executor`") from None
    return resolve_ref(registry, "executor", ref, suite.path, "executor").instance


def cmd_run(args) -> int:
    suite, registry, device, timeout, cells, plugins_dir = _prepare(args)
    executor = _executor(args, suite, registry)
    out = Path(args.out) if args.out else Path("results") / suite.name
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out: expected a folder (got the file {str(out)!r})")

    from rich.console import Console

    from rankbench.envinfo import environment
    from rankbench.runner import Runtime, pending_cells, run_cells, summarize, use_deterministic_torch, write_run_info

    if args.threads is not None and args.threads < 1:
        raise BadInput(f"--threads: expected a positive integer (got {args.threads})")
    threads = args.threads or suite.spec.threads
    deterministic = suite.spec.deterministic if args.deterministic is None else args.deterministic
    console = Console(stderr=True)
    for failure in registry.failures:
        console.print(f"[yellow]warning[/]: plugin {failure.plugin} failed to load: {failure.error}")
    from rankbench.files import FolderBusy, FolderLock

    lock = FolderLock(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except FolderBusy as exc:
        raise BadInput(str(exc)) from None
    except OSError as exc:
        raise BadInput(f"--out: expected a folder that can be created and written ({exc.strerror}: {out})") from None
    with lock:
        scan = None
        if not args.force:
            pending, scan = pending_cells(cells, out)
            if not pending:  # a finished suite: answered from its folder, nothing set up (no torch, no run record)
                console.print(f"nothing to run: all {len(cells)} cells already finished in {out}")
                return _run_summary(summarize(out, cells, scan), out)
        if threads:
            import torch

            torch.set_num_threads(threads)  # in-process cells; the subprocess worker applies it itself
        if deterministic:  # before `environment` initialises CUDA; spawned workers inherit the variable (and apply it)
            use_deterministic_torch()
        env = environment(device, registry, deterministic)
        write_run_info(out, env, suite.path, {k: v for k, v in vars(args).items() if k != "func"})
        runtime = Runtime(registry=registry, device=device, timeout=timeout, plugins_dir=plugins_dir,
                          threads=threads, deterministic=deterministic)
        counts = run_cells(
            cells, out, runtime, executor, {"git_sha": env["git_sha"], "device": device}, args.force, console, scan
        )
    return _run_summary(counts, out)


def _run_summary(counts: dict[str, int], out: Path) -> int:
    """Print a run's status counts; exit 1 when any cell did not end ok or skipped."""
    from tabulate import tabulate

    print(tabulate(sorted(counts.items()), headers=["status", "cells"]))
    print(f"results: {out}")
    failed = sum(n for status, n in counts.items() if status not in ("ok", "skipped"))
    return EXIT_FAILED if failed else EXIT_OK


def cmd_plugins(args) -> int:
    from tabulate import tabulate

    from rankbench.plugins import load_plugins

    registry = load_plugins(_plugins_dir(args.plugins_dir))
    rows = [
        [info.name, info.kind, info.distribution, info.dist_version, info.version,
         info.cls.description + (" (the default executor)" if info.kind == "executor" and info.cls.default else "")]
        for info in registry.all()
    ]
    print(tabulate(rows, headers=["name", "kind", "distribution", "dist version", "plugin version", "description"]))
    if registry.failures:
        print("\nfailed to load:")
        print(
            tabulate(
                [[f.plugin, f.distribution, f.error] for f in registry.failures],
                headers=["plugin", "distribution", "error"],
            )
        )
    return EXIT_OK


def cmd_report(args) -> int:
    from rankbench import report_freshness

    out = Path(args.dir)
    if not (out / "cells").is_dir():
        raise BadInput(f"{args.dir}: expected a results folder written by `bench run` (no cells/ inside)")
    from rankbench.results import verified_scan

    scan = verified_scan(out)  # the report's readers reuse it
    if not scan.markers:
        damaged = f" ({len(scan.damaged)} damaged: `bench check-results {args.dir}`)" if scan.damaged else ""
        raise BadInput(f"{args.dir}: expected a results folder with finished cells (no finished cells{damaged})")
    if args.claims and not Path(args.claims).is_file():
        raise BadInput(f"{args.claims}: claims file not found (--claims expects a claims YAML file)")
    digest = report_freshness.inputs_digest(scan.markers, args.claims)
    stored = report_freshness.fresh(out / "report", digest)
    if stored is not None:  # the folder, claims and code are those of the report already there
        print(stored, end="")
        print(f"(up to date: {out / 'report'} is the report of these cells; nothing redrawn)")
        return EXIT_OK
    with _tee_stdout() as printed:
        _write_report(out, args.claims)
    files = [p.name for p in (out / "report").iterdir() if p.is_file() and p.name != report_freshness.STATE]
    report_freshness.record(out / "report", digest, printed.getvalue(), files)
    return EXIT_OK


@contextlib.contextmanager
def _tee_stdout():
    """Everything printed inside, also kept (a StringIO) -- the text a fresh report prints again."""
    kept = io.StringIO()
    real = sys.stdout

    class Tee(io.TextIOBase):
        def write(self, text: str) -> int:
            kept.write(text)
            return real.write(text)

        def flush(self) -> None:
            real.flush()

    sys.stdout = Tee()
    try:
        yield kept
    finally:
        sys.stdout = real


def _write_report(out: Path, claims_file: str | None) -> None:
    from rankbench.html_report import write_html_report
    from rankbench.leaderboard import summarise
    from rankbench.report import make_report

    claims = None
    if claims_file:
        from rankbench.verify import ClaimsError, check_claims, load_claims, verdict_frame

        try:
            claims = verdict_frame(check_claims(load_claims(claims_file), [out]))
        except ClaimsError as exc:
            raise BadInput(str(exc)) from None
    data = summarise(out)  # leaderboard, pairwise calls and rankings, once for both reports
    report_path = make_report(out, claims=claims, data=data)
    print(f"report: {report_path}")
    print(f"html report: {write_html_report(out, claims=claims, data=data)}")  # one page that opens offline


def cmd_check_results(args) -> int:
    from rankbench.results import scan_results

    out = Path(args.dir)
    if not (out / "cells").is_dir():
        raise BadInput(f"{args.dir}: expected a results folder written by `bench run` (no cells/ inside)")
    scan = scan_results(out)
    for cell_id, problem in sorted(scan.damaged.items()):
        print(f"damaged: cell {cell_id}: {problem}")
    print(f"{out}: {len(scan.markers)} cell(s) verify, {len(scan.damaged)} damaged"
          + (" (`bench run` on the suite re-runs them)" if scan.damaged else ""))
    return EXIT_FAILED if scan.damaged else EXIT_OK


def cmd_compare(args) -> int:
    from rankbench.compare import CompareInputError, run

    try:
        return run(args)
    except CompareInputError as exc:
        raise BadInput(str(exc)) from None


SUPERVISED_ENV = "RANKBENCH_TEST_PLUGIN_SUPERVISED"


def _supervised_test_plugin(args) -> int:
    """Run the checks in a child ``bench test-plugin`` (same arguments) and relay its output: a plugin that kills
    the process running it (a segfault, ``os._exit``) becomes a failed check with the step it died in."""
    import signal
    import subprocess
    import threading

    command = [sys.executable, "-m", "rankbench.cli", "test-plugin", args.name]
    for option in ("plugins_dir", "kind", "device", "timeout", "out"):
        value = getattr(args, option)
        if value is not None:
            command += [f"--{option.replace('_', '-')}", str(value)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, SUPERVISED_ENV: "1"})
    steps: list[str] = []

    def relay_log() -> None:  # progress lines as they come
        for line in proc.stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
            if line.startswith("test-plugin: "):
                steps.append(line[len("test-plugin: "):].strip())

    relay = threading.Thread(target=relay_log, daemon=True)
    relay.start()
    sys.stdout.write(proc.stdout.read())
    code = proc.wait()
    relay.join(10)
    last = steps[-1] if steps else ""
    if code >= 0 and code in (EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, 130):
        return code
    try:
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    except ValueError:
        how = f"killed by signal {-code}"
    print(f"FAIL  crash  the process running the checks of {args.name!r} was {how}"
          + (f" during: {last}" if last else ""))
    print("1 check failed: the plugin takes down the process that runs it")
    return EXIT_FAILED


def cmd_test_plugin(args) -> int:
    if not os.environ.get(SUPERVISED_ENV):
        return _supervised_test_plugin(args)
    from rankbench.conformance import CELL_TIMEOUT, ConformanceInputError, format_report, run_conformance
    from rankbench.envinfo import resolve_device

    plugins_dir = _plugins_dir(args.plugins_dir)
    try:
        resolve_device(args.device)  # cuda without a GPU: bad input now, not a failed check later
    except ValueError as exc:
        raise BadInput(f"--device: {exc}") from None
    device = args.device  # as asked: under auto, tasks with gpu_benefit = False stay on the CPU
    if args.timeout is not None and not (args.timeout > 0 and math.isfinite(args.timeout)):
        raise BadInput(f"--timeout: expected finite seconds > 0 (got {args.timeout})")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise BadInput(f"--out: expected a folder (got the file {args.out!r})")
    try:
        report = run_conformance(
            args.name, args.kind, plugins_dir, device, args.timeout or CELL_TIMEOUT, args.out,
            log=lambda message: print(f"test-plugin: {message}", file=sys.stderr, flush=True),
        )
    except ConformanceInputError as exc:
        raise BadInput(f"test-plugin: {exc}") from None
    print(format_report(report))
    print(report.summary())
    return EXIT_OK if report.passed else EXIT_FAILED


def cmd_verify(args) -> int:
    from tabulate import tabulate

    from rankbench.verify import CONTRADICTED, VERDICTS, ClaimsError, check_claims, load_claims, verdict_frame

    try:
        claims = load_claims(args.claims)
        verdicts = check_claims(claims, args.dirs)
    except ClaimsError as exc:
        raise BadInput(str(exc)) from None
    frame = verdict_frame(verdicts)
    print(tabulate(frame.values.tolist(), headers=list(frame.columns), maxcolwidths=[None, 36, None, 90]))
    counts = {v: sum(x.verdict == v for x in verdicts) for v in VERDICTS}
    summary = ", ".join(f"{n} {v}" for v, n in counts.items() if n)
    print(f"{len(verdicts)} claim{'s' if len(verdicts) != 1 else ''}: {summary}")
    return EXIT_FAILED if counts[CONTRADICTED] else EXIT_OK


COMMANDS = {
    "run": cmd_run,
    "check": cmd_check,
    "plugins": cmd_plugins,
    "report": cmd_report,
    "compare": cmd_compare,
    "check-results": cmd_check_results,
    "test-plugin": cmd_test_plugin,
    "verify": cmd_verify,
}


def main(argv: list[str] | None = None) -> int:
    from rankbench.suite import SuiteError

    from rankbench import stopping

    args = _parser().parse_args(argv)
    restore_signals = stopping.install()
    try:
        return COMMANDS[args.command](args)
    except (SuiteError, BadInput) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as exc:
        what, code = ("terminated", 143) if isinstance(exc, stopping.Terminated) else ("interrupted", 130)
        print(f"{what}: finished cells are saved; run the same command again to resume", file=sys.stderr)
        return code
    except BrokenPipeError:  # e.g. `bench plugins | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    finally:
        restore_signals()


if __name__ == "__main__":
    sys.exit(main())
