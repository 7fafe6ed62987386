"""The task runner is configuration: threads by default, Dask or Ray against a cluster."""
from __future__ import annotations

from prefect.task_runners import ThreadPoolTaskRunner

from schemas.config import ConfigError, RunnerConfig


def task_runner_for(runner: RunnerConfig):
    """The configured task runner, built (not started). Flows and the CLI build it before any work,
    so a runner that cannot exist here (ray without its extra) fails in one line, up front."""
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
            raise ConfigError("runner.kind=ray needs the ray extra: pip install -e '.[ray]'") from None
        return RayTaskRunner(address=runner.address) if runner.address else RayTaskRunner()
    raise ValueError(f"runner.kind {runner.kind!r} is not one of threads, dask, ray")


def gpu_tag(uses_gpu: bool, device: str) -> str:
    """The tag of a stage task: `gpu` when it runs a model on CUDA (capped by the tag's
    concurrency limit), else `cpu` (bounded by the runner's workers only)."""
    if not uses_gpu:
        return "cpu"
    from tasks.models import resolve_device

    return "gpu" if resolve_device(device).type == "cuda" else "cpu"


def ensure_gpu_limit(limit: int, tag: str = "gpu") -> int:
    """Create the tag concurrency limit that caps GPU stage tasks across every run and worker,
    unless one exists (an operator's `prefect concurrency-limit create gpu N` wins).
    Returns the limit in force."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_concurrency_limit_by_tag(tag).concurrency_limit
        except ObjectNotFound:
            client.create_concurrency_limit(tag=tag, concurrency_limit=limit)
            return limit


def retry_only_transient(task, task_run, state) -> bool:
    """Prefect retry condition: retry only faults that may pass (a model server timing out,
    storage I/O); a missing checkpoint or a bug fails the same way every time."""
    from tasks.stage import TransientError

    exc = state.result(raise_on_failure=False)
    return isinstance(exc, (TransientError, ConnectionError, TimeoutError))
