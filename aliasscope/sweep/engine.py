"""Where the models of a sweep run: in this process, or as tasks on a Dask distributed cluster.

Why Dask distributed: it installs from PyPI with small pure-Python wheels (about 5 MB with its
dependencies, where Ray's single wheel is over 60 MB: too large for the 64 MiB a GPU job here may
carry), its ``LocalCluster`` starts worker processes on one machine with no set-up, ``dask-cuda``'s
``LocalCUDACluster`` pins one worker per GPU, ``dask-jobqueue`` starts workers as SLURM/PBS jobs, and
any of them is joined by address. The scheduler reschedules a dead worker's task on another worker
(``distributed.scheduler.allowed-failures`` times, then ``KilledWorker``), so a crash or a kill loses
only the model that was running, which is retried.

Each model is one task (:func:`~aliasscope.sweep.measure.measure_model`); its result comes back to the
driver, which writes it to the store as it arrives, so what finished survives the driver too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .measure import ModelResult, SweepSettings, Task, measure_model

__all__ = ["run_tasks", "local_cluster"]


def _failed(task: Task, error: str) -> ModelResult:
    return ModelResult(
        {"requested": task.requested, "model": task.model, "resolution": task.resolution, "status": "failed",
         "error": error}
    )  # fmt: skip


@contextlib.contextmanager
def local_cluster(workers: int, device: str, retries: int) -> Iterator[Any]:
    """A Dask client on a new local cluster: one worker process per GPU (``dask-cuda`` when installed,
    else workers named 0..N-1 that pick ``cuda:<name>``) or per CPU worker, one thread each, no memory
    limit (a model's measurement may need most of the machine), no dashboard."""
    import dask
    from distributed import Client, LocalCluster

    with dask.config.set({"distributed.scheduler.allowed-failures": retries}):
        cluster = None
        if device.startswith("cuda"):
            try:
                from dask_cuda import LocalCUDACluster

                cluster = LocalCUDACluster(n_workers=workers, threads_per_worker=1, memory_limit=0,
                                           dashboard_address=None)  # fmt: skip
            except ImportError:
                cluster = None
        if cluster is None:
            cluster = LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, memory_limit=0,
                dashboard_address=None,
            )  # fmt: skip
        with cluster, Client(cluster) as client:
            yield client


def _client(workers: int | None, address: str | None, device: str, retries: int):
    if address is not None:
        import dask
        from distributed import Client

        @contextlib.contextmanager
        def joined() -> Iterator[Any]:
            with dask.config.set({"distributed.scheduler.allowed-failures": retries}), Client(address) as c:
                yield c

        return joined()
    return local_cluster(int(workers or 1), device, retries)


def run_tasks(
    tasks: Sequence[Task],
    settings: SweepSettings,
    on_result: Callable[[ModelResult], None],
    *,
    workers: int | None = None,
    address: str | None = None,
    retries: int = 2,
    measure: Callable[[Task, SweepSettings], ModelResult] = measure_model,
) -> None:
    """Measure every task and hand each result to ``on_result`` as it finishes: in this process when
    neither ``workers`` nor ``address`` is given, else as Dask tasks on a local cluster of ``workers``
    processes or on the cluster at ``address``. A worker that dies is replaced and its model retried
    on another (``retries`` times); a model whose worker died every time is recorded as failed."""
    if workers is None and address is None:
        for task in tasks:
            on_result(measure(task, settings))
        return
    from distributed import as_completed

    with _client(workers, address, settings.device, retries) as client:
        futures = {
            client.submit(
                measure, task, settings, key=f"aliasscope-sweep-{i}-{task.requested}", pure=False
            ): task
            for i, task in enumerate(tasks)
        }
        for future in as_completed(list(futures)):
            task = futures[future]
            try:
                result = future.result()
            except Exception as exc:  # noqa: BLE001 - KilledWorker and friends: the model's row says so
                name = type(exc).__name__
                result = _failed(
                    task, f"{name}: the worker running this model died {retries + 1} times ({exc})"
                )
            on_result(result)
            future.release()
