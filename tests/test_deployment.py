"""A real deployment end to end: Prefect server on loopback (SQLite in a temp home), a
process work pool, `prefect deploy`, a process worker, `prefect deployment run`.

Everything the test starts is stopped by PID. The server test is marked slow: it runs in CI
(`make test`) and is skipped by `make test-fast`.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parent.parent
PREFECT = str(Path(sys.executable).parent / "prefect")


def test_every_deployments_parameters_validate_and_are_explicit():
    """prefect.yaml's parameters go through the flow's own parameter model (a typo would fail
    the scheduled run at 02:00, not here); the nightly schedule spells out every field."""
    import yaml

    from flows.export import ExportParams
    from flows.params import DatasetParams, PackParams, RunParams
    from flows.pipeline import PipelineParams
    from flows.train import TrainParams

    models = {"flows/curate.py:curate": RunParams, "flows/pack.py:pack": PackParams,
              "flows/export.py:export": ExportParams,
              "flows/latents.py:latents": DatasetParams, "flows/train.py:train": TrainParams,
              "flows/pipeline.py:pipeline": PipelineParams}
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    for deployment in spec["deployments"]:
        models[deployment["entrypoint"]].model_validate(deployment["parameters"]["params"])
    nightly = next(d for d in spec["deployments"] if d["name"] == "nightly")
    assert set(nightly["parameters"]["params"]) == set(RunParams.model_fields)
    assert nightly["work_pool"]["job_variables"]["env"]["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(url: str, path: str, body: dict | None = None):
    req = urllib.request.Request(url + path, method="POST" if body is not None else "GET",
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read() or b"null")


@pytest.fixture
def prefect_server(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": url,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PWD": str(REPO),
           "PREFECT_SERVER_API_HOST": "127.0.0.1"}
    env.pop("PREFECT_API_KEY", None)
    procs: list[subprocess.Popen] = []
    log = open(tmp_path / "server.log", "wb")
    procs.append(subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                  env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True))
    deadline = time.monotonic() + 120
    while True:
        try:
            api(url, "/health")
            break
        except OSError:
            if time.monotonic() > deadline or procs[0].poll() is not None:
                pytest.fail("prefect server did not start: " + (tmp_path / "server.log").read_text()[-2000:])
            time.sleep(1)
    yield url, env, procs
    for p in procs:  # stop everything this test started, by PID (process group)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
    log.close()


def run(cmd: list[str], env: dict, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_deployment_runs_on_a_real_server(prefect_server, synth_corpus, tmp_path):
    url, env, procs = prefect_server
    out = run([PREFECT, "work-pool", "create", "acepipe-process", "--type", "process"], env)
    assert out.returncode == 0, out.stderr
    out = run([PREFECT, "--no-prompt", "deploy", "--all"], env, timeout=300)   # as the README says
    assert out.returncode == 0, out.stdout + out.stderr
    deployments = api(url, "/deployments/filter", {})
    flows_by_id = {f["id"]: f["name"] for f in api(url, "/flows/filter", {})}
    names = {f"{flows_by_id[d['flow_id']]}/{d['name']}" for d in deployments}
    assert names == {"curate/nightly", "pack/default", "latents/default", "train/default", "pipeline/full",
                     "export/default"}
    nightly = next(d for d in deployments if d["name"] == "nightly")
    assert nightly["schedules"] and nightly["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
    form = next(d for d in deployments if d["name"] == "full")["parameter_openapi_schema"]
    assert "params" in form["properties"]          # the UI's run form comes from the pydantic model
    worker_log = open(tmp_path / "worker.log", "wb")
    procs.append(subprocess.Popen([PREFECT, "worker", "start", "--pool", "acepipe-process"], env=env,
                                  cwd=REPO, stdout=worker_log, stderr=subprocess.STDOUT,
                                  start_new_session=True))

    # A wrong parameter is refused with the field named, before anything runs.
    bad = run([PREFECT, "deployment", "run", "curate/nightly", "--param",
               'params={"config": "tiny", "bogus": 1}'], env)
    assert bad.returncode != 0 and "bogus" in bad.stdout + bad.stderr

    work = tmp_path / "work"
    params = {"config": "tiny", "work_root": str(work), "sources": [str(synth_corpus / "audio")],
              "overrides": ["stages=[probe]"]}
    out = run([PREFECT, "deployment", "run", "curate/nightly", "--param", f"params={json.dumps(params)}",
               "--watch", "--watch-timeout", "600"], env, timeout=660)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:] + (tmp_path / "worker.log").read_text()[-3000:]

    runs = api(url, "/flow_runs/filter", {"flow_runs": {"deployment_id": {"is_null_": False}}})
    finished = [r for r in runs if r["state_type"] == "COMPLETED"]
    assert finished, [r["state_type"] for r in runs]
    catalog = sorted((work / "catalog").glob("part-*.parquet"))
    assert catalog and sum(pq.read_metadata(p).num_rows for p in catalog) > 0
    assert list((work / "stages" / "probe").glob("*/part-*.parquet"))
