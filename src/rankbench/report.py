"""``bench report DIR``: a summary table (median and spread over seeds), seaborn plots, and ``DIR/report/report.md``.

Plots (PNG, in ``DIR/report/``):
* ``quality_vs_params.png``: each task configuration's primary metric against the parameter ratio each method ended
  with, one line per selector + factorization; the dense reference as a dashed line. Using the *achieved* ratio puts
  budget-driven and budget-free selectors on one axis.
* ``time_per_method.png``: wall time per cell by phase, per method.
* ``ranks_<task>.png``: ranks per site as a heatmap (rows: method and budget).
* ``curves.png``: stored curves (e.g. error against iteration), one line per cell, log scale.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
from tabulate import tabulate

from rankbench import results
from rankbench.cells import REFERENCE_FACTORIZATION

METHOD_COLUMNS = ["task_config", "selector", "factorization", "budget"]


def _task_labels(cells: pd.DataFrame) -> pd.Series:
    """Short labels for task configurations: the task name plus only the parameters that vary within the folder."""
    params = {tp: json.loads(tp) for tp in cells["task_params"].unique()}
    labels = {}
    for task, group in cells.groupby("task"):
        configs = {tp: params[tp] for tp in group["task_params"].unique()}
        keys = sorted({k for p in configs.values() for k in p})
        varying = [k for k in keys if len({json.dumps(p.get(k), sort_keys=True) for p in configs.values()}) > 1]
        for tp, p in configs.items():
            inner = ", ".join(f"{k}={json.dumps(p.get(k))}" for k in varying)
            labels[(task, tp)] = f"{task}[{inner}]" if inner else task
    return pd.Series([labels[(t, tp)] for t, tp in zip(cells["task"], cells["task_params"])], index=cells.index)


def load(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    cells = results.read_table(out, "cells")
    if cells.empty:
        return cells, results.read_table(out, "metrics")
    cells = cells.sort_values("started_at").drop_duplicates("config_key", keep="last")
    cells["task_config"] = _task_labels(cells)
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


def _plot_ranks(cells: pd.DataFrame, ranks: pd.DataFrame, folder: Path) -> list[Path]:
    import matplotlib.pyplot as plt
    import seaborn as sns

    paths = []
    data = ranks.merge(
        cells[cells["status"] == "ok"][["cell_id", "task_config", "method", "budget", "seed"]], on="cell_id"
    )
    for i, (config, sub) in enumerate(sorted(data.groupby("task_config"), key=lambda kv: kv[0])):
        sub = sub.assign(row=sub["method"] + sub["budget"].map(lambda b: "" if pd.isna(b) else f" @{b:g}"))
        table = sub.pivot_table(index="row", columns="site", values="rank", aggfunc="median")
        if table.empty:
            continue
        fig, ax = plt.subplots(figsize=(min(24, 4 + 0.45 * table.shape[1]), 1.5 + 0.35 * table.shape[0]))
        sns.heatmap(table, annot=table.shape[1] <= 24, fmt=".0f", cmap="viridis", ax=ax, cbar_kws={"label": "rank"})
        ax.set_title(_title(f"ranks per site: {config}"), fontsize=8)
        ax.set_ylabel("")
        path = folder / f"ranks_{i}.png"
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
    tmp = folder / ".report.md.tmp"
    tmp.write_text("\n".join(lines))
    tmp.replace(report_path)
    return report_path
