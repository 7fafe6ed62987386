"""The work root on S3-compatible object storage, against a real S3-API server process (moto's
standalone server on loopback): the lock (a conditional create), curate's catalog, ingest memo
and stage outputs, pack's shards and manifest, and the latents, written and read back through
the same code as a local work root.

The endpoint and credentials reach s3fs the standard fsspec/boto way (FSSPEC_S3_ENDPOINT_URL,
AWS_* environment variables), as an operator would point the pipeline at MinIO or Ceph."""
from __future__ import annotations

import os
import posixpath
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import fsspec
import pytest

from tasks.store import StageStore, StoreError

MOTO = Path(sys.executable).parent / "moto_server"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server process on loopback and the environment that points s3fs at it; yields a
    function that makes a fresh bucket and returns its s3:// URL."""
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen([str(MOTO), "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                            stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"moto_server did not start on {endpoint}")
            time.sleep(0.3)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "FSSPEC_S3_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    saved_conf = fsspec.config.conf.get("s3")
    fsspec.config.conf["s3"] = {"endpoint_url": endpoint}
    fsspec.filesystem("s3").clear_instance_cache()
    made = []

    def bucket() -> str:
        name = f"acepipe-{len(made)}-{os.getpid()}"
        fsspec.filesystem("s3").mkdir(name)
        made.append(name)
        return f"s3://{name}"

    try:
        yield bucket
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if saved_conf is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = saved_conf


def test_the_lock_on_s3_is_a_conditional_create(s3):
    root = f"{s3()}/work"
    first, second = StageStore(root), StageStore(root)
    assert not first.local
    with first.lock("ingest"):
        with pytest.raises(StoreError, match=r"held by another run \(pid \d+ on "):
            with second.lock("ingest", timeout_s=1.0, poll_s=0.2):
                pass
    with second.lock("ingest", timeout_s=1.0):       # released: the next run takes it
        assert second.exists(second.path(".lock-ingest"))
    assert not first.exists(first.path(".lock-ingest"))


def test_a_lock_left_on_s3_by_a_dead_process_of_this_host_is_broken(s3):
    store = StageStore(f"{s3()}/work")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    store.fs.pipe_file(store.path(".lock-ingest"),
                       f'{{"pid": {dead}, "host": "{socket.gethostname()}", "since": "x"}}'.encode())
    with store.lock("ingest", timeout_s=5.0, poll_s=0.1):
        pass


def test_a_filesystem_without_exclusive_create_fails_loudly(tmp_path, monkeypatch):
    store = StageStore("memory://no-exclusive/work")

    def pipe_file(path, value, **kwargs):
        raise NotImplementedError("mode='create'")

    monkeypatch.setattr(store.fs, "pipe_file", pipe_file)
    with pytest.raises(StoreError, match="cannot create a file only if it is absent"):
        with store.lock("ingest", timeout_s=1.0):
            pass


@pytest.mark.slow
def test_curate_pack_and_latents_on_an_s3_work_root(s3, prefect_harness, synth_corpus, tiny_models_dir):
    import pyarrow.parquet as pq

    from flows.curate import curate
    from flows.latents import latents
    from flows.params import DatasetParams, RunParams
    from tasks.pack import pack, read_manifest
    from tasks.verify import check
    from schemas.config import load_config

    root = f"{s3()}/work"
    overrides = [f"models.tiny_dir={tiny_models_dir}", "stages=[probe,aesthetics]", "device=cpu",
                 "ingest.partition_size=4", "pack.shard_bytes=4000000", "aesthetics.min_pq=null"]
    params = RunParams(config="tiny", work_root=root, sources=[str(synth_corpus / "audio")], overrides=overrides)
    first = curate(params)
    assert first["failed_tasks"] == [] and first["pending"] == 0, first["stages"]
    store = StageStore(root)
    parts = store.catalog_partitions()
    assert len(parts) >= 2 and store.exists(store.path("catalog", "seen.parquet"))
    for stage in ("probe", "aesthetics"):
        keys = store.listdir(store.path("stages", stage))
        assert len(keys) == 1 and len(store.glob_partitions(store.path("stages", stage, keys[0]))) == len(parts)
    assert store.listdir(store.root) and not any(n.startswith(".lock-") for n in store.listdir(store.root))

    again = curate(params)                       # the memo and the outputs are read back from S3
    assert again["new_partitions"] == 0 and again["failed_tasks"] == []

    cfg = load_config("tiny", [f"work_root={root}", *overrides], environ={})
    packed = pack(cfg, "default")
    assert packed["shards"] >= 1
    manifest = read_manifest(store, "default")
    ids = set(manifest.column("track_id").to_pylist())
    assert ids and {r["track_id"] for r in pq.read_table(
        store.fs.open(store.path("shards", "default", "index.parquet"), "rb")).to_pylist()} == ids

    done = latents(DatasetParams(config="tiny", work_root=root, overrides=overrides, dataset="default"))
    index = store.read_table(store.path("latents", "default", "index.parquet"))
    assert set(index.column("track_id").to_pylist()) == ids and done["rejected"] == 0
    found = check(store, cfg)                     # acepipe verify: every output reads to its checksums
    assert found.checked > len(parts) and found.problems == [], [(p.path, p.what) for p in found.problems]

    # An increment on S3: a corrected caption packs that track again into a new shard; the other
    # objects stay as they were, and a rerun with nothing new only lists.
    from tasks.overrides import set_override

    shard_dir = store.path("shards", "default")
    objects = {n: store.fs.info(posixpath.join(shard_dir, n))["ETag"] for n in store.listdir(shard_dir)
               if n.startswith("shard-")}
    changed = sorted(ids)[0]
    set_override(store, "default", changed, "caption", "a corrected caption", who="test")
    again = pack(cfg, "default")
    assert again["mode"] == "append" and again["appended"] == 1 and again["removed_now"] == 1
    assert {n: store.fs.info(posixpath.join(shard_dir, n))["ETag"] for n in objects} == objects
    assert pack(cfg, "default")["mode"] == "skip"
    encoded = latents(DatasetParams(config="tiny", work_root=root, overrides=overrides, dataset="default"))
    assert encoded["shards_run"] == 1 and encoded["tracks"] == len(ids)
