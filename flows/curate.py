"""The curate flow: ingest, then every configured stage mapped over partitions.

The run plans first: one listing per stage key finds the `stage x partition` outputs that
exist and read; only the others become Prefect tasks (a partition's stage waits only for its
own upstream tasks on that partition, so stages 3-6 run side by side), and the done ones are
reported as skipped without a task run. Ends with one pass over the catalog and the stage outputs that
explains every track: the per-stage table artifact ("curate-summary", this run's work and
each stage's cumulative counts), the rejects Parquet under reports/ and the first rows of
it as the "curate-rejects" artifact, and a summary line in the run's log. A run in which a
stage task failed (a full disk, a bug) still writes all of that, then ends Failed with
CurateFailed naming the failed stage x partition tasks and their causes.
"""
from __future__ import annotations

import time

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NONE
from prefect.futures import as_completed
from prefect.states import Failed

from flows.params import RunParams
from flows.runners import ensure_gpu_limit, gpu_tag, retry_only_transient, task_runner_for
from schemas.config import Config
from tasks.ingest import IngestResult, check_sources, ingest
from tasks.stage import (check_stages, dag_order, done_partitions, run_partition, skipped_result,
                         stage_class, stage_keys)
from tasks.store import StageStore
from tasks.summary import CatalogSummary, stage_table, summarize_catalog, summary_line, write_rejects

REJECTS_SHOWN = 500   # rows of the curate-rejects artifact; the Parquet holds them all
FAILURES_NAMED = 3    # failed tasks named in CurateFailed's message; the summary lists them all


class CurateFailed(RuntimeError):
    """Stage tasks failed. The summary and artifacts were written (the tracks of the failed
    partitions count as not yet processed) and travel with the error as `summary`, so the CLI
    can show them; a rerun computes only what is missing."""

    def __init__(self, message: str, summary: dict | None = None):
        super().__init__(message)
        self.summary = summary


def one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:500]


def failure_message(failed: list[dict], not_run: int) -> str:
    """One line: the first failed stage x partition tasks and their causes, then how many more."""
    named = "; ".join(f"{f['stage']} partition {f['partition']}: {f['cause']}" for f in failed[:FAILURES_NAMED])
    more = f"; and {len(failed) - FAILURES_NAMED} more" if len(failed) > FAILURES_NAMED else ""
    waited = f" ({not_run} downstream tasks did not run)" if not_run else ""
    return (f"{len(failed)} stage task{'s' * (len(failed) != 1)} failed{waited}: {named}{more}. "
            "Their tracks count as not yet processed; fix the cause and rerun (done partitions are skipped)")


@task(name="ingest", cache_policy=NONE)
def ingest_task(cfg: Config) -> IngestResult:
    return ingest(cfg, StageStore(cfg.work_root))


@task(name="stage", cache_policy=NONE, retries=2, retry_delay_seconds=[10, 60],
      retry_condition_fn=retry_only_transient)
def stage_task(cfg: Config, name: str, partition: int, keys: dict[str, str]) -> dict:
    return run_partition(StageStore(cfg.work_root), cfg, name, partition, keys)


@task(name="curate-summary", cache_policy=NONE)
def summary_task(cfg: Config, partitions: list[int]) -> tuple[CatalogSummary, str]:
    store = StageStore(cfg.work_root)
    order = dag_order(cfg.stages)
    catalog = summarize_catalog(store, order, stage_keys(cfg, order), partitions)
    return catalog, write_rejects(store, catalog.rejects)


def plan(store: StageStore, order: list[str], keys: dict[str, str], partitions: list[int]
         ) -> dict[str, set[int]]:
    """stage -> the partitions it must compute this run: those without an output that reads.
    A stage's output under its key stays valid whatever happened to its inputs' files (the key
    covers the inputs' keys), so each stage is planned on its own."""
    return {name: set(partitions) - done_partitions(store, name, keys[name], partitions) for name in order}


@flow(name="curate-stages", log_prints=True)
def curate_stages(cfg: Config, partitions: list[int]) -> list[dict]:
    """One Prefect task per stage x partition that has work; what is done is reported as
    skipped without a task run (a nightly run over a large corpus then costs what is new)."""
    order = dag_order(cfg.stages)
    keys = stage_keys(cfg, order)
    todo = plan(StageStore(cfg.work_root), order, keys, partitions)
    tags = {name: gpu_tag(stage_class(name).uses_gpu, cfg.device) for name in order}
    if "gpu" in tags.values() and any(todo[n] for n in order if tags[n] == "gpu"):
        ensure_gpu_limit(cfg.runner.gpu_concurrency)
    futures, results = {}, []
    for p in partitions:
        for name in order:
            if p not in todo[name]:
                results.append(skipped_result(name, p, keys[name]))
                continue
            deps = [futures[(u, p)] for u in stage_class(name).inputs if (u, p) in futures]
            futures[(name, p)] = stage_task.with_options(
                task_run_name=f"{name}-p{p:05d}", tags=[tags[name]],
            ).submit(cfg, name, p, keys, wait_for=deps)
    get_run_logger().info(f"planned {len(futures)} stage x partition tasks; "
                          f"{len(results)} outputs already there")
    progress = create_progress_artifact(0.0, key="curate-progress",
                                        description="stage x partition tasks finished") if futures else None
    for done, fut in enumerate(as_completed(list(futures.values())), 1):
        try:
            results.append(fut.result())
        except Exception as exc:  # noqa: BLE001 - reported in the summary, the run goes on
            stage, p = next(k for k, v in futures.items() if v is fut)
            failed = {"stage": stage, "partition": p, "skipped": False, "ok": 0, "rejected": 0, "error": 0}
            if fut.state.is_pending():   # NotReady: an upstream task of this partition failed
                results.append({**failed, "not_run": True, "reasons": {"not_run: upstream task failed": 1}})
            else:                        # the table's reason stays short; `failed` keeps the cause
                cause = one_line(exc)
                results.append({**failed, "failed": cause, "reasons": {f"task_failed: {cause}"[:80]: 1}})
        if progress:
            update_progress_artifact(progress, 100.0 * done / len(futures))
    return results


@flow(name="curate", log_prints=True)
def curate(params: RunParams = RunParams()) -> dict:
    started = time.perf_counter()
    cfg = params.load()
    for name, why in cfg.skipped_stages.items():
        get_run_logger().warning(f"the {name} stage is skipped: {why}")
    store = StageStore(cfg.work_root)
    store.check_writable()
    check_sources(cfg.sources)
    check_stages(cfg, dag_order(cfg.stages))
    runner = task_runner_for(cfg.runner)   # before ingest: a runner that cannot exist fails up front
    ingested = ingest_task(cfg)
    results = curate_stages.with_options(task_runner=runner)(cfg, ingested.partitions)
    # This run's ingest work: new tracks (ok or rejected) and known tracks whose source went or
    # changed (marked: rejected now) or came back (restored: ok again).
    marked = sum(ingested.marked.values())
    ingest_row = {"stage": "ingest", "partition": -1,
                  "skipped": ingested.new_tracks == marked == ingested.restored == 0,
                  "ok": ingested.new_tracks - sum(ingested.rejected.values()) + ingested.restored,
                  "rejected": sum(ingested.rejected.values()) + marked, "error": 0,
                  "reasons": {**ingested.rejected, **ingested.marked}, "seconds": ingested.seconds}
    catalog, rejects_path = summary_task(cfg, ingested.partitions)
    table = stage_table([ingest_row] + results, catalog.totals)
    order = dag_order(cfg.stages)
    failed = sorted(({"stage": r["stage"], "partition": r["partition"], "cause": r["failed"]}
                     for r in results if "failed" in r),
                    key=lambda f: (order.index(f["stage"]), f["partition"]))
    summary = {"found": ingested.found, "new_tracks": ingested.new_tracks,
               "duplicates": ingested.duplicates, "known": ingested.known,
               "partitions": len(ingested.partitions),
               "new_partitions": len(ingested.new_partitions), "stages": table,
               "work_root": cfg.work_root, **catalog.counts(), "rejects_path": rejects_path,
               "failed_tasks": failed, "seconds": round(time.perf_counter() - started, 2)}
    line = summary_line(summary)
    create_table_artifact(table or [{"stage": "-", "partitions_run": 0}], key="curate-summary",
                          description=line)
    n_rejects = catalog.rejects.num_rows
    shown = f"the first {REJECTS_SHOWN} here, " if n_rejects > REJECTS_SHOWN else ""
    create_table_artifact(catalog.rejects.slice(0, REJECTS_SHOWN).to_pylist(), key="curate-rejects",
                          description=f"{n_rejects} rejected or failed tracks of {summary['tracks']} "
                                      f"({shown}all of them in `{rejects_path}`)")
    print(line)
    if failed:
        # A returned Failed state ends the run Failed without a traceback of this flow's own
        # code in the log (each task's log holds its own); calling curate() raises CurateFailed.
        message = f"curate: {failure_message(failed, sum(1 for r in results if r.get('not_run')))}"
        return Failed(message=message, data=CurateFailed(message, summary))
    return summary
