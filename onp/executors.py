"""Run independent tasks sequentially, in local processes, or as Ray tasks.

Every executor has one method, :meth:`Executor.run`, which takes a picklable top-level function and
a list of picklable tasks and yields ``(task, result)`` pairs as tasks finish (in completion order
for the parallel executors). The function is expected to catch its own errors and return them in
the result; an exception that escapes it is re-raised in the caller.

* ``local``: one after the other in this process (the default).
* ``processes``: ``jobs`` worker processes (``concurrent.futures.ProcessPoolExecutor``, spawn
  start method); torch in each worker uses ``cpu_count // jobs`` threads.
* ``ray``: each task is a Ray task (``num_cpus=1``, and ``num_gpus=1`` when the cluster has GPUs and
  the task uses one: ``gpu_task(task)``, all tasks by default).
  ``address`` connects to a running cluster (``"auto"`` or ``ray://host:10001``); by default a local
  Ray instance is started. On a multi-node cluster the artifact cache and the output folder must be
  on a filesystem every node sees.

>>> ex = make_executor("local")
>>> [r for _, r in ex.run(abs, [-1, 2])]
[1, 2]
"""

from __future__ import annotations

import multiprocessing
import os
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

EXECUTORS = ("local", "processes", "ray")


class Executor:
    name = "base"

    def run(
        self, fn: Callable[[Any], Any], tasks: Sequence[Any], gpu_task: Optional[Callable[[Any], bool]] = None
    ) -> Iterator[Tuple[Any, Any]]:
        """Yield ``(task, fn(task))`` as tasks finish. ``gpu_task(task)`` says whether a task uses a
        GPU; only the Ray executor reserves GPUs, the others ignore it."""
        raise NotImplementedError

    def close(self) -> None:
        """Release resources (worker pools, a Ray instance this executor started)."""

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalExecutor(Executor):
    """Sequential, in this process."""

    name = "local"

    def run(
        self, fn: Callable[[Any], Any], tasks: Sequence[Any], gpu_task: Optional[Callable[[Any], bool]] = None
    ) -> Iterator[Tuple[Any, Any]]:
        for task in tasks:
            yield task, fn(task)


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))


class ProcessExecutor(Executor):
    """``jobs`` local worker processes (spawn), results in completion order."""

    name = "processes"

    def __init__(self, jobs: int = 2, threads_per_job: Optional[int] = None):
        if jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {jobs}")
        self.jobs = jobs
        self.threads = threads_per_job or max(1, (os.cpu_count() or 1) // jobs)

    def run(
        self, fn: Callable[[Any], Any], tasks: Sequence[Any], gpu_task: Optional[Callable[[Any], bool]] = None
    ) -> Iterator[Tuple[Any, Any]]:
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        tasks = list(tasks)
        if not tasks:
            return
        pool = ProcessPoolExecutor(
            max_workers=min(self.jobs, len(tasks)),
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(self.threads,),
        )
        futures: Dict[Any, Any] = {}
        try:
            futures = {pool.submit(fn, t): t for t in tasks}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    yield futures[fut], fut.result()
        finally:
            for fut in futures:
                fut.cancel()
            pool.shutdown(wait=True, cancel_futures=True)


def ray_available() -> bool:
    try:
        import ray  # noqa: F401

        return True
    except ImportError:
        return False


class RayExecutor(Executor):
    """One Ray task per item. Requests ``num_gpus=1`` per task when the cluster has GPUs."""

    name = "ray"

    def __init__(
        self,
        address: Optional[str] = None,
        num_cpus: Optional[int] = None,
        gpus_per_task: Optional[float] = None,
        init_kwargs: Optional[Dict[str, Any]] = None,
    ):
        try:
            import ray
        except ImportError as exc:
            raise ValueError(
                "--executor ray needs Ray: pip install 'onp[ray]' (or pip install 'ray[default]')"
            ) from exc
        self.ray = ray
        self._started = False
        if not ray.is_initialized():
            kwargs: Dict[str, Any] = {"include_dashboard": False, "log_to_driver": True, "ignore_reinit_error": True}
            if address:
                kwargs["address"] = address
            elif num_cpus is not None:
                kwargs["num_cpus"] = num_cpus
            kwargs.update(init_kwargs or {})
            ray.init(**kwargs)
            self._started = True
        if gpus_per_task is None:
            gpus_per_task = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        self.gpus_per_task = gpus_per_task

    def run(
        self, fn: Callable[[Any], Any], tasks: Sequence[Any], gpu_task: Optional[Callable[[Any], bool]] = None
    ) -> Iterator[Tuple[Any, Any]]:
        """Like :meth:`Executor.run`; ``gpu_task(task)`` says whether a task uses a GPU (default: all do).
        A task that does not use one requests none, so it never holds a GPU idle."""
        ray = self.ray
        tasks = list(tasks)
        if not tasks:
            return
        remotes: Dict[float, Any] = {}

        def submit(task: Any) -> Any:
            gpus = self.gpus_per_task if gpu_task is None or gpu_task(task) else 0.0
            if gpus not in remotes:
                remotes[gpus] = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=0)(fn)
            return remotes[gpus].remote(task)

        refs = {submit(t): t for t in tasks}
        pending: List[Any] = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    yield refs[ref], ray.get(ref)
        finally:
            for ref in pending:
                try:
                    ray.cancel(ref, force=True)
                except Exception:
                    pass

    def close(self) -> None:
        if self._started and self.ray.is_initialized():
            self.ray.shutdown()
            self._started = False


def make_executor(
    name: str = "local",
    *,
    jobs: int = 1,
    ray_address: Optional[str] = None,
    ray_num_cpus: Optional[int] = None,
    ray_init_kwargs: Optional[Dict[str, Any]] = None,
) -> Executor:
    """``local`` (``jobs > 1`` turns it into ``processes``), ``processes`` or ``ray``."""
    if name not in EXECUTORS:
        raise ValueError(f"unknown executor {name!r}; valid choices: {', '.join(EXECUTORS)}")
    if name == "ray":
        return RayExecutor(ray_address, num_cpus=ray_num_cpus, init_kwargs=ray_init_kwargs)
    if name == "processes" or jobs > 1:
        return ProcessExecutor(max(1, jobs))
    return LocalExecutor()
