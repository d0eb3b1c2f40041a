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

import dataclasses
from collections.abc import Callable

from rankbench.api import ADAPTATION, COMPRESSION, RECOVERY, TRAINING, Factorization, Selector, SelfRunningTask, Task
from rankbench.kinds import adaptation, compression, recovery, training


def _nothing(task: Task, ctx) -> None:
    return None


@dataclasses.dataclass(frozen=True)
class Protocol:
    """How the cells of one problem kind run: ``skip`` (why a pairing cannot run, decided at expansion), ``setup``
    (the kind's shared work before every cell, timed as phase ``setup``), ``reference`` (the dense reference cell)
    and ``run`` (a method's cell)."""

    capability: type[Task]
    run: Callable[..., None]
    reference: Callable[..., None]
    skip: Callable[[Task, Selector, Factorization], str | None]
    setup: Callable[[Task, object], None] = _nothing


PROTOCOLS: dict[str, Protocol] = {
    COMPRESSION: Protocol(
        compression.CompressionTask,
        run=compression.run_compression,
        reference=compression.run_compression_reference,
        skip=compression.compression_skip,
        setup=compression.compression_setup,
    ),
    ADAPTATION: Protocol(
        adaptation.AdaptationTask,
        run=adaptation.run_adaptation,
        reference=adaptation.run_adaptation_reference,
        skip=adaptation.adaptation_skip,
        setup=adaptation.adaptation_setup,
    ),
    TRAINING: Protocol(
        training.TrainingTask,
        run=training.run_training,
        reference=training.run_training_reference,
        skip=training.training_skip,
    ),
    RECOVERY: Protocol(
        recovery.RecoveryTask,
        run=recovery.run_recovery,
        reference=recovery.run_recovery_reference,
        skip=recovery.recovery_skip,
        setup=recovery.recovery_setup,
    ),
}

SELF_RUNNING = Protocol(
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
