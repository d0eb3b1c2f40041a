"""``bench report DIR``: a summary table (median and spread over seeds), seaborn plots, and ``DIR/report/report.md``.

Plots (PNG, in ``DIR/report/``):
* ``quality_vs_params.png``: each task configuration's primary metric against the parameter ratio each method ended
  with, one line per selector + factorization; the dense reference as a dashed line. Using the *achieved* ratio puts
  budget-driven and budget-free selectors on one axis.
* ``quality_table.png``: the median primary metric per selector (and budget) and factorization, per task configuration.
* ``time_per_method.png``: wall time per cell by phase, per method.
* ``ranks_<task>.png``: per task configuration, ranks per site as a heatmap (rows: method and budget; columns: the
  sites in model order). ``<task>`` is a filesystem-safe slug of the configuration's label (``figure_names``): the
  task name, plus the parameters that tell the folder's configurations of that task apart, e.g.
  ``ranks_matrix-recovery-problem-completion.png``; a short hash of the label is appended where the slug would be
  long or would not be unique.
* ``curves.png``: stored curves (e.g. error against iteration), one line per cell, log scale.
"""

from __future__ import annotations

import hashlib
import re
import textwrap
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from tabulate import tabulate

from rankbench import results
from rankbench.files import atomic_write
from rankbench.cells import REFERENCE_FACTORIZATION

METHOD_COLUMNS = ["task_config", "selector", "factorization", "budget"]


def load(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    cells = results.read_table(out, "cells")
    if cells.empty:
        return cells, results.read_table(out, "metrics")
    cells = results.latest_cells(cells)
    cells["task_config"] = results.configuration_labels(cells["task"], cells["task_params"])
    cells["method"] = cells["selector"] + " + " + cells["factorization"]
    metrics = results.read_table(out, "metrics")
    metrics = metrics[metrics["cell_id"].isin(cells["cell_id"])]
    metrics = metrics.merge(cells[["cell_id", "task_config", "method", "primary_metric"]], on="cell_id")
    return cells, metrics


def _spread(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return ""
    med = values.median()
    if len(values) == 1:
        return f"{med:.4g}"
    return f"{med:.4g} [{values.min():.3g}, {values.max():.3g}]"


def summary_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per task configuration x method x budget: primary metric, achieved parameter ratio, selected rank and total
    time, each as median [min, max] over seeds."""
    ok = metrics[metrics["status"] == "ok"]
    rows = []
    for (config, selector, factorization, budget), group in ok.groupby(METHOD_COLUMNS, dropna=False, sort=True):
        primary = group["primary_metric"].iloc[0]
        by_metric = {name: g["value"] for name, g in group.groupby("metric")}
        rows.append(
            {
                "task": config,
                "selector": selector,
                "factorization": factorization,
                "budget": "" if pd.isna(budget) else f"{budget:g}",
                "metric": primary,
                "value (median [min, max])": _spread(by_metric.get(primary, pd.Series(dtype=float))),
                "param_ratio": _spread(by_metric.get("param_ratio", pd.Series(dtype=float))),
                "rank": _spread(by_metric.get("rank_selected", pd.Series(dtype=float))),
                "time_total_s": _spread(by_metric.get("time_total_s", pd.Series(dtype=float))),
                "seeds": group["seed"].nunique(),
            }
        )
    return pd.DataFrame(rows)


def _primary_with_ratio(metrics: pd.DataFrame) -> pd.DataFrame:
    ok = metrics[metrics["status"] == "ok"]
    columns = [
        "cell_id",
        "task_config",
        "method",
        "selector",
        "factorization",
        "budget",
        "seed",
        "value",
        "primary_metric",
    ]
    primary = ok[ok["metric"] == ok["primary_metric"]][columns]
    ratio = ok[ok["metric"] == "param_ratio"][["cell_id", "value"]].rename(columns={"value": "param_ratio"})
    return primary.merge(ratio, on="cell_id", how="left")


def _title(text: str) -> str:
    return textwrap.fill(text, 70)


def _grid(n: int, width: float = 6.5, height: float = 4.5):
    import matplotlib.pyplot as plt

    cols = min(2, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    return fig, axes


def _plot_quality(metrics: pd.DataFrame, path: Path) -> bool:
    """Median (over seeds) of the primary metric against the median parameter ratio kept, per method and budget:
    colour = factorization, marker = selector, lines join the budgets of one method."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    data = _primary_with_ratio(metrics)
    if data.empty:
        return False
    points = (
        data.groupby(["task_config", "selector", "factorization", "budget"], dropna=False)[["value", "param_ratio"]]
        .median()
        .reset_index()
    )
    configs = sorted(points["task_config"].unique())
    fig, axes = _grid(len(configs), 7.5, 4.8)
    for ax, config in zip(axes.flat, configs):
        sub = points[points["task_config"] == config]
        dense = sub[sub["factorization"] == REFERENCE_FACTORIZATION]
        methods = sub[sub["factorization"] != REFERENCE_FACTORIZATION].sort_values("param_ratio")
        if not methods.empty:
            sns.lineplot(
                data=methods,
                x="param_ratio",
                y="value",
                hue="factorization",
                style="selector",
                units="selector",
                estimator=None,
                markers=True,
                dashes=False,
                markersize=8,
                ax=ax,
            )
        if not dense.empty:
            ax.axhline(dense["value"].median(), color="black", linestyle="--", linewidth=1, label="dense reference")
        values = sub["value"][sub["value"] > 0]
        if len(values) and values.max() / values.min() > 100:
            ax.set_yscale("log")
        ax.set_title(_title(config), fontsize=8)
        ax.set_xlabel("parameter ratio kept (median over seeds)")
        ax.set_ylabel(f"{data[data['task_config'] == config]['primary_metric'].iloc[0]} (median over seeds)")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def _plot_quality_table(metrics: pd.DataFrame, path: Path) -> bool:
    """Heatmap of the median primary metric: rows selector (and budget), columns factorization, per task config."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    data = _primary_with_ratio(metrics)
    data = data[data["factorization"] != REFERENCE_FACTORIZATION]
    if data.empty:
        return False
    data = data.assign(row=data["selector"] + data["budget"].map(lambda b: "" if pd.isna(b) else f" @{b:g}"))
    configs = sorted(data["task_config"].unique())
    fig, axes = _grid(len(configs), 6.5, 1.2 + 0.4 * data["row"].nunique())
    for ax, config in zip(axes.flat, configs):
        table = data[data["task_config"] == config].pivot_table(
            index="row", columns="factorization", values="value", aggfunc="median"
        )
        positive = table[table > 0]
        log = positive.notna().all().all() and positive.max().max() / positive.min().min() > 100
        sns.heatmap(
            np.log10(table) if log else table,
            annot=table.map(lambda v: f"{v:.2g}"),
            fmt="",
            cmap="viridis_r",
            ax=ax,
            cbar_kws={"label": ("log10 " if log else "") + data["primary_metric"].iloc[0]},
        )
        ax.set_title(_title(config), fontsize=8)
        ax.set_ylabel("")
        ax.set_xlabel("")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def _plot_time(metrics: pd.DataFrame, path: Path) -> bool:
    import matplotlib.pyplot as plt
    import seaborn as sns

    ok = metrics[(metrics["status"] == "ok") & metrics["metric"].str.match(r"^time_.*_s$")]
    ok = ok[ok["metric"] != "time_total_s"]
    if ok.empty:
        return False
    ok = ok.assign(phase=ok["metric"].str.slice(5, -2))
    total = metrics[(metrics["status"] == "ok") & (metrics["metric"] == "time_total_s")]
    order = total.groupby("method")["value"].median().sort_values(ascending=False).index.tolist()
    height = max(3.0, 0.3 * ok["method"].nunique() + 1.5)
    fig, ax = plt.subplots(figsize=(9, height))
    sns.barplot(data=ok, y="method", x="value", hue="phase", order=order, estimator="median", errorbar=None, ax=ax)
    ax.set_xscale("log")
    ax.set_xlabel("seconds per cell (median over cells; log scale)")
    ax.set_ylabel("")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


_SLUG_LIMIT = 60


def _slug(text: str) -> str:
    """``text`` reduced to the characters every file system accepts (letters, digits, ``.``, ``_``, ``-``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")


def figure_names(labels: Iterable[str], prefix: str) -> dict[str, str]:
    """A file name ``<prefix>_<slug>.png`` per task configuration label, unique per label.

    The slug is the label with every run of other characters replaced by ``-`` (``vit-classification[rank=8]`` ->
    ``vit-classification-rank-8``). Where it is longer than 60 characters (cut there) or two labels give the same slug,
    the first 8 hex digits of the label's sha256 are appended, so names stay unique and stable for a given label."""
    labels = list(dict.fromkeys(labels))
    slugs = {label: _slug(label) or "task" for label in labels}
    counts = Counter(slugs.values())
    names = {}
    for label, slug in slugs.items():
        if len(slug) > _SLUG_LIMIT or counts[slug] > 1:
            digest = hashlib.sha256(label.encode()).hexdigest()[:8]
            slug = f"{slug[:_SLUG_LIMIT].rstrip('-.')}-{digest}"
        names[label] = f"{prefix}_{slug}.png"
    return names


def _natural_key(text: str) -> list:
    """Sort key comparing digit runs as integers: ``layer.2`` before ``layer.10``."""
    parts = re.split(r"(\d+)", text)  # digit runs at the odd indices
    return [(0, int(part), "") if i % 2 else (1, 0, part) for i, part in enumerate(parts)]


def site_order(ranks: pd.DataFrame) -> list[str]:
    """The sites of ``ranks`` (rows of the ranks table) in model order.

    Tasks record a cell's sites in model order (the kinds' ``ctx.ranks`` loops walk the model's sites in
    ``named_modules`` order), and a cell's part file keeps that order. The rows of each cell (column ``position``,
    the row's index within its cell, where present; otherwise the frame's row order) give one sequence per cell;
    these are merged so that every cell's order is kept, a site first recorded earlier coming first among the sites
    free to go next (with identical site lists this is the recorded order). Where the cells contradict one another,
    or the cells cannot be told apart, the recorded order is not available and the sites are sorted naturally
    (digit runs compared as integers)."""
    if "cell_id" not in ranks.columns:
        return sorted(dict.fromkeys(ranks["site"]), key=_natural_key)
    rows = ranks.sort_values(["cell_id", "position"], kind="stable") if "position" in ranks.columns else ranks
    sites = list(dict.fromkeys(rows["site"]))
    first = {site: i for i, site in enumerate(sites)}
    after: dict[str, set[str]] = {site: set() for site in sites}
    for _, sequence in rows.groupby("cell_id", sort=False)["site"]:
        sequence = list(dict.fromkeys(sequence))
        for before, nxt in zip(sequence, sequence[1:]):
            after[before].add(nxt)
    waiting = {site: 0 for site in sites}
    for followers in after.values():
        for site in followers:
            waiting[site] += 1
    ready = [site for site in sites if waiting[site] == 0]
    order = []
    while ready:
        site = min(ready, key=first.__getitem__)
        ready.remove(site)
        order.append(site)
        for nxt in after[site]:
            waiting[nxt] -= 1
            if waiting[nxt] == 0:
                ready.append(nxt)
    if len(order) < len(sites):  # a cycle: the cells disagree on the order
        return sorted(sites, key=_natural_key)
    return order


def rank_tables(cells: pd.DataFrame, ranks: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """What ``bench report`` draws as rank heatmaps: per task configuration label, the median rank over seeds with
    one row per method and budget and one column per site, the columns in model order (``site_order``)."""
    ranks = ranks.assign(position=ranks.groupby("cell_id", sort=False).cumcount())  # before any merge reorders rows
    data = ranks.merge(
        cells[cells["status"] == "ok"][["cell_id", "task_config", "method", "budget", "seed"]], on="cell_id"
    )
    tables = {}
    for config, sub in sorted(data.groupby("task_config"), key=lambda kv: kv[0]):
        sub = sub.assign(row=sub["method"] + sub["budget"].map(lambda b: "" if pd.isna(b) else f" @{b:g}"))
        table = sub.pivot_table(index="row", columns="site", values="rank", aggfunc="median")
        if table.empty:
            continue
        tables[config] = table[[site for site in site_order(sub) if site in table.columns]]
    return tables


def _plot_ranks(cells: pd.DataFrame, ranks: pd.DataFrame, folder: Path) -> list[Path]:
    import matplotlib.pyplot as plt
    import seaborn as sns

    paths = []
    tables = rank_tables(cells, ranks)
    names = figure_names(tables, "ranks")
    for config, table in tables.items():
        fig, ax = plt.subplots(figsize=(min(24, 4 + 0.45 * table.shape[1]), 1.5 + 0.35 * table.shape[0]))
        sns.heatmap(table, annot=table.shape[1] <= 24, fmt=".0f", cmap="viridis", ax=ax, cbar_kws={"label": "rank"})
        ax.set_title(_title(f"ranks per site: {config}"), fontsize=8)
        ax.set_ylabel("")
        path = folder / names[config]
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def _plot_curves(cells: pd.DataFrame, curves: pd.DataFrame, path: Path) -> bool:
    import matplotlib.pyplot as plt
    import seaborn as sns

    data = curves.merge(cells[cells["status"] == "ok"][["cell_id", "task_config", "method"]], on="cell_id")
    # per-site trajectories (``rank:<site>``) stay in the curves table: one panel per site would drown the others
    data = data[(data["value"] > 0) & ~data["curve"].str.contains(":", regex=False)]
    if data.empty:
        return False
    groups = sorted(data.groupby(["task_config", "curve"]), key=lambda kv: kv[0])
    fig, axes = _grid(len(groups), 7.5, 4.8)
    for ax, ((config, curve), sub) in zip(axes.flat, groups):
        sub = sub.merge(cells[["cell_id", "selector", "factorization"]], on="cell_id")
        sns.lineplot(
            data=sub,
            x="step",
            y="value",
            hue="factorization",
            style="selector",
            units="cell_id",
            estimator=None,
            linewidth=0.9,
            alpha=0.8,
            ax=ax,
        )
        ax.set_yscale("log")
        ax.set_title(_title(config), fontsize=8)
        ax.set_xlabel("step (iteration or epoch)")
        ax.set_ylabel(curve)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def make_report(out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out)
    folder = out / "report"
    folder.mkdir(parents=True, exist_ok=True)
    cells, metrics = load(out)
    status_counts = cells["status"].value_counts().sort_index() if not cells.empty else pd.Series(dtype=int)
    summary = summary_table(metrics) if not metrics.empty else pd.DataFrame()
    failures = cells[~cells["status"].isin(["ok", "skipped"])] if not cells.empty else cells

    print(tabulate(list(status_counts.items()), headers=["status", "cells"]))
    if not summary.empty:
        print()
        print(tabulate(summary, headers="keys", showindex=False))
    if len(failures):
        print(f"\n{len(failures)} failed cells (reasons in {folder / 'report.md'})")

    lines = [
        f"# rankbench report: `{out}`",
        "",
        "## Cells",
        "",
        tabulate(list(status_counts.items()), headers=["status", "cells"], tablefmt="github"),
        "",
    ]
    if not summary.empty:
        lines += [
            "## Summary (median [min, max] over seeds)",
            "",
            tabulate(summary, headers="keys", showindex=False, tablefmt="github"),
            "",
        ]
    figures = []
    if _plot_quality(metrics, folder / "quality_vs_params.png"):
        figures.append(("Quality against the parameter ratio kept", "quality_vs_params.png"))
    if _plot_quality_table(metrics, folder / "quality_table.png"):
        figures.append(("Quality per selector and factorization (median over seeds)", "quality_table.png"))
    if _plot_time(metrics, folder / "time_per_method.png"):
        figures.append(("Time per cell by phase", "time_per_method.png"))
    for path in _plot_ranks(cells, results.read_table(out, "ranks"), folder):
        figures.append(("Ranks per site", path.name))
    curves = results.read_table(out, "curves")
    if not curves.empty and _plot_curves(cells, curves, folder / "curves.png"):
        figures.append(("Curves (error, loss or rank against iteration or epoch)", "curves.png"))
    for title, name in figures:
        lines += [f"## {title}", "", f"![{title}]({name})", ""]
    if len(failures):
        table = failures[["task_config", "method", "budget", "seed", "status", "reason"]]
        lines += ["## Failed cells", "", tabulate(table, headers="keys", showindex=False, tablefmt="github"), ""]
    skipped = cells[cells["status"] == "skipped"] if not cells.empty else cells
    if len(skipped):
        reasons = skipped.groupby(["method", "reason"]).size().reset_index(name="cells")
        lines += ["## Skipped pairs", "", tabulate(reasons, headers="keys", showindex=False, tablefmt="github"), ""]
    summary_path = folder / "summary.csv"
    summary.to_csv(summary_path, index=False)
    report_path = folder / "report.md"
    atomic_write(report_path, "\n".join(lines))
    from rankbench.html_report import write_html_report  # beside report.md: DIR/report/index.html, one offline page

    print(f"html report: {write_html_report(out)}")
    return report_path
