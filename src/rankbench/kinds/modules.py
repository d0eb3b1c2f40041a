"""Module-level factorizations in the ``compression`` problem kind: methods that compress *pairs* of a transformer
block's Linears jointly (a module), instead of one weight at a time.

A per-site ``LowRankFactorization`` sees one weight and its input statistics. Some methods act on a module: the MLP
(gate/up with down, through the nonlinearity), queries with keys (per attention head, through RoPE), values with
outputs. They shrink the module's inner dimension (intermediate channels, head dimensions) and store the compressed
module as smaller Linears, with no extra factor matrices. This module is the protocol between such a method and the
compression kind; ``rankbench.kinds.compression`` dispatches a cell here when its factorization is a
``ModuleFactorization``.

What the task supplies: ``CompressionTask.transformer_blocks(model)`` -- a ``TransformerBlock`` per block (qualified
names of the block, its attention module and its q/k/v/o, gate/up/down Linears; head counts; whether queries and keys
carry rotary embeddings in the rotate-half layout). The default returns None: the task offers no blocks, and module
factorizations skip it with that reason.

Flow of one cell (``run_module_compression``):

1. calibration statistics of the sites (``ModuleFactorization.needs``, e.g. ``gram``: the Gram matrix of every
   Linear's input, so the input correlation of the attention block at q_proj and the intermediate activations'
   correlation at down_proj), once per calibration key (phase ``calibrate``);
2. the factorization decomposes every block once (``decompose_block`` -> one ``ModuleDecomposition`` per module:
   a descending score spectrum, the largest rank, the exact parameter cost of every rank); memoised per
   factorization and calibration key, reused by every selector and budget (phase ``decompose``);
3. the selector sees one ``Site`` per module (its spectrum, ``max_rank``, exact ``params_at_rank``, dense parameters
   = the module's Linears' weights) and ``ModuleStatistics`` (which block a module belongs to, the blocks' Block
   Influence scores, the Gram matrices);
4. every block is rebuilt with its modules at their ranks (``build``) (``ModuleDecomposition.feasible`` rounds a rank the module cannot take, e.g.
   an odd number of rotary dimensions, down), the replacements are swapped into the model, the task evaluates, and
   the dense modules are put back. ``params`` records the replacements' weights exactly (biases are not counted,
   as everywhere in the compression kind); a module's rank is recorded under the module's name.

Decompositions are kept in memory only (no disk cache, unlike per-site decompositions).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from rankbench.api import COMPRESSION, Factorization, RankProblem, Site, SkipCell
from rankbench.kinds.protocol import count_work

if TYPE_CHECKING:
    import torch
    from torch import nn

_MODULES = "modules.decompositions"  # key of the per-factorization store in the calibration memo
_INFLUENCE = "modules.block_influence"  # key of the Block Influence scores in the calibration memo


@dataclasses.dataclass(frozen=True)
class TransformerBlock:
    """The module groups of one transformer block, by qualified names in the model."""

    index: int
    block: str  # the block module: its first input and its output are the residual stream before and after it
    attention: str  # the attention module (holds q, k, v, o)
    q: str
    k: str
    v: str
    o: str
    up: str
    down: str
    gate: str | None  # None for an ungated MLP
    hidden_size: int
    num_heads: int
    num_kv_heads: int  # grouped-query attention: num_heads // num_kv_heads query heads share a key/value head
    head_dim: int
    rotary: bool  # RoPE in the rotate-half layout: dimensions i and i + head_dim/2 of a head rotate together

    @property
    def linears(self) -> tuple[str, ...]:
        names = (self.q, self.k, self.v, self.o, self.gate, self.up, self.down)
        return tuple(name for name in names if name is not None)


@dataclasses.dataclass
class ModuleDecomposition:
    """What a module factorization computed once for one module of one block."""

    name: str  # the module's name (the site name selectors and the ranks table see)
    block: int  # TransformerBlock.index
    linears: tuple[str, ...]  # the Linears the module replaces
    spectrum: np.ndarray  # descending scores, one per unit of rank (what spectral selectors read)
    shape: tuple[int, int]  # (rows, cols) shown to selectors: (max_rank, dense_params // max_rank)
    dense_params: int  # the module's Linears' weights
    params_at_rank: Callable[[int], int]  # exact parameters stored at rank k (a rank it cannot take: feasible(k))
    feasible: Callable[[int], int]  # the rank the module is built at when asked for k (within [min rank, max_rank])
    payload: Any = None  # the factorization's own data for ``build``

    @property
    def max_rank(self) -> int:
        return int(len(self.spectrum))


class ModuleFactorization(Factorization):
    """Base of factorizations that compress a transformer block's modules jointly (see the module docstring)."""

    problem_kinds: ClassVar[frozenset[str]] = frozenset({COMPRESSION})
    needs: ClassVar[frozenset[str]] = frozenset()  # calibration statistics (``compression.STATISTIC_KINDS``)

    @abc.abstractmethod
    def decompose_block(self, block: TransformerBlock, linears: dict[str, nn.Linear],
                        stats: dict[str, Any]) -> list[ModuleDecomposition]:
        """Every module of ``block`` (``linears``: its dense Linears by qualified name; ``stats``: their
        ``SiteStatistics``). Called once per block, factorization and calibration key, under ``torch.no_grad``."""

    @abc.abstractmethod
    def build(self, block: TransformerBlock, chosen: list[tuple[ModuleDecomposition, int]],
              model: nn.Module) -> dict[str, nn.Module]:
        """The replacements of the block's modules, each at its feasible rank (``chosen``: every module of the block
        with its rank): qualified name -> module (a Linear, or a parent holding several, e.g. the attention
        module when its queries/keys and values/outputs are two modules)."""


class ModuleStatistics:
    """What selectors may ask of a module problem (``problem.stats``)."""

    def __init__(self, task, ctx, blocks: list[TransformerBlock], decompositions: list[ModuleDecomposition]):
        self.task, self.ctx, self.blocks = task, ctx, blocks
        self._block_of = {d.name: d.block for d in decompositions}

    def block_of(self, site: str) -> int:
        """The index of the block that module ``site`` belongs to."""
        return self._block_of[site]

    def block_influence(self) -> np.ndarray:
        """Block Influence of every block, in block order (``block_influence``), computed once per calibration key."""
        memo = self.task.calibration_memo(self.ctx)
        if _INFLUENCE not in memo:
            memo[_INFLUENCE] = block_influence(self.task, self.ctx, self.blocks)
        return memo[_INFLUENCE]

    def gram(self, linear: str) -> torch.Tensor:
        return self.task.statistics(self.ctx, ["gram"])[linear].gram


def block_influence(task, ctx, blocks: list[TransformerBlock]) -> np.ndarray:
    """Block Influence (Men et al. 2024, ShortGPT): BI_i = 1 - mean over calibration tokens t of
    cos(x_{i,t}, x_{i+1,t}), with x_i the residual stream entering block i and x_{i+1} the stream it hands on.
    One forward pass over the calibration batches with hooks on the blocks."""
    import torch
    model = task.model(ctx)
    sums = np.zeros(len(blocks))
    counts = np.zeros(len(blocks))

    def hook(position: int):
        def record(module, args, kwargs, output):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            y = output[0] if isinstance(output, (tuple, list)) else output
            x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
            y = y.detach().reshape(-1, y.shape[-1]).to(torch.float64)
            cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
            sums[position] += float(cos.sum())
            counts[position] += cos.numel()

        return record

    handles = [model.get_submodule(block.block).register_forward_hook(hook(i), with_kwargs=True)
               for i, block in enumerate(blocks)]
    count_work(ctx, "calibration_passes")
    try:
        with torch.no_grad():
            for batch in task.calibration_batches(ctx):
                task.calibration_loss(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    if not counts.all():
        raise ValueError("the calibration batches did not reach every block")
    return 1.0 - sums / counts


def module_decompositions(task, ctx, factorization: ModuleFactorization,
                          blocks: list[TransformerBlock]) -> list[ModuleDecomposition]:
    """Every module of every block, decomposed once per factorization (and its parameters) and calibration key."""
    import torch
    store = task.calibration_memo(ctx)["stores"].setdefault((_MODULES, *factorization.identity), {})
    if "modules" not in store:
        stats = task.statistics(ctx, factorization.needs) if factorization.needs else {}
        model = task.model(ctx)
        modules = []
        for block in blocks:
            linears = {name: model.get_submodule(name) for name in block.linears}
            count_work(ctx, "decompositions")
            with torch.no_grad():
                modules += factorization.decompose_block(block, linears, {n: stats.get(n) for n in linears})
        store["modules"] = modules
    return store["modules"]


def run_module_compression(task, ctx, selector, factorization: ModuleFactorization) -> None:
    """One compression cell with a module factorization (see the module docstring)."""
    model = task.model(ctx)
    sites = task.sites(ctx)
    blocks = task.transformer_blocks(model)
    if not blocks:
        raise SkipCell(f"task {task.name} exposes no transformer blocks for {factorization.name}")
    covered = {name for block in blocks for name in block.linears}
    if covered != set(sites):
        raise SkipCell(f"{factorization.name} compresses whole blocks; the task's sites are not exactly the blocks' "
                       f"Linears ({len(covered ^ set(sites))} differ)")
    with ctx.phase("calibrate"):
        task.statistics(ctx, factorization.needs)
    with ctx.phase("decompose"):
        decompositions = module_decompositions(task, ctx, factorization, blocks)
    problem = RankProblem(
        sites=[Site(name=d.name, shape=d.shape, singular_values=np.asarray(d.spectrum, dtype=np.float64),
                    params_at_rank=d.params_at_rank, dense_params=d.dense_params, max_rank=d.max_rank)
               for d in decompositions],
        budget=ctx.budget, budget_kind=ctx.budget_kind, seed=ctx.seed,
        stats=ModuleStatistics(task, ctx, blocks, decompositions), device=ctx.device,
    )
    with ctx.phase("select"):
        ranks = selector.select(problem)
    replacements, chosen = {}, {}
    with ctx.phase("fit"):
        for d in decompositions:
            if d.name not in ranks:
                raise ValueError(f"the selector gave no rank for module {d.name!r}")
            chosen[d.name] = d.feasible(int(ranks[d.name]))
        for block in blocks:
            members = [(d, chosen[d.name]) for d in decompositions if d.block == block.index]
            replacements.update(factorization.build(block, members, model))
    originals = {name: model.get_submodule(name) for name in replacements}
    try:
        for name, module in replacements.items():
            model.set_submodule(name, module)
        kept = 0
        for d in decompositions:
            params = int(d.params_at_rank(chosen[d.name]))
            kept += params
            ctx.ranks(d.name, chosen[d.name], params)
        with ctx.phase("evaluate"):
            task.evaluate(ctx, model)
    finally:
        for name, module in reversed(list(originals.items())):
            model.set_submodule(name, module)
    dense = sum(linear.weight.numel() for linear in sites.values())
    ctx.record_size(kept, dense)
