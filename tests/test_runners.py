"""The task runner and GPU cap are configuration: threads/Dask/Ray runners, the `gpu` tag limit."""
from __future__ import annotations

import sys
import tomllib
import types
from pathlib import Path

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


def test_ray_without_its_extra_fails_in_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "prefect_ray", None)   # what an environment without the extra has
    from schemas.config import ConfigError

    with pytest.raises(ConfigError) as caught:
        task_runner_for(RunnerConfig(kind="ray", address="ray://head:10001"))
    assert str(caught.value) == "runner.kind=ray needs the ray extra: pip install -e '.[ray]'"
    assert caught.value.__suppress_context__      # no ImportError traceback printed above it
    # the extra the message names exists and brings the Ray task runner
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert any(r.startswith("prefect-ray") for r in pyproject["project"]["optional-dependencies"]["ray"])


def test_a_run_with_a_runner_that_cannot_exist_stops_before_any_work(monkeypatch, synth_corpus, tmp_path, capsys):
    """acepipe run with runner.kind=ray and no ray: one error line, exit 2, nothing ingested."""
    from flows.cli import main

    monkeypatch.setitem(sys.modules, "prefect_ray", None)
    work = tmp_path / "work"
    rc = main(["run", "--config", "tiny", "--source", str(synth_corpus / "audio"), "--work", str(work),
               "--set", "runner.kind=ray"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["acepipe: error: runner.kind=ray needs the ray extra: pip install -e '.[ray]'"]
    assert not list(work.rglob("*.parquet"))


def test_ray_runner_joins_the_configured_cluster_or_starts_its_own(monkeypatch):
    """prefect_ray stubbed: RayTaskRunner records what it was built with."""
    from schemas.config import load_config

    built = []

    class RayTaskRunner:
        def __init__(self, *args, **kwargs):
            built.append((args, kwargs))

    stub = types.ModuleType("prefect_ray")
    stub.RayTaskRunner = RayTaskRunner
    monkeypatch.setitem(sys.modules, "prefect_ray", stub)
    cfg = load_config("tiny", ["runner.kind=ray", "runner.address=ray://head:10001", "runner.max_workers=7"],
                      environ={})
    assert isinstance(task_runner_for(cfg.runner), RayTaskRunner)
    assert built == [((), {"address": "ray://head:10001"})]
    # no address: Ray's default (a local Ray); max_workers sizes threads and local Dask only
    task_runner_for(RunnerConfig(kind="ray", max_workers=7))
    assert built[1] == ((), {})


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
