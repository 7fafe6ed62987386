"""The task runner and GPU cap are configuration: threads/Dask/Ray runners, the `gpu` tag limit."""
from __future__ import annotations

import pytest
from prefect.task_runners import ThreadPoolTaskRunner

from flows.runners import ensure_gpu_limit, gpu_tag, task_runner_for
from schemas.config import RunnerConfig


def test_threads_by_default_with_the_configured_workers():
    runner = task_runner_for(RunnerConfig(max_workers=3))
    assert isinstance(runner, ThreadPoolTaskRunner) and runner._max_workers == 3


def test_dask_runner_takes_an_existing_cluster_address():
    from prefect_dask import DaskTaskRunner

    runner = task_runner_for(RunnerConfig(kind="dask", address="tcp://10.0.0.1:8786"))
    assert isinstance(runner, DaskTaskRunner) and runner.address == "tcp://10.0.0.1:8786"


def test_an_unknown_runner_kind_is_a_config_error():
    with pytest.raises(ValueError, match="kind"):
        RunnerConfig(kind="celery")


def test_only_model_stages_on_cuda_take_the_gpu_tag():
    assert gpu_tag(False, "auto") == "cpu"
    assert gpu_tag(True, "cpu") == "cpu"
    import torch

    assert gpu_tag(True, "auto") == ("gpu" if torch.cuda.is_available() else "cpu")


def test_gpu_limit_is_created_once_and_an_operators_value_wins(prefect_harness):
    from prefect.client.orchestration import get_client

    tag = "gpu-test-limit"
    assert ensure_gpu_limit(2, tag) == 2
    with get_client(sync_client=True) as client:
        assert client.read_concurrency_limit_by_tag(tag).concurrency_limit == 2
        client.delete_concurrency_limit_by_tag(tag)
        client.create_concurrency_limit(tag=tag, concurrency_limit=5)
    assert ensure_gpu_limit(1, tag) == 5      # the existing limit is left as the operator set it


def test_only_transient_faults_are_retried():
    from prefect.states import Failed

    from flows.runners import retry_only_transient
    from tasks.models import ModelLoadError
    from tasks.stage import TransientError

    def retried(exc: Exception) -> bool:
        return retry_only_transient(None, None, Failed(data=exc))

    assert retried(TransientError("caption server answered HTTP 503"))
    assert retried(TimeoutError("read timed out")) and retried(ConnectionError("refused"))
    assert not retried(ModelLoadError("rhythm.checkpoint='final0': no local file and the download failed"))
    assert not retried(ValueError("a bug"))


def test_importing_flows_gives_prefects_first_start_time_to_migrate():
    """A fresh Prefect home's first ephemeral start migrates SQLite for longer than Prefect's 20 s
    default on 2 cores; every entry point imports `flows` first, which raises the limit unless an
    operator has set one."""
    import os
    import subprocess
    import sys

    code = ("import flows, prefect.settings as s; "
            "print(s.PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout) >= 300
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "45"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout) == 45
