"""Executor ``submitit``: cells run as SLURM jobs (a job array), or as local jobs with submitit's local executor.

Each job runs ``cells_per_job`` cells (default 1: every cell its own job) of one task configuration, one after
another in one process, and writes each cell's part files into the results folder itself the moment it ends
(``rankbench_plugins.executors._remote``): results survive a ``bench`` host that dies, and a re-run with any
executor resumes from them; the host only acknowledges them. On SLURM the results folder and the job folder must
be on a file system the nodes share, and the nodes need the same environment (rankbench, the plugins, a
``--plugins-dir`` path).

``cells_per_job`` is the set-up trade-off: a job loads the plugins and sets up its task configuration (a model,
its statistics) once for all its cells, so one cell per job repeats that work for every cell (and pays a process
start and a scheduler round trip), while big jobs parallelise less and retry more at once. A suite of many small
cells wants dozens of cells per job; a suite of few large ones (LLMs) one cell per job.

Time limits: inside the job each cell stops at its limit (SIGALRM, like ``inprocess``: exact for Python code). A
job's hard limit is the sum of its cells' limits plus ``start_allowance_s`` (rounded up to minutes for SLURM, or
``timeout_min``): SLURM kills the job there (state TIMEOUT); on ``local`` the host cancels it at that moment. The
cell that was running becomes ``timeout``, a job that dies otherwise (segfault, ``os._exit``, SIGKILL, OOM) makes
it ``crashed`` (``oom`` for SLURM's OUT_OF_MEMORY) with submitit's message, which quotes the job's log; the job's
cells that had finished keep their records, and the ones it had not reached go into a fresh job.
``cluster: debug`` runs jobs in the ``bench`` process (no isolation, no hard limit): for debugging only.

Job files (pickles, logs) go to ``folder`` (default ``RESULTS/submitit/``), one sub-folder per run; the files of a
job whose cells all ended ``ok``/``skipped`` are removed unless ``keep_job_files``.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from rankbench import Executor, PluginParams, hookimpl
from rankbench.api import CellRecord
from rankbench_plugins.executors._remote import PartWatch, job_settings, run_job, short

NO_LIMIT_MIN = 60 * 24 * 365  # the local controller's limit when the cells have none (submitit's default is 2 min)


class _Job:
    def __init__(self, job, cells, limit_s: float | None, submitted: float, started_at: str):
        self.job, self.cells, self.limit_s, self.submitted, self.started_at = job, cells, limit_s, submitted, started_at
        self.cancelled = False


class SubmititExecutor(Executor):
    name = "submitit"
    description = "run cells as SLURM jobs (job array) or local submitit jobs; jobs write their own part files"
    jobs_write_results = True

    class Params(PluginParams):
        cluster: Literal["slurm", "local", "debug"] | None = Field(
            default=None, description="None: SLURM where srun is found, else local; debug: jobs in the bench process"
        )
        folder: str | None = Field(
            default=None, description="job files and logs; None: RESULTS/submitit (the cache folder without one)"
        )
        slurm_partition: str | None = Field(default=None, description="SLURM partition")
        timeout_min: int | None = Field(
            default=None, ge=1, description="a job's limit; None: the sum of its cells' limits + start_allowance_s"
        )
        cpus_per_task: int = Field(default=1, ge=1, description="CPUs per job (its torch threads unless --threads)")
        gpus_per_node: int | None = Field(default=None, ge=0, description="GPUs per job; None: 1 on cuda, else 0")
        mem_gb: float | None = Field(default=None, gt=0, description="memory per job (SLURM --mem)")
        array_parallelism: int | None = Field(
            default=None, ge=1, description="jobs running at once; None: 256 on SLURM, CPUs // cpus_per_task locally"
        )
        slurm_additional_parameters: dict[str, Any] = Field(
            default_factory=dict, description="more sbatch options, e.g. {qos: high, account: proj}"
        )
        cells_per_job: int = Field(
            default=1, ge=1, description="cells of one task configuration per job (they share its set-up)"
        )
        start_allowance_s: float = Field(
            default=60.0, ge=0, description="added to a job's limit for its start (interpreter, imports, plugins)"
        )
        poll_s: float | None = Field(default=None, gt=0, description="check interval; None: 0.05 local, 10 SLURM")
        keep_job_files: bool = Field(default=False, description="keep the files of jobs whose cells all ended ok")

    def run(self, cells, runtime):
        from rankbench.runner import cache_root

        if not cells:
            return
        import submitit

        base = self.params.folder or (
            str(Path(runtime.results_dir) / "submitit") if runtime.results_dir else str(cache_root() / "submitit")
        )
        run_folder = Path(base) / f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        executor = submitit.AutoExecutor(folder=str(run_folder / "%j"), cluster=self.params.cluster)
        cluster = executor.cluster
        gpus = self.params.gpus_per_node
        if gpus is None:
            gpus = 1 if str(runtime.device).startswith("cuda") else 0
        parameters = {
            "name": f"rankbench-{cells[0].suite}",
            "cpus_per_task": self.params.cpus_per_task,
            "gpus_per_node": gpus,
            "mem_gb": self.params.mem_gb,
            "slurm_partition": self.params.slurm_partition,
            "slurm_array_parallelism": self.params.array_parallelism or 256,
            "slurm_additional_parameters": dict(self.params.slurm_additional_parameters) or None,
        }
        executor.update_parameters(**{k: v for k, v in parameters.items() if v is not None})
        settings = job_settings(runtime, threads=self.params.cpus_per_task)
        watch = PartWatch(runtime.results_dir)
        # without a results folder a dead job's finished cells cannot be told apart: one cell per job
        size = self.params.cells_per_job if runtime.results_dir else 1
        groups = _groups(cells, size)
        if cluster == "slurm":
            parallel = len(groups)  # SLURM queues them; array_parallelism bounds how many run
        elif cluster == "debug":
            parallel = 1
        else:
            parallel = self.params.array_parallelism or max(1, (os.cpu_count() or 1) // self.params.cpus_per_task)
        poll = self.params.poll_s or (10.0 if cluster == "slurm" else 0.05)
        running: list[_Job] = []
        try:
            yield from self._loop(executor, cluster, groups, running, parallel, poll, settings, watch)
        finally:
            for job in running:  # the host is stopping (Ctrl-C): local jobs die with it, SLURM jobs go on
                if cluster != "slurm":
                    job.job.cancel(check=False)
            for folder in (run_folder / "%j", run_folder):  # submitit leaves an empty template folder
                try:
                    folder.rmdir()
                except OSError:
                    pass

    def _loop(self, executor, cluster, groups, running, parallel, poll, settings, watch):
        from rankbench.runner import failed_record

        while groups or running:
            if groups and len(running) < parallel:
                batch, groups = groups[: parallel - len(running)], groups[parallel - len(running) :]
                try:
                    running.extend(self._submit(executor, cluster, batch, settings))
                except Exception as exc:  # noqa: BLE001 -- sbatch refused (partition, account, ...): no job ran
                    reason = short(f"submitit could not submit the job: {type(exc).__name__}: {exc}")
                    yield from (failed_record(cell, "crashed", reason) for group in batch for cell in group)
                    continue
            finished = [job for job in running if self._ended(job, cluster)]
            for job in finished:
                running.remove(job)
                records, rest = self._collect(job, cluster, watch)
                yield from records
                if rest:
                    groups.insert(0, rest)  # the cells a dead job never reached: a fresh job
            if not finished:
                time.sleep(poll)

    # -- submission -------------------------------------------------------------------------------------------

    def _limit_s(self, cells) -> float | None:
        if self.params.timeout_min is not None:
            return 60.0 * self.params.timeout_min
        if any(c.timeout is None for c in cells):
            return None
        return sum(c.timeout for c in cells) + self.params.start_allowance_s

    def _submit(self, executor, cluster: str, groups, settings) -> list[_Job]:
        from rankbench.runner import now

        limits = [self._limit_s(group) for group in groups]
        if cluster == "slurm":
            if all(limit is not None for limit in limits):
                executor.update_parameters(timeout_min=max(1, math.ceil(max(limits) / 60)))
            with executor.batch():  # one job array
                jobs = [executor.submit(run_job, [c.to_json() for c in group], settings) for group in groups]
        else:
            jobs = []
            for group, limit in zip(groups, limits):
                # the local controller's own limit is only a backstop: the host cancels at the exact limit
                minutes = NO_LIMIT_MIN if limit is None else math.ceil(limit / 60) + 1
                executor.update_parameters(timeout_min=minutes)
                jobs.append(executor.submit(run_job, [c.to_json() for c in group], settings))
        moment, started_at = time.monotonic(), now()
        return [_Job(job, group, limit, moment, started_at) for job, group, limit in zip(jobs, groups, limits)]

    # -- watching -----------------------------------------------------------------------------------------------

    def _ended(self, job: _Job, cluster: str) -> bool:
        if job.job.done():
            return True
        if cluster == "local" and job.limit_s is not None and time.monotonic() - job.submitted > job.limit_s:
            job.job.cancel(check=False)  # SIGINT to the controller, which kills the job's process
            job.cancelled = True
            deadline = time.monotonic() + 10
            while not job.job.done() and time.monotonic() < deadline:
                time.sleep(0.05)
            return True
        return False

    def _collect(self, job: _Job, cluster: str, watch: PartWatch) -> tuple[list[CellRecord], list]:
        error = None
        if not job.cancelled and cluster == "local" and not job.job.paths.result_pickle.exists():
            # a local job that ended without a result: no network file system to wait for (submitit waits 15 s)
            log = (job.job.stderr() or "").strip()
            detail = f": {log}" if log else ""
            error = RuntimeError(f"the job ended without a result (submitit state {job.job.state}){detail}")
        elif not job.cancelled:
            try:
                payloads = job.job.result()
            except Exception as exc:  # noqa: BLE001 -- the job died, was killed, or could not start
                error = exc
            else:
                records = [CellRecord(**payload) for payload in payloads]
                self._clean(job, records)
                return records, []
        records, rest, dead = [], [], False
        for cell in job.cells:  # a job runs its cells in order: the first one not on disk is the one it died in
            record = watch.written_since(cell)
            if record is not None:
                records.append(record)
            elif not dead:
                records.append(self._dead_record(job, cluster, cell, error))
                dead = True
            else:
                rest.append(cell)
        return records, rest

    def _dead_record(self, job: _Job, cluster: str, cell, error) -> CellRecord:
        from rankbench.runner import failed_record

        wall = time.monotonic() - job.submitted
        state = ""
        if cluster == "slurm":
            try:
                state = str(job.job.state)
            except Exception:  # noqa: BLE001
                state = ""
        where = f"submitit job {job.job.job_id}"
        if job.cancelled:
            return failed_record(
                cell, "timeout",
                f"{where} cancelled at its hard limit of {job.limit_s:g} s (cells' limits + start allowance)",
                wall, job.started_at,
            )
        message = short(f"{type(error).__name__}: {error}") if error is not None else "no result"
        if state.startswith("TIMEOUT"):
            reason = f"{where} reached its SLURM time limit: {message}"
            return failed_record(cell, "timeout", reason, wall, job.started_at)
        status = "oom" if state.startswith("OUT_OF_MEMORY") else "crashed"
        detail = f" (state {state})" if state else ""
        return failed_record(cell, status, f"{where} died{detail}: {message}", wall, job.started_at)

    def _clean(self, job: _Job, records: list[CellRecord]) -> None:
        if self.params.keep_job_files or any(r.status not in ("ok", "skipped") for r in records):
            return
        try:
            folder = job.job.paths.folder
            if folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)
        except Exception:  # noqa: BLE001 -- tidying only
            pass


def _groups(cells, size: int) -> list[list]:
    """Consecutive chunks of at most ``size`` cells of one task configuration (cells keep their order)."""
    by_task: dict[str, list] = {}
    for cell in cells:
        by_task.setdefault(cell.task_key, []).append(cell)
    return [group[i : i + size] for group in by_task.values() for i in range(0, len(group), size)]


@hookimpl
def rankbench_register_executors(register):
    register(SubmititExecutor)
