"""The pack flow: manifest, WebDataset shards, shard index and the dataset report of a dataset.

One task does the pack (tasks/pack.py; it skips itself when the index on disk was built from
the same inputs and config and every shard has its recorded size, and writes a damaged shard
again alone), one the report, which is also a Prefect markdown artifact, and one the review:
the lowest-confidence tracks per label (tasks/review.py), as a Prefect table artifact.
"""
from __future__ import annotations

import posixpath
import re

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

from flows.params import PackParams
from schemas.config import Config
from tasks.pack import check_dataset_name, read_manifest, require_catalog
from tasks.pack import pack as pack_dataset
from tasks.report import REPORT_COLUMNS, build_report, read_report, write_report
from tasks.review import review_dataset, table_rows
from tasks.store import StageStore


@task(name="pack", cache_policy=NONE)
def pack_task(cfg: Config, dataset: str, rebuild: bool = False) -> dict:
    return pack_dataset(cfg, dataset, rebuild=rebuild)


@task(name="pack-report", cache_policy=NONE)
def report_task(cfg: Config, summary: dict) -> str:
    store = StageStore(cfg.work_root)
    dataset = summary["dataset"]
    shard_dir = store.path("shards", dataset)
    report = read_report(store, shard_dir) if summary["skipped"] else None   # the dataset did not change
    if report is None:
        rejects = store.read_table(posixpath.join(shard_dir, "rejects.parquet")).to_pylist()
        report = build_report(read_manifest(store, dataset, REPORT_COLUMNS), rejects, summary)
        write_report(store, shard_dir, report)
    return report.inline_markdown()


@task(name="pack-review", cache_policy=NONE)
def review_task(cfg: Config, dataset: str) -> list[dict]:
    return table_rows(review_dataset(StageStore(cfg.work_root), dataset, cfg.pack.review_per_label))


def artifact_key(dataset: str, kind: str = "dataset-report") -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return f"{kind}-" + (re.sub(r"[^a-z0-9-]+", "-", dataset.lower()).strip("-") or "x")


@flow(name="pack", log_prints=True)
def pack(params: PackParams = PackParams()) -> dict:
    cfg = params.load()
    check_dataset_name(params.dataset)
    store = StageStore(cfg.work_root)
    store.check_writable()
    require_catalog(store)
    summary = pack_task(cfg, params.dataset, params.rebuild)
    if cfg.pack.report:
        markdown = report_task(cfg, summary)
        create_markdown_artifact(markdown, key=artifact_key(params.dataset),
                                 description=f"dataset {params.dataset}: {summary['packed']} tracks")
    review = review_task(cfg, params.dataset)
    create_table_artifact(review, key=artifact_key(params.dataset, "review"),
                          description=f"dataset {params.dataset}: the {cfg.pack.review_per_label} "
                          "lowest-confidence tracks per label (acepipe review; correct with acepipe override)")
    print(f"pack {params.dataset}: {summary['packed']} tracks in {summary['shards']} shards, "
          f"{summary['rejected']} left out{' (unchanged, skipped)' if summary['skipped'] else ''}")
    if summary["mode"] == "append":
        print(f"appended {summary['appended']} track(s) in {len(summary['new_shards'])} new shard(s), "
              f"tombstoned {summary['removed_now']}; the other shards unchanged ({summary['tombstoned']} "
              "tombstones in all: `acepipe pack --rebuild` compacts)")
    if summary.get("rewritten"):
        print(f"rewrote {len(summary['rewritten'])} damaged shard(s) with their recorded size and checksum: "
              f"{', '.join(summary['rewritten'])}; the rest unchanged")
    if summary.get("overrides"):
        print(f"{summary['overrides']} field(s) set by overrides/{params.dataset}.parquet")
    if summary["stage_missing"]:
        print(f"warning: {summary['stage_missing']} tracks wait for a stage output (curate has not "
              "finished their partitions); they are not in this pack")
    return summary


def cli(args) -> int:
    """`acepipe pack --config C --work W [--dataset NAME] [--rebuild]`."""
    params = PackParams(config=args.config, work_root=args.work, overrides=args.overrides,
                        dataset=args.dataset, rebuild=args.rebuild)
    summary = pack(params)
    shard_dir = posixpath.join(summary["work_root"], "shards", summary["dataset"])
    print(f"manifest  {posixpath.join(summary['work_root'], 'manifest', summary['dataset'] + '.parquet')}")
    print(f"shards    {shard_dir}: {summary['shards']} ({summary['bytes'] / 1e6:.1f} MB), "
          f"{summary['packed']} tracks, {summary['hours']} h{' (unchanged, skipped)' if summary['skipped'] else ''}")
    print(f"left out  {summary['rejected']}" + "".join(f"  {code}: {n}" for code, n in
                                                      sorted(summary["reasons"].items())))
    print(f"          (reasons per track in {shard_dir}/rejects.parquet and report.md)")
    return 0
