"""A task and a factorization that do nothing: what is left of a cell's wall time is the host's own overhead
(cell bookkeeping, measurement, the executor's round trip, and the atomic Parquet writes)."""

from rankbench import COMPRESSION, PARAM_RATIO, Factorization, RankProblem, SelfRunningTask, Site, hookimpl


class NoopTask(SelfRunningTask):
    name = "noop"
    problem_kind = COMPRESSION
    budget_kind = PARAM_RATIO
    primary_metric = "value"

    def run_reference(self, ctx):
        ctx.metric("value", 0.0)

    def run(self, ctx, selector, factorization):
        selector.select(RankProblem([Site("w", (4, 4), singular_values=[4.0, 3.0, 2.0, 1.0])], ctx.budget, ctx.budget_kind, ctx.seed))
        ctx.metric("value", 0.0)


class NoopFactorization(Factorization):
    name = "noop"


@hookimpl
def rankbench_register_tasks(register):
    register(NoopTask)


@hookimpl
def rankbench_register_factorizations(register):
    register(NoopFactorization)
