"""Executor ``ray``: every cell is a Ray task with the CPUs/GPUs it asks for, on a local instance or a cluster.

Jobs write their cells' part files into the results folder themselves (``rankbench_plugins.executors._remote``), so
results survive a host that dies and a re-run with any executor resumes from them; the host only acknowledges them.
On a cluster (``address``) the results folder must be on a file system every node sees -- where it is not, the
host writes the records it gets back (a result of a dead host is then lost, as with ``subprocess``) -- and every
node needs rankbench and the plugins installed (a ``--plugins-dir`` path must exist on the nodes too).

Time limit: the task stops itself at the cell's limit (SIGALRM, like ``inprocess``: exact for Python code). The
host also holds a hard limit -- the cell's limit plus ``start_allowance_s`` for a cold worker's imports, counted
from submission -- at which it kills the task (``ray.cancel(force=True)``) and records ``timeout``: that catches a
call stuck in a C extension. At most ``max_in_flight`` tasks are submitted at once (by default as many as the
cluster has slots for), so a submitted task starts at once and queueing does not eat into its limit. A task whose
worker dies (segfault, ``os._exit``, SIGKILL) is not retried: it is ``crashed`` with Ray's error as the reason;
one that Ray's memory monitor kills is ``oom``.

Set-up sharing: Ray reuses its worker processes, and a worker keeps the plugin registry and the warm set-up of the
last task configuration it ran, so consecutive cells of one configuration (the host submits them in that order)
usually find it ready -- but with N workers each configuration is set up up to N times, against once for
``subprocess``. Cells are small tasks: per-task overhead is a few milliseconds once the workers are warm.
"""

from __future__ import annotations

import time

from pydantic import Field

from rankbench import Executor, PluginParams, hookimpl
from rankbench_plugins.executors._remote import PartWatch, job_settings, run_job, short


class RayExecutor(Executor):
    name = "ray"
    description = "run each cell as a Ray task (local instance or cluster); jobs write their own part files"
    jobs_write_results = True

    class Params(PluginParams):
        address: str | None = Field(
            default=None, description="Ray cluster address; None: the running instance, else a new local one"
        )
        num_cpus: float = Field(default=1.0, gt=0, description="CPUs per cell (its torch threads unless --threads)")
        num_gpus: float | None = Field(default=None, ge=0, description="GPUs per cell; None: 1 on device cuda, else 0")
        max_in_flight: int | None = Field(
            default=None, ge=1, description="tasks submitted at once; None: the cluster's slots for one cell"
        )
        local_num_cpus: int | None = Field(default=None, ge=1, description="CPUs of a local instance started here")
        start_allowance_s: float = Field(
            default=60.0, ge=0, description="added to the cell's limit for the host's hard kill (a cold worker's start)"
        )
        poll_s: float = Field(default=1.0, gt=0, description="longest wait between checks of the deadlines")

    def run(self, cells, runtime):
        from rankbench.runner import failed_record

        if not cells:
            return
        import ray

        started_here = False
        if not ray.is_initialized():
            try:
                if self.params.address is None:
                    ray.init(num_cpus=self.params.local_num_cpus, include_dashboard=False)
                else:
                    ray.init(address=self.params.address)
            except Exception as exc:  # noqa: BLE001 -- no cluster at that address, ...: no cell ran
                reason = short(f"Ray could not start or connect: {type(exc).__name__}: {exc}")
                yield from (failed_record(cell, "crashed", reason) for cell in cells)
                return
            started_here = True
        try:
            yield from self._run(ray, cells, runtime)
        finally:
            if started_here:
                ray.shutdown()

    def _slots(self, ray, num_gpus: float) -> int:
        if self.params.max_in_flight:
            return self.params.max_in_flight
        resources = ray.cluster_resources()
        slots = int(resources.get("CPU", 1) // self.params.num_cpus)
        if num_gpus:
            slots = min(slots, int(resources.get("GPU", 0) // num_gpus))
        return max(slots, 1)

    def _run(self, ray, cells, runtime):
        from rankbench.runner import failed_record, now

        num_gpus = self.params.num_gpus
        if num_gpus is None:
            num_gpus = 1.0 if str(runtime.device).startswith("cuda") else 0.0
        task = ray.remote(run_job).options(
            num_cpus=self.params.num_cpus, num_gpus=num_gpus, max_retries=0, retry_exceptions=False
        )
        settings = ray.put(job_settings(runtime, threads=max(1, int(self.params.num_cpus))))
        watch = PartWatch(runtime.results_dir)
        slots = self._slots(ray, num_gpus)
        queue = list(cells)
        running: dict = {}  # ref -> (cell, started_at, start, deadline)
        while queue or running:
            while queue and len(running) < slots:
                cell = queue.pop(0)
                ref = task.remote([cell.to_json()], settings)
                start = time.monotonic()
                deadline = None if cell.timeout is None else start + cell.timeout + self.params.start_allowance_s
                running[ref] = (cell, now(), start, deadline)
            deadlines = [d for (_, _, _, d) in running.values() if d is not None]
            wait = self.params.poll_s if not deadlines else max(0.0, min(deadlines) - time.monotonic())
            ready, _ = ray.wait(list(running), num_returns=1, timeout=min(wait, self.params.poll_s))
            for ref in ready:
                cell, started_at, start, _ = running.pop(ref)
                yield self._collect(ray, ref, cell, started_at, start, watch)
            moment = time.monotonic()
            for ref, (cell, started_at, start, deadline) in list(running.items()):
                if deadline is None or moment < deadline:
                    continue
                if ray.wait([ref], timeout=0)[0]:  # it just ended: take its own record
                    continue
                running.pop(ref)
                ray.cancel(ref, force=True)
                record = watch.written_since(cell)
                yield record or failed_record(
                    cell,
                    "timeout",
                    f"killed at the hard limit of {cell.timeout:g} s + {self.params.start_allowance_s:g} s start "
                    "allowance (ray.cancel)",
                    moment - start,
                    started_at,
                )

    @staticmethod
    def _collect(ray, ref, cell, started_at, start, watch):
        from rankbench.api import CellRecord
        from rankbench.runner import failed_record

        try:
            (payload,) = ray.get(ref)
            return CellRecord(**payload)
        except Exception as exc:  # noqa: BLE001 -- the worker died, or Ray could not run the task
            record = watch.written_since(cell)
            if record is not None:
                return record
            name = type(exc).__name__
            status = "oom" if name == "OutOfMemoryError" else "crashed"
            wall = time.monotonic() - start
            return failed_record(cell, status, short(f"{name}: {exc}"), wall, started_at)


@hookimpl
def rankbench_register_executors(register):
    register(RayExecutor)
