"""A loose plugin file (loaded with --plugins-dir) used by the harness tests: a tiny compression task, a truncated
SVD factorization, and a factorization that misbehaves on demand (raises, hangs, kills its own process, returns NaN)."""

import os
import signal
import time
from typing import Literal

import numpy as np

from rankbench import COMPRESSION, PARAM_RATIO, Diverged, Factorization, PluginParams, RankProblem, SelfRunningTask, Site, hookimpl


GENERATED = []  # one entry per expensive set-up in this process


class ToyTask(SelfRunningTask):
    name = "toy"
    problem_kind = COMPRESSION
    budget_kind = PARAM_RATIO
    primary_metric = "rel_error"
    description = "two random matrices with planted spectra; error of their factorized approximation"

    class Params(PluginParams):
        size: int = 40
        work_s: float = 0.0  # seconds of pretend work per cell

    def setup(self, ctx):
        key = ("weights", ctx.task_seed)  # ctx.shared lives per task configuration: key seed-dependent data
        if key not in ctx.shared:
            rng = np.random.default_rng(ctx.task_seed)
            n = self.params.size
            ctx.shared[key] = {f"layer{i}": rng.standard_normal((n, n // (i + 1))) for i in range(2)}
            GENERATED.append(self.params.size)
        self.weights = ctx.shared[key]

    def _record_params(self, ctx, params):
        dense = sum(w.size for w in self.weights.values())
        ctx.metric("params", params)
        ctx.metric("param_ratio", params / dense)

    def run_reference(self, ctx):
        ctx.metric("rel_error", 0.0, higher_is_better=False)
        self._record_params(ctx, sum(w.size for w in self.weights.values()))

    def run(self, ctx, selector, factorization):
        weights = self.weights
        sites = [Site(name, w.shape, np.linalg.svd(w, compute_uv=False)) for name, w in weights.items()]
        with ctx.phase("select"):
            ranks = selector.select(RankProblem(sites, ctx.budget, ctx.budget_kind, ctx.seed))
        errors, total = [], 0
        with ctx.phase("factorize"):
            time.sleep(self.params.work_s)
            for site in sites:
                approx = factorization.approximate(weights[site.name], ranks[site.name])
                errors.append(np.linalg.norm(approx - weights[site.name]) ** 2)
                params = site.params_at_rank(ranks[site.name])
                total += params
                ctx.ranks(site.name, ranks[site.name], params)
        norm = sum(np.linalg.norm(w) ** 2 for w in weights.values())
        ctx.metric("rel_error", float(np.sqrt(sum(errors) / norm)), higher_is_better=False)
        ctx.metric("setups_in_process", len(GENERATED))
        self._record_params(ctx, total)


class ToySVD(Factorization):
    name = "toy-svd"

    def approximate(self, w, rank):
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        return (u[:, :rank] * s[:rank]) @ vt[:rank]


class Misbehave(Factorization):
    name = "misbehave"

    class Params(PluginParams):
        mode: Literal["raise", "hang", "exit", "kill", "nan", "diverge", "oom", "fork-hang", "interrupt"] = "raise"

    def approximate(self, w, rank):
        mode = self.params.mode
        if mode == "raise":
            raise ValueError("this factorization always fails")
        if mode == "fork-hang":  # a child process (a data loader, a solver binary) and a hang
            import subprocess

            child = subprocess.Popen(["sleep", "300"])
            with open(os.environ["TOY_CHILD_PIDFILE"], "w") as handle:
                handle.write(str(child.pid))
            while True:
                time.sleep(0.05)
        if mode == "interrupt":
            raise KeyboardInterrupt("raised by the plugin, not by a user")
        if mode == "hang":
            while True:
                time.sleep(0.05)
        if mode == "exit":
            os._exit(3)
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "diverge":
            raise Diverged("loss blew up")
        if mode == "oom":
            raise MemoryError("pretend allocation failure")
        return np.full_like(w, np.nan)


@hookimpl
def rankbench_register_tasks(register):
    register(ToyTask)


@hookimpl
def rankbench_register_factorizations(register):
    register(ToySVD)
    register(Misbehave)
