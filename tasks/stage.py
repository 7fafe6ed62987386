"""The stage contract, stage keys, and the runner that applies one stage to one partition.

A stage (one module in tasks/) declares `name`, `version`, `inputs` (upstream stage
names; the catalog is implicit), its output `schema`, and implements `setup()` (load
models, once per worker process) and `process(tracks) -> rows` over the kept tracks of
a partition. The runner here owns everything else: the stage key, skip-if-present,
one-bad-track isolation, and the atomic write. Stages never see Prefect or the store.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import threading
import time
import traceback
from collections import Counter
from typing import Any, ClassVar

import pyarrow as pa

from schemas.common import STATUS_ERROR, STATUS_OK, STATUS_REJECTED, reason_code
from schemas.config import Config, section_dump
from tasks.store import StageStore

# name -> module holding `STAGE` (or "module:Class"); imported lazily so the flow does not import every model.
STAGE_MODULES = {
    "probe": "tasks.probe",
    "aesthetics": "tasks.aesthetics",
    "transcribe": "tasks.transcribe",
    "lyrics": "tasks.lyrics",
    "rhythm": "tasks.rhythm",
    "caption": "tasks.caption",
}


class TransientError(RuntimeError):
    """Raise from a stage for failures worth retrying (a model server timing out):
    it fails the partition's task so Prefect retries it with back-off."""


class Stage:
    name: ClassVar[str]
    version: ClassVar[str]
    inputs: ClassVar[tuple[str, ...]] = ()
    schema: ClassVar[pa.Schema]
    uses_gpu: ClassVar[bool] = False

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def fingerprint(self) -> dict[str, Any]:
        """The config that changes this stage's output: hashed into its key."""
        section = getattr(self.cfg, self.name, None)
        return {"section": section_dump(section) if section is not None else None,
                "audio": section_dump(self.cfg.audio)}

    @classmethod
    def check(cls, cfg: Config) -> None:
        """Raise ValueError naming what is missing (a database, a checkpoint path) before any
        work starts. Called by the flow once per run; cheap."""

    def setup(self) -> None:
        """Load models. Called once per worker process, before the first partition."""

    def process(self, tracks: list[dict]) -> list[dict]:
        """One output row per input track: track_id, status, reason and the stage's fields."""
        raise NotImplementedError


def stage_class(name: str) -> type[Stage]:
    if name not in STAGE_MODULES:
        raise KeyError(f"unknown stage {name!r}; known: {', '.join(STAGE_MODULES)}")
    module, _, attr = STAGE_MODULES[name].partition(":")
    return getattr(importlib.import_module(module), attr or "STAGE")


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_keys(cfg: Config, names: list[str] | None = None) -> dict[str, str]:
    """key = hash(stage version, stage config, upstream keys), for each stage and its inputs."""
    keys: dict[str, str] = {}

    def key_of(name: str, seen: tuple[str, ...] = ()) -> str:
        if name in keys:
            return keys[name]
        if name in seen:
            raise ValueError(f"stage dependency cycle: {' -> '.join(seen + (name,))}")
        cls = stage_class(name)
        upstream = {u: key_of(u, seen + (name,)) for u in cls.inputs}
        keys[name] = _hash({"name": name, "version": cls.version,
                            "config": cls(cfg).fingerprint(), "upstream": upstream})
        return keys[name]

    for name in names if names is not None else cfg.stages:
        key_of(name)
    return keys


def check_stages(cfg: Config, names: list[str]) -> None:
    for name in names:
        stage_class(name).check(cfg)


def dag_order(names: list[str]) -> list[str]:
    """The stages and everything they need, upstream first."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        for up in stage_class(name).inputs:
            visit(up)
        order.append(name)

    for name in names:
        visit(name)
    return order


# One instance per (stage, config) per process: models load once per worker, not per partition.
_INSTANCES: dict[tuple[str, str], Stage] = {}
_INSTANCE_LOCK = threading.Lock()
_RUN_LOCKS: dict[tuple[str, str], threading.Lock] = {}


def get_stage(name: str, cfg: Config, key: str) -> tuple[Stage, threading.Lock]:
    ident = (name, key)
    with _INSTANCE_LOCK:
        if ident not in _INSTANCES:
            stage = stage_class(name)(cfg)
            stage.setup()
            _INSTANCES[ident] = stage
            _RUN_LOCKS[ident] = threading.Lock()
        return _INSTANCES[ident], _RUN_LOCKS[ident]


def _error_row(track_id: str, exc: BaseException) -> dict:
    return {"track_id": track_id, "status": STATUS_ERROR,
            "reason": f"exception: {type(exc).__name__}: {str(exc)[:300]}"}


def _process_isolated(stage: Stage, tracks: list[dict]) -> list[dict]:
    """Run the batch; if it raises, run track by track so one bad track fails alone."""
    try:
        return stage.process(tracks)
    except TransientError:
        raise
    except Exception:  # noqa: BLE001 - retried per track below
        rows = []
        for track in tracks:
            try:
                rows.extend(stage.process([track]))
            except TransientError:
                raise
            except Exception as exc:  # noqa: BLE001 - recorded as the track's error row
                traceback.print_exc()
                rows.append(_error_row(track["track_id"], exc))
        return rows


def summarize(table: pa.Table) -> dict[str, Any]:
    status = table.column("status").to_pylist()
    reasons = Counter(reason_code(r) for r, s in zip(table.column("reason").to_pylist(), status)
                      if s != STATUS_OK)
    counts = Counter(status)
    return {"ok": counts.get(STATUS_OK, 0), "rejected": counts.get(STATUS_REJECTED, 0),
            "error": counts.get(STATUS_ERROR, 0), "reasons": dict(reasons)}


def skipped_result(name: str, partition: int, key: str) -> dict[str, Any]:
    """The summary of a stage x partition whose output exists: no work this run (the curate
    summary counts the output's tracks in its one pass over the store)."""
    return {"stage": name, "partition": partition, "key": key, "skipped": True,
            "seconds": 0.0, "ok": 0, "rejected": 0, "error": 0, "reasons": {}}


def done_partitions(store: StageStore, name: str, key: str, partitions: list[int]) -> set[int]:
    """Which of `partitions` have an output of stage `name` under `key` that reads: one listing
    of the key's directory (not a lookup per partition), then the footer of each listed output;
    a damaged one is quarantined and counts as missing, so its partition is planned again."""
    listed = set(store.glob_partitions(store.path("stages", name, key))) & set(partitions)
    return {p for p in listed if _done(store, store.stage_path(name, key, p))}


def run_partition(store: StageStore, cfg: Config, name: str, partition: int,
                  keys: dict[str, str]) -> dict[str, Any]:
    """Apply stage `name` to one partition unless its output exists. Returns a summary."""
    key = keys[name]
    out = store.stage_path(name, key, partition)
    started = time.perf_counter()
    skipped = skipped_result(name, partition, key)
    if _done(store, out):
        return skipped
    # Another run on this work root may be computing the same partition: wait for it, then
    # find its output, rather than compute it twice.
    with store.lock(f"stage-{name}-{key}-{partition:05d}", timeout_s=24 * 3600):
        if _done(store, out):
            return skipped
        return _compute(store, cfg, name, partition, keys, out, started)


def _done(store: StageStore, out: str) -> bool:
    """The output exists and reads (its footer: cheap); a damaged one is quarantined, so the
    partition is computed again."""
    if not store.exists(out):
        return False
    why = store.unreadable(out)
    if why is None:
        return True
    store.quarantine(out, why)
    return False


def _compute(store: StageStore, cfg: Config, name: str, partition: int, keys: dict[str, str],
             out: str, started: float) -> dict[str, Any]:
    key = keys[name]
    cls = stage_class(name)
    tracks = store.joined_rows(partition, {u: keys[u] for u in cls.inputs})
    stage, lock = get_stage(name, cfg, key)
    with lock:
        rows = _process_isolated(stage, tracks) if tracks else []
    by_id = {r["track_id"]: r for r in rows}
    missing = [t["track_id"] for t in tracks if t["track_id"] not in by_id]
    for tid in missing:  # a stage that forgets a track must not lose it silently
        by_id[tid] = {"track_id": tid, "status": STATUS_ERROR,
                      "reason": "exception: the stage returned no row for this track"}
    ordered = [by_id[t["track_id"]] for t in tracks]
    table = pa.Table.from_pylist(ordered, schema=cls.schema)
    store.write_table(out, table)
    return {"stage": name, "partition": partition, "key": key, "skipped": False,
            "seconds": round(time.perf_counter() - started, 3), **summarize(table)}
