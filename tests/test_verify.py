"""`bench verify CLAIMS RESULTS_DIR...`: claims as standing checks.

Results folders are planted with the project's own writer (``results.write_cell``) -- toy cells whose metric values
are chosen so that a claim holds, is contradicted, lies within noise, fails an adequacy condition or has no
results -- and judged through the public functions and the CLI. The shipped claims (claims/seeds.yaml) are checked
against the cells the shipped suites expand to, so the file cannot drift from the suites.
"""

import json
import re
import textwrap

import pandas as pd
import pytest

from conftest import ROOT
from rankbench import verify
from rankbench.api import CellRecord
from rankbench.cells import Cell
from rankbench.results import write_cell

TASK = {"size": 12}


def put(out, selector, seed, metrics, *, factorization="toy-svd", budget=0.5, task_params=None, status="ok",
        curves=None, selector_params=None, primary="quality", directions=None):
    """Write one toy cell. ``metrics``: name -> value; ``quality`` is higher-is-better, ``error`` lower."""
    directions = {"quality": True, "error": False, **(directions or {})}
    reference = selector == "none"
    cell = Cell(suite="toy", task="toy", task_params=task_params or TASK, selector=selector,
                selector_params=selector_params or {}, factorization="dense" if reference else factorization,
                factorization_params={}, budget=None if reference else budget,
                budget_kind=None if reference else "param_ratio", seed=seed, device="cpu", versions={},
                timeout=None)
    record = CellRecord(
        cell_id=cell.cell_id, status=status, started_at=f"2025-01-01T00:00:{seed:02d}",
        metrics=[{"metric": k, "value": v, "higher_is_better": directions.get(k)} for k, v in metrics.items()],
        curves=[{"curve": name, "step": s, "value": v} for name, points in (curves or {}).items() for s, v in points],
        primary_metric=primary,
    )
    write_cell(out, cell, record, {"git_sha": "x", "device": "cpu"}, primary)


def plant(out, selector, values, **kw):
    """One cell per seed (0, 1, ...) with ``values[seed]`` as its primary metric ``quality``."""
    for seed, value in enumerate(values):
        extra = kw.pop("extra", None)
        put(out, selector, seed, {"quality": value, **(extra or {})}, **kw)
        if extra is not None:
            kw["extra"] = extra


def claims_file(tmp_path, text, name="claims.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


BETTER = """
claims:
  - id: a-beats-b
    source: "Paper 2024, Table 1"
    statement: "A is better than B"
    select: {task: toy, task_params: {size: 12}}
    methods: [{selector: a}, {selector: b}]
    relation: {kind: better}
"""


def judge(tmp_path, text, *folders):
    claims = verify.load_claims(claims_file(tmp_path, text))
    return verify.check_claims(claims, folders or [tmp_path / "out"])


# -- the five verdicts of a `better` claim ---------------------------------------------------------------------------


def test_better_holds_beyond_noise_is_reproduced(tmp_path):
    out = tmp_path / "out"
    plant(out, "a", [0.90, 0.91, 0.93])
    plant(out, "b", [0.80, 0.82, 0.81])
    (v,) = judge(tmp_path, BETTER)
    assert v.verdict == "reproduced"
    assert v.claim == "a-beats-b" and v.source == "Paper 2024, Table 1"
    (config,) = v.numbers["configurations"]
    (link,) = config["links"]
    assert link["call"] == "win" and link["n"] == 3 and link["difference"] == pytest.approx(0.1033, abs=1e-3)
    assert "win +0.103" in v.text


def test_the_opposite_beyond_noise_is_contradicted(tmp_path):
    out = tmp_path / "out"
    plant(out, "a", [0.80, 0.82, 0.81])
    plant(out, "b", [0.90, 0.91, 0.93])
    (v,) = judge(tmp_path, BETTER)
    assert v.verdict == "contradicted" and "loss" in v.text


def test_a_paired_interval_containing_zero_is_inconclusive_noise(tmp_path):
    out = tmp_path / "out"
    plant(out, "a", [0.85, 0.80, 0.91])
    plant(out, "b", [0.80, 0.84, 0.90])  # differences +0.05, -0.04, +0.01
    (v,) = judge(tmp_path, BETTER)
    assert v.verdict == "inconclusive (noise)"
    (config,) = v.numbers["configurations"]
    assert config["links"][0]["low"] < 0 < config["links"][0]["high"]


def test_fewer_than_three_seeds_is_inconclusive_noise_n_too_small(tmp_path):
    out = tmp_path / "out"
    plant(out, "a", [0.90, 0.95])
    plant(out, "b", [0.50, 0.55])
    put(out, "a", 2, {"quality": 0.9}, status="error")  # a failed seed does not count, and is named
    put(out, "b", 2, {"quality": 0.5})
    (v,) = judge(tmp_path, BETTER)
    assert v.verdict == "inconclusive (noise)"
    assert "n too small" in v.text and "1 error" in v.text


def test_no_matching_results_is_not_run(tmp_path):
    out = tmp_path / "out"
    plant(out, "a", [0.9, 0.9, 0.9])
    (v,) = judge(tmp_path, BETTER)
    assert v.verdict == "not run" and "no cells for b" in v.text
    other_task = BETTER.replace("size: 12", "size: 99")
    plant(out, "b", [0.8, 0.8, 0.8])
    (v,) = judge(tmp_path, other_task)
    assert v.verdict == "not run"


# -- adequacy ----------------------------------------------------------------------------------------------------------


def test_a_dense_reference_below_its_quality_floor_is_inconclusive_protocol(tmp_path):
    out = tmp_path / "out"
    plant(out, "a", [0.90, 0.91, 0.93])
    plant(out, "b", [0.80, 0.82, 0.81])
    plant(out, "none", [0.95, 0.60, 0.96])
    text = BETTER + "    adequacy: {dense: [{metric: quality, op: '>=', value: 0.9}]}\n"
    (v,) = judge(tmp_path, text)
    assert v.verdict == "inconclusive (protocol)"
    assert "the dense reference, seed 1: quality = 0.6, not >= 0.9" in v.text


def test_too_few_seeds_for_the_adequacy_minimum_is_inconclusive_protocol(tmp_path):
    out = tmp_path / "out"
    plant(out, "a", [0.90, 0.91, 0.93])
    plant(out, "b", [0.80, 0.82, 0.81])
    (v,) = judge(tmp_path, BETTER + "    adequacy: {min_seeds: 5}\n")
    assert v.verdict == "inconclusive (protocol)" and "a has 3 ok seeds (adequacy: at least 5)" in v.text


def test_full_finetuning_that_does_not_beat_the_pretrained_network_is_excluded(tmp_path):
    """PINN adaptation: the reference cell's l2re against l2re_pretrained (lower is better). A transfer pair whose
    full fine-tuning does not beat the pretrained network is excluded; the other pairs decide; only excluded pairs
    leave the claim inconclusive (protocol)."""
    out = tmp_path / "out"
    pair = {"problem": "adaptation", "pde": "poisson"}
    unlearnable = {"problem": "adaptation", "pde": "helmholtz"}
    directions = {"l2re": False, "l2re_pretrained": False}
    text = """
    claims:
      - id: a-beats-b-pinn
        source: "Paper, abstract"
        statement: "A fine-tunes better than B"
        select: {task: toy, task_params: {problem: adaptation}}
        methods: [{selector: a}, {selector: b}]
        relation: {kind: better}
        adequacy: {min_seeds: 3, finetuning_beats_pretrained: true}
    """
    for seed in range(3):  # B beats A on the unlearnable pair: it must not contradict the claim
        put(out, "a", seed, {"l2re": 0.90 + 0.01 * seed, "l2re_pretrained": 0.5}, task_params=unlearnable,
            primary="l2re", directions=directions)
        put(out, "b", seed, {"l2re": 0.60 + 0.01 * seed, "l2re_pretrained": 0.5}, task_params=unlearnable,
            primary="l2re", directions=directions)
        # full fine-tuning: better than the pretrained network in seeds 0 and 1 only
        put(out, "none", seed, {"l2re": [0.05, 0.06, 0.7][seed], "l2re_pretrained": 0.5}, task_params=unlearnable,
            primary="l2re", directions=directions)
    (v,) = judge(tmp_path, text)
    assert v.verdict == "inconclusive (protocol)"  # nothing left to decide
    assert "seed 2: l2re = 0.7, not < l2re_pretrained = 0.5" in v.text and "does not beat the pretrained" in v.text
    assert [c["verdict"] for c in v.numbers["configurations"]] == ["excluded"]

    for seed in range(3):  # a learnable pair on which A beats B
        put(out, "a", seed, {"l2re": 0.10 + 0.01 * seed, "l2re_pretrained": 0.5}, task_params=pair, primary="l2re",
            directions=directions)
        put(out, "b", seed, {"l2re": 0.20 + 0.01 * seed, "l2re_pretrained": 0.5}, task_params=pair, primary="l2re",
            directions=directions)
        put(out, "none", seed, {"l2re": 0.05, "l2re_pretrained": 0.5}, task_params=pair, primary="l2re",
            directions=directions)
    (v,) = judge(tmp_path, text)
    assert v.verdict == "reproduced"  # the default metric is the recorded primary one, l2re, lower is better
    assert sorted(c["verdict"] for c in v.numbers["configurations"]) == ["excluded", "reproduced"]
    assert "1 excluded" in v.text and "Excluded: " in v.text and "helmholtz" in v.text


def test_a_condition_on_the_methods_own_cells(tmp_path):
    out = tmp_path / "out"
    for seed in range(3):
        put(out, "a", seed, {"quality": 0.9 + seed / 100, "rank_selected": 10, "rank_true": 2})
        put(out, "b", seed, {"quality": 0.8, "rank_selected": 2 if seed else 3, "rank_true": 2})
    text = BETTER + "    adequacy: {method: [{metric: rank_selected, op: '>', value: rank_true}]}\n"
    (v,) = judge(tmp_path, text)
    assert v.verdict == "inconclusive (protocol)" and "b, seed 1: rank_selected = 2, not > rank_true = 2" in v.text


# -- the other relations -----------------------------------------------------------------------------------------------


WITHIN = """
claims:
  - id: a-near-dense
    source: "Paper, Table 2"
    statement: "A is within 2 % of dense"
    select: {task: toy}
    methods: [{selector: a}]
    relation: {kind: within_of_dense, percent: 2}
"""


def test_within_of_dense(tmp_path):
    out = tmp_path / "out"
    plant(out, "none", [0.90, 0.92, 0.94])
    plant(out, "a", [0.89, 0.915, 0.935])  # about 0.6-1.1 % worse
    (v,) = judge(tmp_path, WITHIN)
    assert v.verdict == "reproduced" and "relative loss" in v.text
    plant(out, "a", [0.80, 0.82, 0.85])  # about 10 % worse in every seed
    (v,) = judge(tmp_path, WITHIN)
    assert v.verdict == "contradicted"
    plant(out, "a", [0.90, 0.92, 0.85])  # 0, 0, 10 %: the interval straddles 2 %
    (v,) = judge(tmp_path, WITHIN)
    assert v.verdict == "inconclusive (noise)"


def test_within_of_dense_without_a_dense_reference_is_not_run(tmp_path):
    plant(tmp_path / "out", "a", [0.89, 0.915, 0.935])
    (v,) = judge(tmp_path, WITHIN)
    assert v.verdict == "not run" and "no dense reference" in v.text


def test_compression_at_loss(tmp_path):
    out = tmp_path / "out"
    plant(out, "none", [0.95, 0.95, 0.96])
    for seed, (quality, ratio) in enumerate([(0.945, 0.10), (0.946, 0.11), (0.952, 0.09)]):
        put(out, "a", seed, {"quality": quality, "param_ratio": ratio}, budget=None)
    text = """
    claims:
      - id: a-compresses
        source: "Paper, Table 3"
        statement: "A compresses at least {c}x within 0.01 of dense"
        select: {{task: toy}}
        methods: [{{selector: a}}]
        relation: {{kind: compression_at_loss, compression: {c}, loss: 0.01, loss_kind: absolute}}
    """
    (v,) = judge(tmp_path, text.format(c=7.4))
    assert v.verdict == "reproduced"
    (config,) = v.numbers["configurations"]
    (part,) = config["parts"]
    assert part["compression"]["mean"] == pytest.approx((10 + 1 / 0.11 + 1 / 0.09) / 3)
    (v,) = judge(tmp_path, text.format(c=20))
    assert v.verdict == "contradicted" and "claimed at least x20" in v.text


def test_rank_recovered(tmp_path):
    out = tmp_path / "out"
    for seed, rank in enumerate([4, 4, 5]):
        put(out, "a", seed, {"quality": 0.1, "rank_selected": rank, "rank_true": 4})
    text = """
    claims:
      - id: rank
        source: "Paper, abstract"
        statement: "A recovers the true rank"
        select: {{task: toy}}
        methods: [{{selector: a}}]
        relation: {{kind: rank_recovered, percent: {p}}}
    """
    (v,) = judge(tmp_path, text.format(p=100))
    assert v.verdict == "contradicted" and "recovered in 2/3 seeds" in v.text
    (v,) = judge(tmp_path, text.format(p=60))
    assert v.verdict == "reproduced"


def test_rate_of_a_curve(tmp_path):
    """Errors 1/t (log-log slope -1) against exp(-t/5) (linear convergence: steeper and steeper)."""
    out = tmp_path / "out"
    for seed in range(3):
        scale = 1 + seed / 10
        put(out, "slow", seed, {"error": 0.1}, primary="error",
            curves={"error": [(t, scale / t) for t in range(1, 101)]})
        put(out, "fast", seed, {"error": 0.1}, primary="error",
            curves={"error": [(t, scale * 2.718 ** (-t / (5 + seed))) for t in range(1, 101)]})
    text = """
    claims:
      - id: rate
        source: "Paper, Theorem 1"
        statement: "{who} converges with a log-log slope in {slope}"
        select: {{task: toy}}
        methods: [{{selector: {who}}}]
        relation: {{kind: rate, curve: error, x: log, y: log, slope: {slope}}}
    """
    (v,) = judge(tmp_path, text.format(who="slow", slope="[-2, 0]"))
    assert v.verdict == "reproduced" and "slope -1 [-1, -1]" in v.text
    (v,) = judge(tmp_path, text.format(who="fast", slope="[null, -2]"))
    assert v.verdict == "reproduced"
    (v,) = judge(tmp_path, text.format(who="fast", slope="[-2, 0]"))
    assert v.verdict == "contradicted"


def test_rate_against_a_task_parameter(tmp_path):
    """quality = c * size^0.5 over sizes 10, 20, 40: the log-log slope against ``size`` is 0.5."""
    out = tmp_path / "out"
    for size in (10, 20, 40):
        for seed in range(3):
            put(out, "a", seed, {"quality": (1 + seed / 10) * size ** 0.5}, task_params={"size": size, "kind": "x"})
    text = """
    claims:
      - id: slope
        source: "Paper, Figure 2"
        statement: "quality grows like the square root of the size"
        select: {task: toy, task_params: {kind: x}}
        methods: [{selector: a}]
        relation: {kind: rate, against: size, x: log, y: log, slope: [0.4, 0.6]}
    """
    (v,) = judge(tmp_path, text)
    assert v.verdict == "reproduced" and "over size in 10, 20, 40" in v.text


def test_ordering_is_pairwise_better_along_the_chain(tmp_path):
    out = tmp_path / "out"
    plant(out, "a", [0.90, 0.91, 0.93])
    plant(out, "b", [0.80, 0.82, 0.81])
    plant(out, "c", [0.70, 0.71, 0.72])
    text = """
    claims:
      - id: chain
        source: "Paper, Table 1"
        statement: "A > B > C"
        select: {task: toy}
        methods: [{selector: a}, {selector: b}, {selector: c}]
        relation: {kind: ordering}
    """
    (v,) = judge(tmp_path, text)
    assert v.verdict == "reproduced" and len(v.numbers["configurations"][0]["links"]) == 2
    plant(out, "c", [0.85, 0.86, 0.87])  # C beats B beyond noise
    (v,) = judge(tmp_path, text)
    assert v.verdict == "contradicted" and "b vs c: loss" in v.text


# -- aggregation, matching, several folders ----------------------------------------------------------------------------


def test_aggregation_over_configurations(tmp_path):
    """Each budget is a configuration: all reproduced -> reproduced; one within noise -> inconclusive (noise); one
    contradicted -> contradicted, whatever the others say."""
    out = tmp_path / "out"
    plant(out, "a", [0.90, 0.91, 0.93], budget=0.5)
    plant(out, "b", [0.80, 0.82, 0.81], budget=0.5)
    plant(out, "a", [0.60, 0.61, 0.63], budget=0.3)
    plant(out, "b", [0.50, 0.52, 0.51], budget=0.3)
    (v,) = judge(tmp_path, BETTER)
    assert v.verdict == "reproduced" and v.text.startswith("2 configurations (2 reproduced)")
    plant(out, "b", [0.65, 0.58, 0.62], budget=0.3)
    (v,) = judge(tmp_path, BETTER)
    assert v.verdict == "inconclusive (noise)"
    plant(out, "b", [0.70, 0.72, 0.71], budget=0.3)
    (v,) = judge(tmp_path, BETTER)
    assert v.verdict == "contradicted" and "param_ratio=0.3" in v.text
    (v,) = judge(tmp_path, BETTER.replace("task_params: {size: 12}", "task_params: {size: 12}, budgets: [0.5]"))
    assert v.verdict == "reproduced" and len(v.numbers["configurations"]) == 1


def test_combine_rule():
    J = verify.Judged
    R, C, N, P, X = (verify.REPRODUCED, verify.CONTRADICTED, verify.NOISE, verify.PROTOCOL, verify.NOT_RUN)
    assert verify.combine([]) == X and verify.combine([J(X, "")]) == X
    assert verify.combine([J(R, ""), J(R, ""), J(X, "")]) == R
    assert verify.combine([J(R, ""), J(N, "")]) == N
    assert verify.combine([J(R, ""), J(P, ""), J(N, "")]) == P
    assert verify.combine([J(P, ""), J(C, ""), J(R, "")]) == C


def test_unnamed_axes_are_part_of_the_configuration_and_ambiguity_is_a_protocol_error(tmp_path):
    out = tmp_path / "out"
    for factorization in ("f1", "f2"):  # the factorization is named by no method: one configuration each
        plant(out, "a", [0.90, 0.91, 0.93], factorization=factorization)
        plant(out, "b", [0.80, 0.82, 0.81], factorization=factorization)
    (v,) = judge(tmp_path, BETTER)
    assert v.verdict == "reproduced" and len(v.numbers["configurations"]) == 2
    assert "factorization=f1" in v.numbers["configurations"][0]["configuration"]
    plant(tmp_path / "out", "a", [0.70, 0.71, 0.73], selector_params={"mode": "joint"}, factorization="f1")
    (v,) = judge(tmp_path, BETTER)  # `a` now names two variants in one configuration
    assert v.verdict == "inconclusive (protocol)" and "matches 2 variants" in v.text
    (v,) = judge(tmp_path, BETTER.replace("{selector: a}", "{selector: {a: {mode: joint}}}"))
    assert v.verdict == "contradicted"  # 0.70 against 0.80


def test_the_union_of_several_results_folders(tmp_path):
    plant(tmp_path / "one", "a", [0.90, 0.91, 0.93])
    plant(tmp_path / "two", "b", [0.80, 0.82, 0.81])
    (v,) = judge(tmp_path, BETTER, tmp_path / "one", tmp_path / "two")
    assert v.verdict == "reproduced"


def test_verdict_frame():
    frame = verify.verdict_frame([verify.Verdict("c1", "Paper", "A > B", "reproduced", "1 configuration ...", {})])
    assert list(frame.columns) == ["claim", "source", "verdict", "numbers"]
    assert frame.iloc[0].tolist() == ["c1", "Paper", "reproduced", "1 configuration ..."]


# -- the command line --------------------------------------------------------------------------------------------------


def _files(folder):
    return sorted(p.relative_to(folder) for p in folder.rglob("*"))


def test_cli_exit_codes_and_table(cli, tmp_path):
    out = tmp_path / "out"
    plant(out, "a", [0.90, 0.91, 0.93])
    plant(out, "b", [0.80, 0.82, 0.81])
    claims = claims_file(tmp_path, BETTER)
    before = _files(tmp_path)
    result = cli("verify", claims, out)
    assert result.returncode == 0, result.stderr
    assert re.search(r"a-beats-b\s+Paper 2024, Table 1\s+reproduced\s+1 configuration", result.stdout)
    assert "1 claim: 1 reproduced" in result.stdout
    assert _files(tmp_path) == before  # writes nothing

    not_run = claims_file(tmp_path, BETTER.replace("{selector: b}", "{selector: zzz}"), "not-run.yaml")
    assert cli("verify", not_run, out).returncode == 0  # only a contradicted claim fails

    plant(out, "b", [0.95, 0.96, 0.97])
    result = cli("verify", claims, out)
    assert result.returncode == 1 and "contradicted" in result.stdout


def test_bench_report_with_claims_adds_the_verdicts_to_report_md_and_the_html_page(cli, tmp_path):
    out = tmp_path / "out"
    plant(out, "a", [0.90, 0.91, 0.93])
    plant(out, "b", [0.80, 0.82, 0.81])
    result = cli("report", out, "--claims", claims_file(tmp_path, BETTER))
    assert result.returncode == 0, result.stderr
    assert "claims (bench verify):" in result.stdout and "reproduced" in result.stdout
    markdown = (out / "report" / "report.md").read_text()
    assert "## Claims (`bench verify`)" in markdown and "a-beats-b" in markdown
    assert "a-beats-b" in (out / "report" / "index.html").read_text()
    bad = cli("report", out, "--claims", claims_file(tmp_path, BETTER.replace("kind: better", "kind: faster"), "b.yaml"))
    assert bad.returncode == 2 and bad.stderr.startswith("error: ")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (BETTER.replace("kind: better", "kind: better, margin: 1"),
         "claims[0].relation.margin: expected one of the keys kind (unknown key)"),
        (BETTER.replace("kind: better", "kind: faster"),
         "claims[0].relation: expected kind to be one of: better, ordering, within_of_dense, compression_at_loss, "
         "rank_recovered, rate (got 'faster')"),
        (BETTER.replace('    source: "Paper 2024, Table 1"\n', ""), "claims[0].source: expected a value (required key"),
        (BETTER.replace("{selector: b}", "{}"), "claims[0].methods[1]: expected a selector, a factorization or both"),
        (BETTER.replace("{selector: b}", "{selector: {b: 1}}"),
         "claims[0].methods[1].selector: expected a plugin name or {name: {param: value}} (got {'b': 1})"),
        (BETTER.replace("methods: [{selector: a}, {selector: b}]", "methods: [{selector: a}]"),
         "claims[0]: expected exactly two methods for relation better"),
        (WITHIN.replace("percent: 2", "percent: lots"),
         "claims[0].relation.percent: expected a valid number"),
        (BETTER.replace("select: {", "selection: {"), "claims[0].selection: expected one of the keys id, source"),
        (BETTER + BETTER.replace("claims:\n", ""), "claims[1].id: expected a unique id"),
        ("claims: [\n", "line "),
        ("- just a list\n", "expected a mapping with the key claims"),
    ],
)
def test_cli_malformed_claims_is_one_line_and_exit_2(cli, tmp_path, text, message):
    out = tmp_path / "out"
    plant(out, "a", [0.9, 0.9, 0.9])
    claims = claims_file(tmp_path, text)
    result = cli("verify", claims, out)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"error: {claims}: ")
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_cli_missing_claims_file_or_results_folder_is_exit_2(cli, tmp_path):
    out = tmp_path / "out"
    plant(out, "a", [0.9, 0.9, 0.9])
    claims = claims_file(tmp_path, BETTER)
    result = cli("verify", tmp_path / "nope.yaml", out)
    assert result.returncode == 2 and "nope.yaml: expected a claims file (no such file)" in result.stderr
    result = cli("verify", claims, out, tmp_path / "missing")
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {tmp_path / 'missing'}: expected a results folder written by "
                                     "`bench run` (no cells/ inside)")


# -- the shipped claims ------------------------------------------------------------------------------------------------


SHIPPED = ROOT / "claims" / "seeds.yaml"


def test_shipped_claims_load_and_cite_their_sources():
    claims = verify.load_claims(SHIPPED)
    assert len(claims) >= 8
    page = (ROOT / "docs" / "algorithms.md").read_text(encoding="utf-8")
    anchors = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#{2,4} (.+)$", page, flags=re.M)}
    cited = set(re.findall(r"docs/algorithms\.md#([\w-]+)", SHIPPED.read_text(encoding="utf-8")))
    assert cited and cited <= anchors
    for claim in claims:
        assert claim.suite and (ROOT / claim.suite).is_file(), claim.id
        assert re.search(r"\d{4}", claim.source), f"{claim.id}: the source names no year"


def test_every_shipped_claim_matches_the_suite_it_names():
    """Expand each named suite with the real registry: every claim covers at least one configuration, every method
    matches cells, no method is ambiguous, and the relations that need the dense reference find it."""
    from rankbench.plugins import load_plugins
    from rankbench.suite import expand, load_suite

    registry = load_plugins(None)
    frames = {}
    failures = {}
    for claim in verify.load_claims(SHIPPED):
        if claim.suite not in frames:
            cells = expand(load_suite(ROOT / claim.suite), registry, "cpu", None)
            frames[claim.suite] = pd.DataFrame([{
                "task": c.task, "task_params": json.dumps(c.task_params, sort_keys=True), "selector": c.selector,
                "selector_params": json.dumps(c.selector_params, sort_keys=True), "factorization": c.factorization,
                "factorization_params": json.dumps(c.factorization_params, sort_keys=True), "budget": c.budget,
                "budget_kind": c.budget_kind, "seed": c.seed,
            } for c in cells if c.skip_reason is None])
        found = verify.plan(claim, frames[claim.suite])
        if found.problems or not found.configurations:
            failures[claim.id] = found.problems or ["no configuration"]
    assert failures == {}
