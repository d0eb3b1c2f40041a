"""Decompositions in the precision each factorization declares (``LowRankFactorization.precision``): every built-in
factorization that works in float32 gives, on the shipped SmolLM2-135M's sites and with the task's own calibration
statistics, a spectrum whose norm-wise relative error against the same method computed in float64 is below 1e-5,
and the float32 factors rebuild the weight to the same relative error. (``fwsvd`` stays in float64: with its
Fisher weights spanning several decades, float32 factors rebuild SmolLM2's weights only to 8.8e-5.)"""

from __future__ import annotations

import pytest
import torch

from rankbench.context import CellContext
from rankbench.kinds.compression import LowRankFactorization
from rankbench.plugins import load_plugins
from rankbench_plugins.tasks.llm_perplexity import LLMPerplexity, LLMPerplexityParams

SPECTRUM_RTOL = 1e-5
LAYERS = (0, 10, 20, 29)  # every site kind of four of SmolLM2's 30 layers (28 sites)


def float32_factorizations() -> list[LowRankFactorization]:
    registry = load_plugins()
    return [info.cls() for info in registry.plugins["factorization"].values()
            if issubclass(info.cls, LowRankFactorization) and info.cls.precision == "float32"]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    task = LLMPerplexity(LLMPerplexityParams.model_validate(
        {"seq_len": 64, "max_eval_tokens": 64, "calib_samples": 2, "lm_eval": False}))
    ctx = CellContext(cell_id="precision", seed=0, task_seed=0, device="cpu", budget=None, budget_kind=None,
                      shared={}, cache_dir=tmp_path_factory.mktemp("llm-cache"))
    task.setup(ctx)
    return task, ctx


def test_the_float32_factorizations_are_the_svd_variants():
    assert {f.name for f in float32_factorizations()} == {"svd", "asvd"}


@pytest.mark.parametrize("factorization", float32_factorizations(), ids=lambda f: f.name)
def test_float32_spectra_match_float64_on_smollm2(smollm2, factorization):
    task, ctx = smollm2
    statistics = task.statistics(ctx, factorization.needs)
    sites = {name: linear for name, linear in task.sites(ctx).items()
             if int(name.split(".")[2]) in LAYERS}
    assert len(sites) == 7 * len(LAYERS)
    worst = 0.0
    with torch.no_grad():
        for name, linear in sites.items():
            weight = linear.weight.detach()
            single = factorization.decompose(weight.to(torch.float32), statistics[name])
            double = factorization.decompose(weight.to(torch.float64), statistics[name])
            assert single.s.dtype == torch.float32 and single.left.dtype == torch.float32
            error = float((single.s.double() - double.s).norm() / double.s.norm())
            worst = max(worst, error)
            # the float32 factors rebuild the weight as the float64 ones do, to float32 round-off
            rebuilt = (single.left.double() * single.s.double()) @ single.right.double()
            reference = double.matrix()
            assert float((rebuilt - reference).norm() / reference.norm()) < SPECTRUM_RTOL
    assert worst < SPECTRUM_RTOL, f"{factorization.name}: spectrum error {worst:.2e} on SmolLM2"


@pytest.mark.parametrize("module", ["fwsvd", "svd_llm"])
def test_gram_eigendecomposition_equals_the_svd_on_smollm2(smollm2, module, monkeypatch):
    """fwsvd and svd-llm decompose through ``thin_svd`` (float64 Gram eigendecomposition): on SmolLM2's sites their
    spectra and weights equal those of the same methods with ``torch.linalg.svd`` in its place."""
    import importlib

    plugin = importlib.import_module(f"rankbench_plugins.factorizations.{module}")
    factorization = next(cls() for cls in vars(plugin).values()
                         if isinstance(cls, type) and issubclass(cls, LowRankFactorization) and cls.__module__ == plugin.__name__)
    task, ctx = smollm2
    statistics = task.statistics(ctx, factorization.needs)
    sites = {name: linear for name, linear in task.sites(ctx).items() if int(name.split(".")[2]) in LAYERS[:2]}
    with torch.no_grad():
        weights = {name: linear.weight.detach().double() for name, linear in sites.items()}
        gram = {name: factorization.decompose(w, statistics[name]) for name, w in weights.items()}
        monkeypatch.setattr(plugin, "thin_svd", lambda matrix: torch.linalg.svd(matrix, full_matrices=False))
        for name, weight in weights.items():
            svd = factorization.decompose(weight, statistics[name])
            # singular values below ~1e-8 s_1 (svd-llm's whitened weights reach 1e-8 s_1) are only known to
            # ~1e-8 s_1 through the Gram matrix: the spectrum agrees to 1e-8 norm-wise, far inside 1e-5
            assert float((gram[name].s - svd.s).norm() / svd.s.norm()) < 1e-7
            assert float((gram[name].matrix() - svd.matrix()).norm() / svd.matrix().norm()) < 1e-7
            k = svd.rank // 4  # a truncation keeps the same subspace
            assert float((gram[name].matrix(k) - svd.matrix(k)).norm() / svd.matrix(k).norm()) < 1e-7
