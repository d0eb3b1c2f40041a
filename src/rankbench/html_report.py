"""``DIR/report/index.html``: one self-contained page that a researcher can open offline and trust.

``bench report DIR`` writes it beside ``report.md`` (``write_html_report``, called at the end of
``report.make_report``). One file: plotly.js, the styles and every chart are inside it; nothing is loaded from the
network. Sections:

* per task configuration: (1) the leaderboard (``leaderboard.leaderboard``: the primary metric's median over seeds
  with its bootstrap interval, the parameter ratio kept, the rank, and the paired call against the dense reference),
  (2) quality against parameters (x: the parameter ratio each method achieved, y: the primary metric's median over
  seeds with the interval as error bars, one line per method across its budgets, the dense reference as a dashed
  line with its interval as a band), (3) the rank heatmap (sites in model order: ``report.rank_tables``);
* (4) rankings across configurations (``leaderboard.rankings``: average ranks, Friedman's p, Nemenyi's critical
  difference, drawn as average rank +- CD/2 so that two methods whose bars do not overlap differ);
* (5) claims checked against the results (a ``claims`` frame: claim, source, verdict, numbers; omitted without one);
* (6) the run environment (the newest ``DIR/runs/*.json``).

The rendering (``render_html``) takes the leaderboard frame, the rankings, the rank tables, the environment and the
claims as inputs, so it can be checked on frames built by hand.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from rankbench import leaderboard, report, results, stats
from rankbench.cells import REFERENCE_FACTORIZATION
from rankbench.files import atomic_write

PAGE = "index.html"
CLAIM_COLUMNS = ["claim", "source", "verdict", "numbers"]
_PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}


# ------------------------------------------------------------------------------------------------------- inputs


def _budget_label(budget, kind) -> str:
    if budget is None or (isinstance(budget, float) and math.isnan(budget)):
        return ""
    return f"{kind}={budget:g}" if isinstance(kind, str) and kind else f"{budget:g}"


def run_environment(out: Path) -> tuple[str, dict] | None:
    """The newest ``DIR/runs/*.json`` (file names start with a UTC time stamp) as (file name, content)."""
    runs = sorted(Path(out, "runs").glob("*.json"), key=lambda p: (p.name, p.stat().st_mtime))
    for path in reversed(runs):
        try:
            return path.name, json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return None


def write_html_report(out: Path, claims: pd.DataFrame | None = None,
                      data: leaderboard.Summary | None = None) -> Path:
    """Write ``DIR/report/index.html`` for the results folder ``out`` from ``data`` (``leaderboard.summarise(out)``,
    computed here when not given); its path."""
    out = Path(out)
    folder = out / "report"
    folder.mkdir(parents=True, exist_ok=True)
    data = leaderboard.summarise(out) if data is None else data
    cells, board, ranked = data.cells, data.board, dict(data.rankings)
    if len(ranked) == 2 and leaderboard.OVERALL in ranked:  # one family: "overall" would repeat its ranking
        ranked.pop(leaderboard.OVERALL)
    ranks = results.read_table(out, "ranks")
    tables = report.rank_tables(cells, ranks) if not cells.empty and not ranks.empty else {}
    statuses = cells["status"].value_counts().sort_index().to_dict() if "status" in cells.columns else {}
    page = render_html(
        title=f"rankbench report: {out.resolve().name}",
        board=board,
        rankings=ranked,
        rank_tables=tables,
        environment=run_environment(out),
        claims=claims,
        statuses=statuses,
    )
    path = folder / PAGE
    atomic_write(path, page)
    return path


# ------------------------------------------------------------------------------------------------------ figures


def _finite(value) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _is_reference(board: pd.DataFrame) -> pd.Series:
    if "is_reference" in board.columns:
        return board["is_reference"].fillna(False).astype(bool)
    return board["factorization"] == REFERENCE_FACTORIZATION


def quality_figure(sub: pd.DataFrame):
    """One task configuration's leaderboard rows as quality against the parameter ratio kept (a plotly Figure), or
    None when no row has both numbers."""
    import plotly.graph_objects as go

    reference = sub[_is_reference(sub)]
    methods = sub[~_is_reference(sub)]
    methods = methods[methods["estimate"].map(_finite) & methods["param_ratio"].map(_finite)]
    if methods.empty and reference.empty:
        return None
    metric = str(sub["metric"].iloc[0])
    higher = bool(sub["higher_is_better"].iloc[0]) if "higher_is_better" in sub and len(sub) else False
    fig = go.Figure()
    for method, rows in methods.groupby("method", sort=True):
        rows = rows.sort_values("param_ratio")
        low, high = rows["low"].astype(float), rows["high"].astype(float)
        est = rows["estimate"].astype(float)
        budgets = [_budget_label(b, k) or "no budget" for b, k in zip(rows["budget"], rows["budget_kind"])]
        fig.add_trace(go.Scatter(
            x=rows["param_ratio"].astype(float), y=est, mode="lines+markers", name=str(method),
            error_y=dict(type="data", array=(high - est).tolist(), arrayminus=(est - low).tolist(), visible=True,
                         thickness=1.2, width=4),
            customdata=list(zip(budgets, rows["text"] if "text" in rows else est, rows["n"])),
            hovertemplate=("<b>" + html.escape(str(method)) + "</b><br>%{customdata[0]}<br>param ratio %{x:.3g}"
                           "<br>" + html.escape(metric) + " %{customdata[1]}<extra></extra>"),
            marker=dict(size=9), line=dict(width=2),
        ))
    values = list(methods["estimate"].astype(float))
    if not reference.empty and _finite(reference["estimate"].iloc[0]):
        # drawn as traces, not shapes: shapes take log10 coordinates on a log axis
        ref = reference.iloc[0]
        xs = [float(x) for x in methods["param_ratio"]] + [1.0]
        span = [min(xs), max(xs)]
        if _finite(ref.get("low")) and _finite(ref.get("high")) and ref["high"] > ref["low"]:
            fig.add_trace(go.Scatter(
                x=span + span[::-1], y=[float(ref["high"])] * 2 + [float(ref["low"])] * 2, mode="lines", fill="toself",
                fillcolor="rgba(120,120,120,0.15)", line=dict(width=0), hoverinfo="skip", showlegend=False,
            ))
            values += [float(ref["low"]), float(ref["high"])]
        fig.add_trace(go.Scatter(
            x=span, y=[float(ref["estimate"])] * 2, mode="lines", name="dense reference",
            line=dict(color="#333", dash="dash", width=1.5),
            hovertemplate="dense reference<br>" + html.escape(metric) + " " + html.escape(str(ref.get("text")))
            + "<extra></extra>",
        ))
        values.append(float(ref["estimate"]))
    positive = [v for v in values if _finite(v) and v > 0]
    log = len(positive) == len(values) and len(positive) > 1 and max(positive) / min(positive) > 100
    fig.update_layout(
        template="plotly_white", height=420, margin=dict(l=60, r=20, t=30, b=50),
        legend=dict(font=dict(size=11)), hovermode="closest",
        xaxis_title="parameter ratio kept (median over seeds)",
        yaxis_title=f"{metric} ({'higher' if higher else 'lower'} is better; median, 95% interval)",
    )
    if log:
        fig.update_yaxes(type="log", dtick=1, exponentformat="power")  # a tick per decade
    return fig


def rank_heatmap(table: pd.DataFrame):
    """A ``report.rank_tables`` table (rows: method and budget; columns: sites in model order) as a heatmap."""
    import plotly.graph_objects as go

    annotate = table.shape[1] <= 24
    fig = go.Figure(go.Heatmap(
        z=table.to_numpy(dtype=float), x=[str(c) for c in table.columns], y=[str(i) for i in table.index],
        colorscale="Viridis", colorbar=dict(title="rank"), hoverongaps=False,
        texttemplate="%{z:.0f}" if annotate else None,
        hovertemplate="%{y}<br>site %{x}<br>rank %{z:.0f}<extra></extra>",
    ))
    fig.update_layout(template="plotly_white", height=170 + 28 * table.shape[0], margin=dict(l=20, r=20, t=36, b=20))
    fig.update_xaxes(type="category", tickangle=-45 if table.shape[1] > 8 else 0)
    fig.update_yaxes(type="category", autorange="reversed")
    return fig


def ranking_figure(ranking: stats.Ranking):
    """Average ranks (1 = best), each with a bar of +- half the critical difference where there is one: two methods
    whose bars do not overlap differ by more than the CD."""
    import plotly.graph_objects as go

    ranks = ranking.average_ranks.sort_values()
    half = ranking.critical_difference / 2 if _finite(ranking.critical_difference) else None
    fig = go.Figure(go.Scatter(
        x=ranks.to_numpy(dtype=float), y=[str(i) for i in ranks.index], mode="markers",
        marker=dict(size=11, color="#1f77b4"),
        error_x=dict(type="constant", value=half, visible=True, thickness=2, width=6) if half else None,
        hovertemplate="%{y}<br>average rank %{x:.2f}<extra></extra>",
    ))
    fig.update_layout(template="plotly_white", height=120 + 30 * len(ranks), margin=dict(l=20, r=20, t=20, b=50),
                      xaxis_title="average rank (1 = best)" + (" with +- CD/2" if half else ""))
    fig.update_yaxes(type="category", autorange="reversed")
    return fig


def _figure_html(fig, div_id: str) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config=_PLOTLY_CONFIG)


# ------------------------------------------------------------------------------------------------------- tables


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def _number(value, digits: int = 4) -> str:
    return f"{float(value):.{digits}g}" if _finite(value) else "–"


_VERDICT_CLASSES = {
    "win": "good", "loss": "bad", "tie": "neutral", "n too small": "muted",
    "supported": "good", "holds": "good", "confirmed": "good", "pass": "good", "passed": "good", "true": "good",
    "refuted": "bad", "contradicted": "bad", "fails": "bad", "fail": "bad", "failed": "bad", "false": "bad",
}


def _badge(verdict) -> str:
    text = "" if verdict is None or (isinstance(verdict, float) and math.isnan(verdict)) else str(verdict)
    if not text:
        return ""
    kind = _VERDICT_CLASSES.get(text.strip().lower(), "neutral")
    return f'<span class="badge {kind}">{_e(text)}</span>'


def leaderboard_table(sub: pd.DataFrame) -> str:
    """One task configuration's leaderboard rows as an HTML table, best rank first, the reference marked."""
    sub = sub.assign(_ref=_is_reference(sub)).sort_values(["rank", "_ref"], na_position="last", kind="stable")
    metric = str(sub["metric"].iloc[0])
    head = ["rank", "method", "budget", f"{metric} median [95% interval]", "seeds", "param ratio", "vs dense reference"]
    rows = []
    for _, row in sub.iterrows():
        interval = row.get("text")
        if not isinstance(interval, str) or not interval:
            interval = _number(row.get("estimate"))
        versus = row.get("vs_reference")
        versus = versus if isinstance(versus, str) else ""
        verdict = row.get("verdict_vs_reference")
        if isinstance(verdict, str) and verdict and versus.startswith(verdict + " "):
            versus = versus[len(verdict) + 1:]  # the badge says it already
        cells = [
            _number(row.get("rank"), 3),
            _e(row.get("method")),
            _e(_budget_label(row.get("budget"), row.get("budget_kind")) or "–"),
            f'<span class="num">{_e(interval)}</span>',
            _e(int(row["n"]) if _finite(row.get("n")) else "–"),
            _number(row.get("param_ratio"), 3),
            "reference" if row["_ref"] else f"{_badge(verdict)} <span class=\"num\">{_e(versus)}</span>",
        ]
        css = ' class="reference"' if row["_ref"] else ""
        rows.append(f"<tr{css}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return _table(head, rows, "leaderboard")


def _table(head: list[str], rows: list[str], css: str = "") -> str:
    header = "".join(f"<th>{_e(h)}</th>" for h in head)
    return (f'<div class="table-wrap"><table class="{css}"><thead><tr>{header}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div>")


def claims_table(claims: pd.DataFrame) -> str:
    rows = []
    for _, row in claims.iterrows():
        rows.append("<tr>" + "".join([
            f"<td>{_e(row.get('claim'))}</td>", f"<td>{_e(row.get('source'))}</td>",
            f"<td>{_badge(row.get('verdict'))}</td>", f"<td class=\"num\">{_e(row.get('numbers'))}</td>",
        ]) + "</tr>")
    return _table(CLAIM_COLUMNS, rows, "claims")


def _value_html(value) -> str:
    """A run-environment value: a mapping (package versions, plugin facts) as a compact list of ``key value``."""
    if isinstance(value, Mapping):
        if not value:
            return "–"
        return " ".join(f'<span class="kv"><b>{_e(k)}</b> {_value_html(v)}</span>' for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return _e(json.dumps(value, default=str))
    return _e("–" if value is None or value == "" else value)


def environment_section(environment: tuple[str, dict] | None) -> str:
    if environment is None:
        return '<p class="muted">No run environment recorded (<code>runs/*.json</code>).</p>'
    name, data = environment
    flat = {}
    for key, value in data.items():  # runs/*.json: {"suite", "arguments", "environment": {...}}
        if key == "environment" and isinstance(value, Mapping):
            flat.update(value)
        else:
            flat[key] = value
    rows = [f"<tr><th>{_e(k)}</th><td>{_value_html(v)}</td></tr>" for k, v in flat.items()]
    return (f"<p>From <code>runs/{_e(name)}</code>, the newest run of this folder.</p>"
            f'<div class="table-wrap"><table class="env"><tbody>{"".join(rows)}</tbody></table></div>')


# -------------------------------------------------------------------------------------------------------- page


_STYLE = """
:root { --fg:#1d2330; --muted:#6b7280; --line:#e5e7eb; --accent:#2563eb; --bg:#f7f8fa; }
* { box-sizing: border-box; }
body { margin:0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Liberation Sans", sans-serif;
       color:var(--fg); background:var(--bg); }
header { background:#111827; color:#fff; padding:18px 32px; }
header h1 { margin:0; font-size:22px; font-weight:600; }
header p { margin:4px 0 0; color:#cbd5e1; font-size:13px; }
main { max-width:1240px; margin:0 auto; padding:24px 32px 64px; }
section { background:#fff; border:1px solid var(--line); border-radius:10px; padding:18px 22px; margin:18px 0; }
h2 { font-size:19px; margin:0 0 12px; } h3 { font-size:15px; margin:18px 0 8px; color:#374151; }
nav.toc { background:#fff; border:1px solid var(--line); border-radius:10px; padding:14px 22px; }
nav.toc ol { margin:6px 0; padding-left:22px; } nav.toc li { margin:2px 0; }
a { color:var(--accent); text-decoration:none; } a:hover { text-decoration:underline; }
.table-wrap { overflow-x:auto; }
table { border-collapse:collapse; width:100%; font-size:13.5px; }
th, td { padding:6px 10px; border-bottom:1px solid var(--line); text-align:left; vertical-align:top; }
thead th { background:#f3f4f6; position:sticky; top:0; font-weight:600; white-space:nowrap; }
tbody tr:nth-child(even) { background:#fafafa; } tbody tr:hover { background:#eef2ff; }
tr.reference td { background:#fffbeb; font-style:italic; }
table.env th { width:30%; font-weight:500; color:#374151; background:none; position:static; }
.num { font-family: ui-monospace, "DejaVu Sans Mono", "Liberation Mono", monospace; font-size:12.5px; }
.badge { display:inline-block; padding:1px 8px; border-radius:999px; font-size:12px; font-weight:600; }
.badge.good { background:#dcfce7; color:#166534; } .badge.bad { background:#fee2e2; color:#991b1b; }
.badge.neutral { background:#e5e7eb; color:#374151; } .badge.muted { background:#f3f4f6; color:#6b7280; }
.kv { display:inline-block; background:#f3f4f6; border-radius:6px; padding:0 6px; margin:1px 4px 1px 0;
      font-size:12.5px; }
.kv b { font-weight:600; } .kv .kv { background:#e5e7eb; }
.muted, .note { color:var(--muted); font-size:13px; }
.stats { display:flex; gap:24px; flex-wrap:wrap; margin:6px 0 10px; }
.stats div { background:#f3f4f6; border-radius:8px; padding:6px 12px; font-size:13px; }
"""


def _anchor(prefix: str, index: int) -> str:
    return f"{prefix}-{index}"


def render_html(title: str, board: pd.DataFrame, rankings: Mapping[str, stats.Ranking] | None = None,
                rank_tables: Mapping[str, pd.DataFrame] | None = None, environment: tuple[str, dict] | None = None,
                claims: pd.DataFrame | None = None, statuses: Mapping[str, int] | None = None) -> str:
    """The whole page as one HTML string: plotly.js inline, one section per task configuration, then rankings,
    claims (when given) and the run environment."""
    from plotly.offline import get_plotlyjs

    rankings = rankings or {}
    rank_tables = rank_tables or {}
    configs = sorted(set(board["task_config"]) | set(rank_tables)) if not board.empty else sorted(rank_tables)
    toc, body, figures = [], [], 0

    def figure(fig) -> str:
        nonlocal figures
        figures += 1
        return f'<div class="figure">{_figure_html(fig, f"figure-{figures}")}</div>'

    for i, config in enumerate(configs):
        anchor = _anchor("config", i)
        sub = board[board["task_config"] == config] if not board.empty else board
        parts = [f'<section id="{anchor}"><h2>{_e(config)}</h2>']
        metrics = list(dict.fromkeys(sub["metric"])) if not sub.empty else []
        for k, metric in enumerate(metrics):  # the primary metric (one per configuration, unless told more)
            rows = sub[sub["metric"] == metric]
            suffix = f"-{k}" if k else ""
            parts.append(f'<h3 id="{anchor}-leaderboard{suffix}">Leaderboard: {_e(metric)}</h3>')
            parts.append('<p class="note">Median over seeds with a 95% percentile-bootstrap interval of the median '
                         "(no interval under 3 seeds); the call against the dense reference pairs the seeds.</p>")
            parts.append(leaderboard_table(rows))
            fig = quality_figure(rows)
            if fig is not None:
                heading = "Quality against parameters kept" + (f": {_e(metric)}" if len(metrics) > 1 else "")
                parts.append(f'<h3 id="{anchor}-quality{suffix}">{heading}</h3>')
                parts.append(figure(fig))
        if config in rank_tables:
            parts.append(f'<h3 id="{anchor}-ranks">Ranks per site (median over seeds; sites in model order)</h3>')
            parts.append(figure(rank_heatmap(rank_tables[config])))
        parts.append("</section>")
        body.append("".join(parts))
        toc.append(f'<li><a href="#{anchor}">{_e(config)}</a></li>')

    extra_toc = []
    parts = ['<section id="rankings"><h2>Rankings across configurations</h2>']
    if not rankings:
        parts.append('<p class="muted">No ranking: fewer than two methods ran on the same configurations.</p>')
    for j, (key, ranking) in enumerate(rankings.items()):
        cd = ranking.critical_difference
        p = ranking.friedman_p
        verdict = ("the methods differ (Friedman p < 0.05)" if ranking.distinguishable else
                   "no difference shown (Friedman p >= 0.05)" if p is not None else
                   "too few methods or configurations for the Friedman test")
        parts.append(f'<h3 id="{_anchor("ranking", j)}">{_e(key)}</h3><div class="stats">'
                     f"<div>configurations: <b>{ranking.n}</b></div>"
                     f"<div>Friedman p: <b>{_number(p, 3)}</b></div>"
                     f"<div>critical difference (Nemenyi): <b>{_number(cd, 3)}</b></div>"
                     f"<div>{_e(verdict)}</div></div>")
        if len(ranking.average_ranks):
            parts.append(figure(ranking_figure(ranking)))
    parts.append("</section>")
    body.append("".join(parts))
    extra_toc.append('<li><a href="#rankings">Rankings across configurations</a></li>')
    if claims is not None:
        body.append('<section id="claims"><h2>Claims</h2>' + claims_table(claims) + "</section>")
        extra_toc.append('<li><a href="#claims">Claims</a></li>')
    body.append('<section id="environment"><h2>Run environment</h2>' + environment_section(environment)
                + "</section>")
    extra_toc.append('<li><a href="#environment">Run environment</a></li>')

    counts = ", ".join(f"{n} {_e(status)}" for status, n in (statuses or {}).items()) or "no cells"
    toc_html = (f'<nav class="toc" id="contents"><b>Contents</b><ol>'
                f'<li>Task configurations<ol>{"".join(toc) or "<li>none</li>"}</ol></li>{"".join(extra_toc)}'
                "</ol></nav>")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_STYLE}</style>"
        f"<script>{get_plotlyjs()}</script></head><body>"
        f"<header><h1>{_e(title)}</h1><p>cells: {counts}</p></header>"
        f"<main>{toc_html}{''.join(body)}</main></body></html>\n"
    )
