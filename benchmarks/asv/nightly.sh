#!/usr/bin/env bash
# The nightly routine behind `make nightly` (README: "Nightly regression tracking"):
#   asv machine --yes; asv run (the nightly slice once per commit); asv publish (static site in .asv/html, its
#   CDN libraries replaced by local copies: benchmarks/asv/vendor.py);
#   bench compare against the nearest earlier commit that has a nightly results folder; bench verify the seed
#   papers' claims (claims/seeds.yaml) on the commit's results folder; list asv's regressions.
#
#   benchmarks/asv/nightly.sh                        HEAD's committed code, in asv's per-commit environment
#   RANGE=A..B benchmarks/asv/nightly.sh             every commit of A..B, oldest first, one `asv run` each
#   NIGHTLY_PYTHON=same benchmarks/asv/nightly.sh    the working tree in the project venv, stored under HEAD
#                                                    (results folder HEAD-dirty when the tree has local changes)
# Exit status 1 when a benchmark failed (a cell did not finish ok), publishing failed, bench compare found a
# quality regression, or the claims file is malformed; the site is published either way. A contradicted claim is
# only reported (the verdict table is in the log) unless NIGHTLY_VERIFY_STRICT=1, which makes it fail the nightly too.
set -uo pipefail
cd "$(dirname "$0")/../.."
VENV=${VENV:-.venv}
ASV="$VENV/bin/asv"
BENCH="$VENV/bin/bench"
export RANKBENCH_NIGHTLY_DIR
RANKBENCH_NIGHTLY_DIR=$(realpath -m "${RANKBENCH_NIGHTLY_DIR:-.asv/nightly}")
status=0
started=$(date +%s)

"$ASV" machine --yes >/dev/null || exit 1
head=$(git rev-parse HEAD)
if [ "${NIGHTLY_PYTHON:-}" = same ]; then
    last=$head
    [ -n "$(git status --porcelain)" ] && last=$head-dirty
    export RANKBENCH_NIGHTLY_COMMIT=$last
    echo "nightly: the working tree as $last (progress: tail -f $RANKBENCH_NIGHTLY_DIR/$last.log)"
    "$ASV" run --python=same --set-commit-hash "$head" --show-stderr || status=1
else
    if [ -n "${RANGE:-}" ]; then
        commits=$(git rev-list --reverse "$RANGE") || exit 2
    else
        commits=$head
    fi
    last=""
    for commit in $commits; do
        echo "nightly: commit $commit (progress: tail -f $RANKBENCH_NIGHTLY_DIR/$commit.log)"
        # one asv run per commit: each commit's benchmarks are discovered with its own code (see nightlylib.py)
        "$ASV" run --skip-existing-successful --show-stderr "$commit^!" || status=1
        last=$commit
    done
    [ -n "$last" ] || { echo "nightly: no commits in $RANGE" >&2; exit 2; }
fi
echo "nightly: asv run took $(( $(date +%s) - started )) s"

"$ASV" publish || status=1
# asv's pages load jQuery, flot and bootstrap from CDNs; copy them in (fetched once from npm) so the site works offline
"$VENV/bin/python" benchmarks/asv/vendor.py site .asv/html || status=1  # the libraries: $ASV_VENDOR_DIR (Makefile)

previous=""
for commit in $(git rev-list --max-count=500 "${last%-dirty}"); do
    [ "$commit" = "$last" ] && continue
    if [ -d "$RANKBENCH_NIGHTLY_DIR/$commit/cells" ]; then previous=$commit; break; fi
done
if [ -n "$previous" ] && [ -d "$RANKBENCH_NIGHTLY_DIR/$last/cells" ]; then
    echo "nightly: bench compare $previous -> $last"
    "$BENCH" compare "$RANKBENCH_NIGHTLY_DIR/$previous" "$RANKBENCH_NIGHTLY_DIR/$last" || status=1
else
    echo "nightly: no earlier nightly results folder to compare $last with"
fi
if [ -d "$RANKBENCH_NIGHTLY_DIR/$last/cells" ]; then
    echo "nightly: bench verify claims/seeds.yaml $RANKBENCH_NIGHTLY_DIR/$last"
    "$BENCH" verify claims/seeds.yaml "$RANKBENCH_NIGHTLY_DIR/$last"
    verified=$?
    if [ $verified -eq 1 ] && [ "${NIGHTLY_VERIFY_STRICT:-0}" = 1 ]; then
        status=1
    elif [ $verified -ne 0 ] && [ $verified -ne 1 ]; then
        status=1  # a malformed claims file (exit 2) or a crash
    fi
fi
"$VENV/bin/python" benchmarks/asv/nightlylib.py regressions .asv/html
echo "nightly: results $RANKBENCH_NIGHTLY_DIR/$last; site $(pwd)/.asv/html/index.html (serve: $ASV preview)"
exit $status
