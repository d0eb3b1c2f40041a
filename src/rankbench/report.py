"""``bench report DIR``: leaderboards with intervals over seeds, paired calls, rankings, plots and
``DIR/report/report.md``.

The statistics come from ``rankbench.leaderboard`` (on ``rankbench.stats``); the terminal shows the cell counts,
the leaderboards, a pairwise count and the rankings, and ``report.md`` has these sections:

* **Leaderboard**, per task configuration: each method and budget with its rank, the median of the primary metric
  over the seeds that finished ok with a 95 % percentile-bootstrap interval and the number of seeds (fewer than 3
  seeds: "n too small", no interval), the parameter ratio, and the call against the dense reference paired over
  seeds (win / tie / loss, with the mean difference and its interval).
* **Pairwise (paired over seeds)**: every two methods at the same task configuration and budget, compared seed by
  seed; per task configuration a matrix of the calls (win / loss / tie / too few seeds, one letter per budget).
* **Rankings**, per task family and overall: average ranks across configurations, the Friedman p-value and
  Nemenyi's critical difference, and a critical-difference diagram ``cd_<family>.png`` (``cd_overall.png``) where
  there is a test (at least 3 methods and 5 configurations; otherwise a sentence says so). Which methods and
  configurations a ranking covers: ``leaderboard.score_tables``.
* **Summary**: per method and budget, primary metric, parameter ratio, rank and time as median [min, max] over seeds.
* Plots, failed cells, skipped pairs.

Tables: ``summary.csv``, ``leaderboard.csv`` and ``pairwise.csv`` (``leaderboard.leaderboard`` / ``pairwise``).

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
* ``cd_<family>.png``: critical-difference diagrams (above); ``<family>`` slugged as for ``ranks_<task>.png``.
"""

from __future__ import annotations

import hashlib
import math
import re
import textwrap
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from tabulate import tabulate

from rankbench import results, stats
from rankbench.cells import REFERENCE_FACTORIZATION
from rankbench.files import atomic_write
from rankbench.leaderboard import OVERALL, Summary, summarise

METHOD_COLUMNS = ["task_config", "selector", "factorization", "budget"]


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


def _seaborn():
    """seaborn, imported without the scipy modules it only needs for features the report does not use.

    seaborn imports ``scipy.stats`` (kernel densities) and ``scipy.cluster`` (clustered heatmaps) at load only to
    offer features that it switches off when scipy is missing; the report uses neither, and those imports are half
    a second of every ``bench report``. So they are hidden while seaborn loads (``None`` in ``sys.modules`` makes
    the import fail) and put back in reach right after.
    """
    import sys

    hidden = [name for name in ("scipy.stats", "scipy.cluster") if name not in sys.modules]
    if "seaborn" not in sys.modules:
        sys.modules.update(dict.fromkeys(hidden))
    try:
        import seaborn
    finally:
        for name in hidden:
            sys.modules.pop(name, None)
    return seaborn


def _plot_quality(metrics: pd.DataFrame, path: Path) -> bool:
    """Median (over seeds) of the primary metric against the median parameter ratio kept, per method and budget:
    colour = factorization, marker = selector, lines join the budgets of one method."""
    import matplotlib.pyplot as plt
    sns = _seaborn()

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
    sns = _seaborn()

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
    sns = _seaborn()

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
    sns = _seaborn()

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
    sns = _seaborn()

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


# --------------------------------------------------------------------------------------------------- statistics


def _budget_text(budget) -> str:
    return "" if budget is None or pd.isna(budget) else f"{budget:g}"


def _direction_text(higher_is_better: bool) -> str:
    return "higher is better" if higher_is_better else "lower is better"


def _seed_counts(ns: Iterable[int]) -> str:
    ns = sorted(set(int(n) for n in ns))
    text = str(ns[0]) if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
    return f"{text} seed{'' if ns == [1] else 's'} ok per method"


LEADERBOARD_NOTE = (
    f"Value: the median of the primary metric over the seeds that finished ok, with its {stats.CONFIDENCE:.0%} "
    f"percentile-bootstrap interval and the number of seeds n (fewer than {stats.MIN_SEEDS} seeds: no interval, "
    f"\"{stats.TOO_FEW}\"). vs dense: the method against the dense reference on the same seeds, mean difference "
    "(+ = the method is better) with its bootstrap interval: win, tie (the interval contains 0) or loss."
)


def leaderboard_tables(board: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Per task configuration: a title (metric, direction, seeds) and the rows of ``board`` to show."""
    tables = []
    for config, sub in board.groupby("task_config", sort=True):
        metric, hib = sub["metric"].iloc[0], bool(sub["higher_is_better"].iloc[0])
        title = f"{config}: {metric} ({_direction_text(hib)}), {_seed_counts(sub['n'])}"
        table = pd.DataFrame(
            {
                "rank": sub["rank"],
                "method": sub["method"],
                "budget": sub["budget"].map(_budget_text),
                f"{metric} median [95% interval] (n)": sub["text"],
                "param_ratio": sub["param_ratio"].map(lambda v: "" if pd.isna(v) else f"{v:.3g}"),
                "vs dense (paired over seeds)": [
                    "reference" if ref else vs for ref, vs in zip(sub["is_reference"], sub["vs_reference"])
                ],
            }
        )
        tables.append((title, table))
    return tables


def _pair_counts(pairs: pd.DataFrame) -> dict[str, int]:
    """Unordered pairs per verdict (``pairwise`` lists each pair in both orders)."""
    counts = pairs["verdict"].value_counts()
    return {
        "decided": int(counts.get(stats.WIN, 0)),
        "tied": int(counts.get(stats.TIE, 0)) // 2,
        "few": int(counts.get(stats.TOO_FEW, 0)) // 2,
    }


PAIR_CODES = {stats.WIN: "W", stats.LOSS: "L", stats.TIE: "=", stats.TOO_FEW: "?"}


def pairwise_matrices(pairs: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Per task configuration: a title naming its budgets, and a matrix of the ``pairwise`` calls, rows A, columns
    B, each cell one letter per budget (in the title's order): W (A better), L (A worse), = (tie), ? (fewer than 3
    common seeds), . (not both run at that budget)."""
    matrices = []
    for config, sub in pairs.groupby("task_config", sort=True):
        budgets = sorted(sub["budget"].dropna().unique()) + ([math.nan] if sub["budget"].isna().any() else [])
        labels = [_budget_text(b) or "none" for b in budgets]
        calls = {(a, b, _budget_text(bu) or "none"): PAIR_CODES.get(v, "?")
                 for a, b, bu, v in zip(sub["a"], sub["b"], sub["budget"], sub["verdict"])}  # fmt: skip
        methods = sorted(set(sub["a"]))
        rows = {a: ["".join(calls.get((a, b, label), ".") for label in labels) if a != b else "" for b in methods]
                for a in methods}  # fmt: skip
        title = f"{config} (budget{'s' if len(labels) > 1 else ''}: {', '.join(labels)})"
        matrices.append((title, pd.DataFrame.from_dict(rows, orient="index", columns=methods)))
    return matrices


def pairwise_lines(pairs: pd.DataFrame) -> list[str]:
    """The Markdown "Pairwise" section: per task configuration, the matrix of calls (``pairwise_matrices``)."""
    counts = _pair_counts(pairs)
    lines = [
        "## Pairwise (paired over seeds)",
        "",
        "Every two methods run at the same task configuration and budget, compared seed by seed: the mean over their "
        f"common seeds of how much better the row's method is than the column's, with its {stats.CONFIDENCE:.0%} "
        "bootstrap interval, gives one letter per budget: **W** the row's method is better (the interval is above "
        f"0), **L** worse, **=** a tie (the interval contains 0), **?** fewer than {stats.MIN_SEEDS} common seeds, "
        "**.** not both run at that budget. Differences and intervals: `pairwise.csv`. "
        f"{counts['decided']} pairs are decided, {counts['tied']} tie, {counts['few']} have too few seeds.",
        "",
    ]
    for title, matrix in pairwise_matrices(pairs):
        lines += [f"### {title}", "", tabulate(matrix, headers="keys", tablefmt="github"), ""]
    return lines


RANKINGS_NOTE = (
    "Per configuration (task configuration and budget) the methods are ranked by the median of the primary metric "
    "over seeds (1 = best) and the ranks averaged; the Friedman test asks whether any method ranks differently from "
    "the others, and Nemenyi's critical difference (CD) is how far apart two average ranks must be to tell the "
    f"methods apart at {stats.CONFIDENCE:.0%} (autorank, non-parametric; Demšar 2006). The dense reference is not "
    "ranked. Within a family, the methods run on the most configurations are kept and configurations missing any "
    "of them are dropped. \"overall\" combines the families whose primary metrics share a direction, as ranks per "
    "configuration (scale-free)."
)


def _ranking_text(ranking: stats.Ranking, methods: int) -> str:
    if ranking.friedman_p is None:
        return (
            f"No Friedman test: it needs at least {stats.MIN_METHODS} methods and {stats.MIN_CONFIGURATIONS} "
            f"configurations (here {methods} and {ranking.n})."
        )
    cd = "" if ranking.critical_difference is None else f", Nemenyi CD = {ranking.critical_difference:.3g}"
    verdict = "the methods differ" if ranking.distinguishable else "no method is distinguishable from the others"
    return f"Friedman p = {ranking.friedman_p:.3g}{cd} over {ranking.n} configurations: {verdict}."


def rankings_lines(tables: dict, ranked: dict[str, stats.Ranking], folder: Path) -> tuple[list[str], list[str]]:
    """The Markdown "Rankings" section (critical-difference diagrams drawn into ``folder`` as ``cd_<family>.png``)
    and one line per ranking for the terminal."""
    lines = ["## Rankings", "", RANKINGS_NOTE, ""]
    short = []
    names = figure_names(ranked, "cd")
    families = [name for name in tables if name != OVERALL]
    for name, ranking in ranked.items():
        table = tables[name]
        if name == OVERALL and len(table.families) < 2:  # it would repeat that family's ranking
            other = [f for f in families if f not in table.families]
            if other:
                lines += [f"No overall ranking: only {table.families[0]} has the direction most families share "
                          f"(left out: {', '.join(other)}).", ""]  # fmt: skip
            (folder / names[name]).unlink(missing_ok=True)
            continue
        direction = _direction_text(table.higher_is_better) if name != OVERALL else "ranks per configuration"
        lines += [f"### {name} ({direction}; {ranking.n} configurations)", ""]
        averages = pd.DataFrame({"method": ranking.average_ranks.index, "average rank": ranking.average_ranks.values})
        lines += [tabulate(averages, headers="keys", showindex=False, tablefmt="github", floatfmt=".3g"), ""]
        lines.append(_ranking_text(ranking, len(ranking.average_ranks)))
        if name == OVERALL:
            other = [f for f in families if f not in table.families]
            lines.append(f"Families: {', '.join(table.families)}"
                         + (f"; left out (the other direction): {', '.join(other)}." if other else "."))
        if table.dropped_methods or table.dropped_rows:
            lines.append(f"Left out: {', '.join(table.dropped_methods) or 'no method'} (not run on the most "
                         f"configurations); {table.dropped_rows} configurations dropped.")  # fmt: skip
        lines.append("")
        path = folder / names[name]
        if stats.critical_difference_diagram(ranking, path):
            lines += [f"![critical-difference diagram: {name}]({path.name})", ""]
        else:
            path.unlink(missing_ok=True)  # a stale diagram from an earlier report
            lines += ["No critical-difference diagram (no test).", ""]
        ranks = ", ".join(f"{m} {r:.3g}" for m, r in ranking.average_ranks.items())
        test = "" if ranking.friedman_p is None else f"; Friedman p={ranking.friedman_p:.3g}"
        cd = "" if ranking.critical_difference is None else f", CD={ranking.critical_difference:.3g}"
        short.append(f"{name} ({ranking.n} configurations): {ranks}{test}{cd}")
    return lines, short


def make_report(out: Path, claims: pd.DataFrame | None = None, data: Summary | None = None) -> Path:
    """Write ``DIR/report/`` (report.md, CSVs, PNGs) from ``data`` (``leaderboard.summarise(out)``, computed here
    when not given); with ``claims`` (``verify.verdict_frame``) a "Claims" section."""
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out)
    folder = out / "report"
    folder.mkdir(parents=True, exist_ok=True)
    data = summarise(out) if data is None else data
    cells, metrics = data.cells, data.metrics
    status_counts = cells["status"].value_counts().sort_index() if not cells.empty else pd.Series(dtype=int)
    summary = summary_table(metrics) if not metrics.empty else pd.DataFrame()
    failures = cells[~cells["status"].isin(["ok", "skipped"])] if not cells.empty else cells

    board, pairs, tables, ranked = data.board, data.pairs, data.tables, data.rankings
    boards = leaderboard_tables(board) if not board.empty else []
    ranking_md, ranking_short = rankings_lines(tables, ranked, folder)

    print(tabulate(list(status_counts.items()), headers=["status", "cells"]))
    if boards:
        print(f"\n{LEADERBOARD_NOTE}")
    for title, table in boards:
        print(f"\n{title}")
        print(tabulate(table, headers="keys", showindex=False))
    if len(pairs):
        counts = _pair_counts(pairs)
        print(f"\npairwise (paired over seeds): {counts['decided']} pairs decided, {counts['tied']} tied, "
              f"{counts['few']} with fewer than {stats.MIN_SEEDS} common seeds (matrices: report.md)")
    if ranking_short:
        print("\nrankings (average rank, 1 = best):")
        print("\n".join(f"  {line}" for line in ranking_short))
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
    if claims is not None and len(claims):
        print("\nclaims (bench verify):")
        print(tabulate(claims.values.tolist(), headers=list(claims.columns), maxcolwidths=[None, 36, None, 90]))
        lines += ["## Claims (`bench verify`)", "", tabulate(claims, headers="keys", showindex=False, tablefmt="github"),
                  ""]
    if boards:
        lines += ["## Leaderboard (per task configuration)", "", LEADERBOARD_NOTE, ""]
        for title, table in boards:
            lines += [f"### {title}", "", tabulate(table, headers="keys", showindex=False, tablefmt="github"), ""]
    if len(pairs):
        lines += pairwise_lines(pairs)
    if ranked:
        lines += ranking_md
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
    board.to_csv(folder / "leaderboard.csv", index=False)
    pairs.to_csv(folder / "pairwise.csv", index=False)
    report_path = folder / "report.md"
    atomic_write(report_path, "\n".join(lines))
    return report_path
