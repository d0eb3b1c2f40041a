"""Hostile suites and arguments: each is refused with exit 2 and one short message, before anything is written."""

from __future__ import annotations

import pytest

from conftest import GOOD_PLUGINS, TOY_SUITE


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8)
) + "name: bomb\n"

CASES = {
    "nan budget": (TOY_SUITE.replace("budgets: [0.5]", "budgets: [.nan]"), [], "budgets[0]"),
    "inf budget": (TOY_SUITE.replace("budgets: [0.5]", "budgets: [.inf]"), [], "budgets[0]"),
    "inf timeout": (TOY_SUITE.replace("timeout: 30", "timeout: .inf"), [], "timeout"),
    "seed beyond int64": (TOY_SUITE.replace("seeds: [0]", f"seeds: [{2**63}]"), [], "seeds[0]"),
    "negative seed": (TOY_SUITE.replace("seeds: [0]", "seeds: [-1]"), [], "seeds[0]"),
    "nan plugin parameter": (TOY_SUITE.replace("{toy: {size: 24}}", "{toy: {size: 24, work_s: .nan}}"), [], "work_s"),
    "duplicate top-level key": (TOY_SUITE + "seeds: [1]\n", [], "duplicate key 'seeds', first on line 7"),
    "duplicate task parameter": (TOY_SUITE.replace("{toy: {size: 24}}", "{toy: {size: 24, size: 12}}"), [],
                                 "duplicate key 'size'"),
    "alias bomb": (BOMB, [], "aliases are expanded"),
    "--timeout nan": (TOY_SUITE, ["--timeout", "nan"], "--timeout: expected finite seconds"),
    "--timeout inf": (TOY_SUITE, ["--timeout", "inf"], "--timeout: expected finite seconds"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_suites_exit_2_with_one_short_message_and_write_nothing(cli, write_suite, tmp_path, case):
    text, extra, expected = CASES[case]
    out = tmp_path / "out"
    result = cli("run", write_suite(text), "--out", out, "--plugins-dir", GOOD_PLUGINS, "--executor", "inprocess",
                 *extra)
    assert result.returncode == 2, result.stderr[-500:]
    assert expected in result.stderr
    assert len(result.stderr) < 1000 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not out.exists()


def test_a_suite_over_the_size_limit_is_refused_unread(cli, tmp_path):
    from rankbench.files import MAX_INPUT_BYTES

    path = tmp_path / "big.yaml"
    path.write_text(TOY_SUITE + "description: >\n" + ("  " + "x" * 100 + "\n") * (MAX_INPUT_BYTES // 100))
    result = cli("check", path, "--plugins-dir", GOOD_PLUGINS)
    assert result.returncode == 2 and "at most 1,000,000 bytes" in result.stderr


def test_out_under_a_regular_file_is_bad_input(cli, write_suite, tmp_path):
    (tmp_path / "file").write_text("x")
    result = cli("run", write_suite(TOY_SUITE), "--out", tmp_path / "file" / "out", "--plugins-dir", GOOD_PLUGINS,
                 "--executor", "inprocess")
    assert result.returncode == 2 and "--out: expected a folder that can be created" in result.stderr
    assert result.stderr.count("\n") == 1


def test_a_long_bad_value_is_quoted_as_an_excerpt(cli, write_suite, tmp_path):
    long_name = "x" * 5000
    result = cli("check", write_suite(TOY_SUITE.replace("[uniform]", f"[{long_name}]")), "--plugins-dir", GOOD_PLUGINS)
    assert result.returncode == 2 and "unknown selector 'xxx" in result.stderr and len(result.stderr) < 1500
