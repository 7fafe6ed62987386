"""The pack flow: manifest, WebDataset shards, shard index and the dataset report of a dataset.

One task does the pack (tasks/pack.py; it skips itself when the index on disk was built from
the same inputs and config), one the report; the report is also a Prefect markdown artifact.
"""
from __future__ import annotations

import posixpath

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from flows.params import DatasetParams
from schemas.config import Config
from tasks.pack import pack as pack_dataset
from tasks.pack import read_manifest
from tasks.report import build_report, write_report
from tasks.store import StageStore


@task(name="pack", cache_policy=NONE)
def pack_task(cfg: Config, dataset: str) -> dict:
    return pack_dataset(cfg, dataset)


@task(name="pack-report", cache_policy=NONE)
def report_task(cfg: Config, summary: dict) -> str:
    store = StageStore(cfg.work_root)
    dataset = summary["dataset"]
    shard_dir = store.path("shards", dataset)
    rejects = store.read_table(posixpath.join(shard_dir, "rejects.parquet")).to_pylist()
    report = build_report(read_manifest(store, dataset), rejects, summary, charts=cfg.pack.report)
    write_report(store, shard_dir, report)
    return report.inline_markdown()


@flow(name="pack", log_prints=True)
def pack(params: DatasetParams = DatasetParams()) -> dict:
    cfg = params.load()
    StageStore(cfg.work_root).check_writable()
    summary = pack_task(cfg, params.dataset)
    markdown = report_task(cfg, summary)
    create_markdown_artifact(markdown, key=f"dataset-report-{params.dataset}".replace("_", "-").lower(),
                             description=f"dataset {params.dataset}: {summary['packed']} tracks")
    print(f"pack {params.dataset}: {summary['packed']} tracks in {summary['shards']} shards, "
          f"{summary['rejected']} left out{' (unchanged, skipped)' if summary['skipped'] else ''}")
    return summary


def cli(args) -> int:
    """`acepipe pack --config C --work W [--dataset NAME]`."""
    params = DatasetParams(config=args.config, work_root=args.work, overrides=args.overrides,
                           dataset=args.dataset)
    summary = pack(params)
    print(f"manifest  {posixpath.join(summary['work_root'], 'manifest', summary['dataset'] + '.parquet')}")
    print(f"shards    {summary['shards']} ({summary['bytes'] / 1e6:.1f} MB), {summary['packed']} tracks, "
          f"{summary['hours']} h")
    print(f"left out  {summary['rejected']}   (see shards/{summary['dataset']}/rejects.parquet, report.md)")
    return 0
