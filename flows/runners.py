"""The task runner is configuration: threads by default, Dask or Ray against a cluster."""
from __future__ import annotations

from prefect.task_runners import ThreadPoolTaskRunner

from schemas.config import RunnerConfig


def task_runner_for(runner: RunnerConfig):
    if runner.kind == "threads":
        return ThreadPoolTaskRunner(max_workers=runner.max_workers)
    if runner.kind == "dask":
        from prefect_dask import DaskTaskRunner

        if runner.address:
            return DaskTaskRunner(address=runner.address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": runner.max_workers,
                                              "threads_per_worker": 1, "processes": True})
    if runner.kind == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError:
            raise RuntimeError("runner.kind=ray needs the ray extra: pip install -e '.[ray]'") from None
        return RayTaskRunner(address=runner.address) if runner.address else RayTaskRunner()
    raise ValueError(f"runner.kind {runner.kind!r} is not one of threads, dask, ray")
