"""Helpers of the nightly asv benchmarks (``nightly.py``): plan, labels, one run per commit, and the numbers asv tracks.

Nothing here is a benchmark (no name starts with ``time_``, ``track_``, ``peakmem_``, ``mem_``): asv imports this
module while it discovers benchmarks and finds none. The functions are pure where they can be, so
``tests/test_benchmarks_config.py`` checks them on a small results folder without asv.

* ``plan``: the suite expanded into cells without running anything (plugins loaded, skips decided), the
  configurations that run, one label each, and one representative cell per task family.
* ``make_labels``: ``task[params-short]/selector[params-short]/factorization[params-short]/budget_kind=value``.
  Task parameters: the fewest keys that tell the suite's configurations of that task apart (``matrix-recovery
  [problem=completion]``; nothing when the suite has one configuration of the task). Selector and factorization
  parameters: the ones that differ from the plugin's defaults (``ard[max_rank=10]``, ``sublora[mode=joint]``), so a
  label does not change when other entries are added to the suite. The budget is left out for budget-free
  selectors; the dense reference cell is ``task/none/dense``.
* ``run_suite``: ``bench run SUITE --out .asv/nightly/<commit>/`` (resumable: an interrupted nightly goes on where
  it stopped; the folder stays for ``bench compare`` of two commits), one ``bench run`` per slice of the suite so
  that a cell's recorded peak memory is its own task family's.
* ``summarize``: per label, the median over seeds of the lower-is-better quality number, the cell wall time and
  peak memory, and which seeds did not finish ``ok``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

# asv assumes lower is better for every number it tracks (it has no ``higher_is_better``): a higher-is-better
# primary metric is tracked through an honest lower-is-better counterpart, named for what it is.
AS_LOWER_IS_BETTER = {"accuracy": ("top1_error", lambda v: 1.0 - v)}
UNITS = {
    "rel_error": "relative error ||X - X*||_F / ||X*||_F",
    "rmse": "RMSE (rating scale)",
    "l2re": "relative L2 error",
    "ppl_token": "perplexity (per token)",
    "top1_error": "top-1 error rate (1 - accuracy)",
}
RESULTS_ENV = "RANKBENCH_NIGHTLY_DIR"  # base folder of the per-commit results folders (default ROOT/.asv/nightly)
COMMIT_ENV = "RANKBENCH_NIGHTLY_COMMIT"  # the commit a run is stored under (else ASV_COMMIT, else git HEAD[-dirty])
ARGS_ENV = "RANKBENCH_NIGHTLY_ARGS"  # `bench run` arguments, replacing DEFAULT_ARGS (e.g. "--threads 2")
# One torch thread per cell: on a shared machine a second OpenMP thread that is descheduled makes every parallel
# region wait, and cell times then jump x10-x50 from one run to the next (measured on 2 busy cores: a 7 ms recovery
# cell took 7-14 ms with one thread, 35-516 ms with two). Per-commit tracking needs comparable times first.
DEFAULT_ARGS = "--threads 1"


def tracked_quality(metric: str) -> str:
    """The lower-is-better name asv tracks for a task's primary metric (``accuracy`` -> ``top1_error``)."""
    return AS_LOWER_IS_BETTER[metric][0] if metric in AS_LOWER_IS_BETTER else metric


def quality_unit(name: str) -> str:
    return UNITS.get(name, name)


# ------------------------------------------------------------------------------------------------------------ labels


def _canon(params: dict | str) -> str:
    """Parameters as the results tables store them (JSON, sorted keys), whatever form they come in."""
    return json.dumps(json.loads(params) if isinstance(params, str) else params, sort_keys=True)


def _budget(value) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


def config_key(task, task_params, selector, selector_params, factorization, factorization_params, budget) -> tuple:
    """A configuration without its seed (seeds are repeats), as ``bench compare`` matches them."""
    return (
        task, _canon(task_params), selector, _canon(selector_params), factorization, _canon(factorization_params),
        _budget(budget),
    )


def cell_key(cell) -> tuple:
    return config_key(cell.task, cell.task_params, cell.selector, cell.selector_params, cell.factorization,
                      cell.factorization_params, cell.budget)


def row_key(row) -> tuple:
    """``config_key`` of a row of the ``cells`` or ``metrics`` table."""
    return config_key(row["task"], row["task_params"], row["selector"], row["selector_params"], row["factorization"],
                      row["factorization_params"], row["budget"])


def fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)


def _short(params: dict, keys: list[str]) -> str:
    return "[" + ",".join(f"{k}={fmt(params.get(k))}" for k in keys) + "]" if keys else ""


def distinguishing_keys(configs: list[dict]) -> list[str]:
    """The fewest keys (greedy, ties in field order) whose values tell the configurations apart."""
    unique = list({json.dumps(c, sort_keys=True): c for c in configs}.values())
    if len(unique) <= 1:
        return []
    order = list(dict.fromkeys(k for c in unique for k in c))

    def groups(keys: list[str]) -> int:
        return len({json.dumps([c.get(k) for k in keys], sort_keys=True) for c in unique})

    chosen: list[str] = []
    while groups(chosen) < len(unique):
        rest = [k for k in order if k not in chosen]
        best = max(rest, key=lambda k: (groups(chosen + [k]), -order.index(k)))
        if groups(chosen + [best]) == groups(chosen):
            break
        chosen.append(best)
    return chosen


def non_default_keys(params: dict, defaults: dict | None) -> list[str]:
    if defaults is None:
        return sorted(params)
    return [k for k in params if k not in defaults or defaults[k] != params[k]]


def make_labels(cells, defaults: dict[tuple[str, str], dict | None]) -> dict[tuple, str]:
    """``config_key`` -> label for the given cells (seeds collapse). ``defaults[(kind, name)]`` are a plugin's
    default parameters (JSON form), None where it has required ones. Labels are unique: a clash (two configurations
    that differ only in a way the short form hides) gets ``#`` and a hash of the configuration."""
    by_task: dict[str, list[dict]] = {}
    for cell in cells:
        by_task.setdefault(cell.task, []).append(cell.task_params)
    task_keys = {task: distinguishing_keys(configs) for task, configs in by_task.items()}
    labels: dict[tuple, str] = {}
    for cell in cells:
        key = cell_key(cell)
        if key in labels:
            continue
        parts = [cell.task + _short(cell.task_params, task_keys[cell.task])]
        for kind, name, params in (("selector", cell.selector, cell.selector_params),
                                   ("factorization", cell.factorization, cell.factorization_params)):
            parts.append(name + _short(params, non_default_keys(params, defaults.get((kind, name)))))
        if cell.budget is not None:
            parts.append(f"{cell.budget_kind}={cell.budget:g}")
        labels[key] = "/".join(parts)
    seen: dict[str, list[tuple]] = {}
    for key, label in labels.items():
        seen.setdefault(label, []).append(key)
    for label, keys in seen.items():
        if len(keys) > 1:
            for key in keys:
                labels[key] = f"{label}#{hashlib.sha256(repr(key).encode()).hexdigest()[:6]}"
    return labels


# -------------------------------------------------------------------------------------------------------------- plan


@dataclasses.dataclass(frozen=True)
class Config:
    label: str
    key: tuple
    task: str
    primary: str  # the task's primary metric as recorded (e.g. accuracy)
    quality: str  # the lower-is-better number asv tracks (e.g. top1_error)


@dataclasses.dataclass
class Plan:
    suite: Path
    registry: Any
    device: str
    configs: dict[str, Config]  # label -> configuration, in suite order
    representatives: dict[str, Any]  # label -> the cell run in asv's own process (one per task family)

    def labels(self, quality: str | None = None) -> list[str]:
        return [c.label for c in self.configs.values() if quality is None or c.quality == quality]

    def qualities(self) -> list[str]:
        return list(dict.fromkeys(c.quality for c in self.configs.values()))


def _defaults(info) -> dict | None:
    try:
        return info.cls.Params().model_dump(mode="json")
    except Exception:  # a plugin with required parameters has no defaults to compare with
        return None


def plan(suite_path: str | Path) -> Plan:
    """Expand the suite as ``bench run`` would (same plugins, device, timeout), without running anything."""
    from rankbench.envinfo import resolve_device
    from rankbench.plugins import load_plugins
    from rankbench.suite import expand, load_suite

    registry = load_plugins()
    suite = load_suite(suite_path)
    requested = bench_option("device") or suite.spec.device or "auto"
    device = resolve_device(requested)  # as `bench run` will decide it (auto keeps gpu_benefit = False tasks on cpu)
    cells = [c for c in expand(suite, registry, device, suite.spec.timeout, device_is_auto=requested == "auto")
             if not c.skip_reason]
    defaults = {(kind, name): _defaults(registry.get(kind, name))
                for c in cells if not c.is_reference
                for kind, name in (("selector", c.selector), ("factorization", c.factorization))}
    labels = make_labels(cells, defaults)
    primaries: dict[tuple, str] = {}
    configs: dict[str, Config] = {}
    representatives: dict[str, Any] = {}
    for cell in cells:
        task_id = (cell.task, _canon(cell.task_params))
        if task_id not in primaries:
            info = registry.get("task", cell.task)
            primaries[task_id] = str(info.cls(info.cls.Params.model_validate(cell.task_params)).primary_metric)
        label = labels[cell_key(cell)]
        if label not in configs:
            primary = primaries[task_id]
            configs[label] = Config(label, cell_key(cell), cell.task, primary, tracked_quality(primary))
        if not cell.is_reference and all(c.task != cell.task for c in representatives.values()):
            representatives[label] = cell
    return Plan(Path(suite_path), registry, device, configs, representatives)


def version(*files: Path) -> str:
    """asv's ``version`` of the nightly benchmarks: a hash of the suite and of the benchmark code. Editing either
    starts new series (asv ignores results measured under another version) instead of mixing numbers that were not
    measured the same way."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------------ the run


def commit_name(root: Path) -> str:
    """The commit a nightly run is stored under: $RANKBENCH_NIGHTLY_COMMIT, else the commit asv installed
    ($ASV_COMMIT, per-commit environments), else the checkout's HEAD with ``-dirty`` when it has local changes."""
    for var in (COMMIT_ENV, "ASV_COMMIT"):
        if os.environ.get(var):
            return os.environ[var]
    git = ["git", "-C", str(root)]
    sha = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    dirty = subprocess.run(git + ["status", "--porcelain"], capture_output=True, text=True, check=True).stdout.strip()
    return sha + ("-dirty" if dirty else "")


def results_folder(root: Path) -> Path:
    base = Path(os.environ.get(RESULTS_ENV) or ".asv/nightly")
    return ((base if base.is_absolute() else root / base) / commit_name(root)).resolve()


def bench_args() -> list[str]:
    """The ``bench run`` arguments of the nightly run: $RANKBENCH_NIGHTLY_ARGS, else ``DEFAULT_ARGS``."""
    import shlex

    args = os.environ.get(ARGS_ENV)
    return shlex.split(DEFAULT_ARGS if args is None else args)


def bench_option(name: str) -> str | None:
    """The value of ``--name`` in ``bench_args`` (``--name V`` or ``--name=V``), else None."""
    args = bench_args()
    for i, arg in enumerate(args):
        if arg == f"--{name}" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


def bench_threads() -> int | None:
    """The ``--threads`` of the nightly run (None: torch's default), for the cells run in asv's own process."""
    value = bench_option("threads")
    return int(value) if value else None


def split_suite(suite: Path, folder: Path) -> list[Path]:
    """The suite as one file per product (its top-level product, then each slice), written into ``folder``: same
    name, seeds, budgets and limits, so the cells and their ids are exactly the suite's. One ``bench run`` per part
    starts one worker per task family, so a cell's recorded ``peak_rss_mb`` is not the memory an earlier family
    (the 135M-parameter LLM) left resident in a shared worker (measured: 2.7 GB for every ViT, PINN and MLP cell
    after the LLM slice, against 0.4-0.5 GB on their own). A suite with one product is run as it is."""
    import yaml

    spec = yaml.safe_load(Path(suite).read_text())
    slices = spec.pop("slices", None) or []
    common = {k: v for k, v in spec.items() if k not in ("tasks", "selectors", "factorizations")}
    parts = ([spec] if spec.get("tasks") is not None else []) + [{**common, "slices": [piece]} for piece in slices]
    if len(parts) <= 1:
        return [Path(suite)]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, part in enumerate(parts):
        path = folder / f"part-{i}.yaml"
        path.write_text(yaml.safe_dump(part, sort_keys=False))
        paths.append(path)
    return paths


def run_suite(suite: Path, folder: Path) -> Path:
    """``bench run`` of the suite into ``folder`` with this interpreter (the commit's code), one run per part
    (``split_suite``), output appended to ``FOLDER.log``. Resumes a folder that already has finished cells. Exit 1
    (some cells failed) is fine here: the benchmarks of those configurations fail with the cell's status and
    reason. Anything else raises, with the end of the log."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    log = folder.parent / f"{folder.name}.log"
    extra = bench_args()
    env = dict(os.environ)
    if os.environ.get("ASV_COMMIT"):  # asv's per-commit build: record the commit installed, not the checkout's HEAD
        env["RANKBENCH_GIT_SHA"] = os.environ["ASV_COMMIT"]
    for part in split_suite(suite, folder.parent / f"{folder.name}.suites"):
        cmd = [sys.executable, "-m", "rankbench.cli", "run", str(part), "--out", str(folder), *extra]
        print(f"nightly: {' '.join(cmd)}  (log: {log})", flush=True)
        with open(log, "a") as out:
            out.write(f"$ {' '.join(cmd)}\n")
            out.flush()
            code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        if code not in (0, 1):
            tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:])
            raise RuntimeError(f"bench run exited with {code}; end of {log}:\n{tail}")
    return folder


# -------------------------------------------------------------------------------------------------- derivation


def _median(values: list[float]) -> float | None:
    values = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(statistics.median(values)) if values else None


def summarize(folder: str | Path, configs: dict[str, Config]) -> dict[str, Any]:
    """The numbers asv tracks, per label, from a results folder: ``quality`` (lower is better), ``wall_s``,
    ``peak_rss_mb``, ``peak_cuda_mb`` (None where not recorded), each the median over the seeds that finished
    ``ok``; ``seeds`` (how many ran) and ``failed`` (``[seed, status, reason]`` of the others)."""
    import pandas as pd

    from rankbench.results import latest_cells, read_results, read_table

    by_key = {c.key: c for c in configs.values()}
    cells = latest_cells(read_table(folder, "cells"))  # a configuration re-run after a plugin changed counts once
    metrics = read_results(folder)
    values: dict[str, dict[str, float]] = {}
    directions: dict[tuple[str, str], Any] = {}
    for row in metrics.itertuples(index=False):
        values.setdefault(row.cell_id, {})[row.metric] = row.value
        directions[(row.cell_id, row.metric)] = row.higher_is_better
    per_label: dict[str, dict[str, list]] = {}
    for row in cells.to_dict("records"):
        config = by_key.get(row_key(row))
        if config is None:  # a cell of a configuration the benchmarks do not track (another suite's, a skip)
            continue
        entry = per_label.setdefault(config.label, {"seeds": [], "failed": [], "quality": [], "wall_s": [],
                                                    "peak_rss_mb": [], "peak_cuda_mb": [], "errors": []})
        entry["seeds"].append(int(row["seed"]))
        if row["status"] != "ok":
            reason = (row["reason"] or "").splitlines()[0] if row["reason"] else ""
            entry["failed"].append([int(row["seed"]), row["status"], reason])
            continue
        got = values.get(row["cell_id"], {})
        primary = config.primary
        if primary not in got:
            entry["errors"].append(f"seed {row['seed']}: no {primary} recorded")
            continue
        higher = directions.get((row["cell_id"], primary))
        higher = None if higher is None or pd.isna(higher) else bool(higher)
        if primary in AS_LOWER_IS_BETTER:
            if higher is False:
                entry["errors"].append(f"{primary} is recorded lower-is-better; {config.quality} assumes higher")
                continue
            value = AS_LOWER_IS_BETTER[primary][1](got[primary])
        elif higher:
            entry["errors"].append(f"{primary} is higher-is-better: add it to AS_LOWER_IS_BETTER in nightlylib.py")
            continue
        else:
            value = got[primary]
        entry["quality"].append(value)
        entry["wall_s"].append(row["wall_s"])
        entry["peak_rss_mb"].append(got.get("peak_rss_mb"))
        entry["peak_cuda_mb"].append(got.get("peak_cuda_mb"))
    summary = {}
    for label, entry in per_label.items():
        summary[label] = {
            "seeds": sorted(entry["seeds"]),
            "failed": entry["failed"] + [[None, "error", e] for e in entry["errors"]],
            **{k: _median(entry[k]) for k in ("quality", "wall_s", "peak_rss_mb", "peak_cuda_mb")},
        }
    return {"folder": str(folder), "configurations": summary}


class Unavailable(Exception):
    """The number is not recorded for this configuration (e.g. no CUDA peak on a CPU run): asv shows n/a."""


def lookup(cache: dict[str, Any], label: str, field: str) -> float:
    """One number of the summary; raises (the benchmark fails, with the reason) when a seed of the configuration
    did not finish ``ok`` or the configuration is missing from the results folder."""
    entry = cache["configurations"].get(label)
    if entry is None:
        raise RuntimeError(f"{label}: no finished cell in {cache['folder']}")
    if entry["failed"]:
        failed = "; ".join(f"seed {s}: {status}: {reason}" for s, status, reason in entry["failed"])
        raise RuntimeError(f"{label}: {len(entry['failed'])} of {len(entry['seeds'])} cells not ok: {failed}")
    value = entry[field]
    if value is None:
        raise Unavailable(f"{label}: {field} not recorded")
    return value


# ------------------------------------------------------------------------------------------------- asv plumbing


class RecordedClock:
    """A clock for asv's ``timer`` attribute that moves only when told: asv's timeit reads it before and after a
    ``time_`` benchmark's body, and the body advances it by the seconds a cell recorded. So ``time_`` reports a time
    measured elsewhere (the cell's wall time in ``bench run``'s worker), with asv's time semantics (unit seconds,
    time graphs and thresholds), without re-running the cell."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += float(seconds)


def check_discovered_params(expected: dict[str, list[list[str]]]) -> None:
    """Fail loudly when the parameters asv discovered differ from this process's: asv passes a benchmark only the
    index of its parameter combination, and ``asv run A..B`` discovers benchmarks once (at one commit), so a commit
    whose code expands the suite differently (a plugin's skip rule changed) would file numbers under the wrong
    labels. Checked against ``benchmarks.json`` of the running ``asv run``; nothing to check outside one."""
    if sys.argv[1:2] not in (["run"], ["run_server"]) or not os.environ.get("ASV_CONF_DIR"):
        return
    conf_dir = Path(os.environ["ASV_CONF_DIR"])
    try:
        conf = json.loads((conf_dir / "asv.conf.json").read_text())
        discovered = json.loads((conf_dir / conf.get("results_dir", "results") / "benchmarks.json").read_text())
    except (OSError, ValueError):
        return
    for name, params in expected.items():
        entry = discovered.get(name)
        if entry is not None and entry.get("params") != [[repr(v) for v in values] for values in params]:
            raise RuntimeError(
                f"{name}: asv discovered other parameters than this commit's code expands the suite into; run the "
                "range one commit at a time (make nightly RANGE=A..B does), so each commit is discovered with its "
                "own code"
            )


def print_regressions(html_dir: str | Path) -> int:
    """Print the regressions ``asv publish`` found (its ``regressions.json``: every series whose latest value is
    worse than its best by more than the series' threshold). Returns how many."""
    path = Path(html_dir) / "regressions.json"
    if not path.exists():
        print(f"no {path} (run asv publish first)")
        return 0
    rows = json.loads(path.read_text()).get("regressions", [])
    for name, _graph, params, _idx, last, best, _jumps in rows:
        change = f"{(last / best - 1) * 100:+.1f} %" if best else f"{last - best:+.3g}"
        where = f" {params}" if params else ""
        print(f"regression: {name}{where}: latest {last:.6g}, best {best:.6g} ({change})")
    return len(rows)


if __name__ == "__main__":  # python benchmarks/asv/nightlylib.py regressions .asv/html
    if sys.argv[1:2] == ["regressions"]:
        n = print_regressions(sys.argv[2] if len(sys.argv) > 2 else ".asv/html")
        print(f"{n} regression(s) on the regressions page")
    else:
        print(__doc__)
