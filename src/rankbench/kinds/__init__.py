"""The problem kinds: how a task and its methods meet in one cell. Public API: a third party imports these bases to
write a task or a method of a kind.

A task *supplies capabilities* -- it derives from the capability base of every kind it speaks (``CompressionTask``,
``AdaptationTask``, ``TrainingTask``, ``RecoveryTask``) and implements its abstract methods (model, sites, data,
losses, evaluation). The host decides each cell's problem kind when it expands the suite (``cell_kind``: the kind
the task, the selector and the factorization share) and runs it through that kind's ``Protocol`` below -- one
explicit table, no branching inside tasks. A task whose kind has no protocol here derives from
``rankbench.SelfRunningTask`` and runs its cells itself.

=============  =======================================  ========================================================
kind           task capability base                     methods
=============  =======================================  ========================================================
compression    ``compression.CompressionTask``          selectors x ``LowRankFactorization`` / ``TensorFactorization``
adaptation     ``adaptation.AdaptationTask``            selectors (``select`` or ``adapt``) x ``AdapterFactorization``
training       ``training.TrainingTask``                ``RankAdaptiveTrainer`` (a selector) x a layer format
recovery       ``recovery.RecoveryTask``                selectors x ``RecoverySolver`` (the factorizations of the kind)
=============  =======================================  ========================================================

Shared numerics of the kinds: ``tensor_formats`` (CP, Tucker, TT, TTM layers and fits) and ``bcpf_core`` (Bayesian
CP factorisation, used by the ``bcpf`` solver and the ``ard`` selector).
"""

from __future__ import annotations

from rankbench.api import TRAINING, Factorization, Selector, SelfRunningTask, Task
from rankbench.kinds import adaptation, compression, recovery, training
from rankbench.kinds.protocol import Protocol

PROTOCOLS: dict[str, Protocol] = {
    protocol.kind: protocol
    for protocol in (compression.PROTOCOL, adaptation.PROTOCOL, training.PROTOCOL, recovery.PROTOCOL)
}

class KindChosenByParameter(Task):
    """A task that offers several kinds, one per configuration: its ``problem`` parameter names the kind it speaks
    (its budget kind is that kind's), and ``training`` also speaks ``compression`` of the dense network it trains
    where the task is a ``CompressionTask``. Derive from this and from the capability bases of the kinds offered."""

    @property
    def problem_kind(self) -> str:  # type: ignore[override]
        return self.params.problem

    @property
    def problem_kinds(self) -> frozenset[str]:  # type: ignore[override]
        kind = self.params.problem
        return super().problem_kinds if kind == TRAINING else frozenset({kind})  # TrainingTask's rule for training

    @property
    def budget_kind(self) -> str | None:  # type: ignore[override]
        return PROTOCOLS[self.params.problem].capability.budget_kind


SELF_RUNNING = Protocol(
    "self-running",
    SelfRunningTask,
    run=lambda task, ctx, selector, factorization: task.run(ctx, selector, factorization),
    reference=lambda task, ctx: task.run_reference(ctx),
    skip=lambda task, selector, factorization: None,
)


def cell_kind(task: Task, selector: Selector | None = None, factorization: Factorization | None = None) -> str | None:
    """The problem kind a cell runs in: the task's main kind for the reference cell; otherwise the kind task,
    selector and factorization share (the task's main kind first). None: they share none."""
    if selector is None:
        return task.problem_kind
    shared = task.problem_kinds & selector.problem_kinds & factorization.problem_kinds
    if task.problem_kind in shared:
        return task.problem_kind
    return min(shared) if shared else None


def pairing_skip(task: Task, selector: Selector, factorization: Factorization) -> str | None:
    """Why the pair cannot run on the task (None: it can): no shared problem kind, a budget kind the selector does not
    understand, the kind's own rule (``Protocol.skip``), or any plugin's ``skip``."""
    kinds = task.problem_kinds
    spoken = "/".join(sorted(kinds))
    if not kinds & selector.problem_kinds:
        return f"selector {selector.name} does not handle {spoken} problems"
    if not kinds & factorization.problem_kinds:
        return f"factorization {factorization.name} does not handle {spoken} problems (task {task.name})"
    kind = cell_kind(task, selector, factorization)
    if kind is None:
        return f"selector {selector.name} and factorization {factorization.name} share no problem kind of task {task.name}"
    if task.budget_kind not in selector.budget_kinds:
        return f"selector {selector.name} does not understand budget kind {task.budget_kind}"
    rules = (protocol_for(task, kind).skip(task, selector, factorization), task.skip(selector, factorization),
             selector.skip(task, factorization), factorization.skip(task, selector))
    return next((reason for reason in rules if reason), None)


def protocol_for(task: Task, kind: str) -> Protocol:
    """The protocol that runs a cell of ``kind`` for ``task``."""
    if isinstance(task, SelfRunningTask):
        return SELF_RUNNING
    try:
        protocol = PROTOCOLS[kind]
    except KeyError:
        raise ValueError(
            f"task {task.name} speaks problem kind {kind!r}, which has no protocol in rankbench.kinds "
            f"(known: {', '.join(sorted(PROTOCOLS))}); a task of a kind of its own derives from SelfRunningTask"
        ) from None
    if not isinstance(task, protocol.capability):
        raise TypeError(f"task {task.name} speaks {kind} but is not a {protocol.capability.__name__}")
    return protocol


def run_cell(task: Task, ctx, selector: Selector | None = None, factorization: Factorization | None = None,
             kind: str | None = None) -> None:
    """Run one cell in this process through its kind's protocol (selector None: the dense reference cell): the
    kind's set-up (after ``task.setup``), then the reference or the method. The runner times the set-up as phase
    ``setup``; this function is also how tests run a cell directly."""
    kind = kind or cell_kind(task, selector, factorization)
    protocol = protocol_for(task, kind)
    with ctx.phase("setup"):
        task.setup(ctx)
        protocol.setup(task, ctx)
    if selector is None:
        protocol.reference(task, ctx)
    else:
        protocol.run(task, ctx, selector, factorization)
