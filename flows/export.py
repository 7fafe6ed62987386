"""The export flow: a packed dataset in another trainer's format (tasks/export/).

One task writes the export; the flow publishes its summary and the tracks it left out as Prefect
artifacts. Run it after pack (`acepipe export`, or the `export/default` deployment).
"""
from __future__ import annotations

import posixpath
import re
from typing import Literal

import pyarrow.parquet as pq
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE
from pydantic import Field

from flows.params import DatasetParams
from schemas.config import Config
from schemas.export import FORMATS
from tasks.export import export as export_dataset

REJECT_ROWS = 500   # rows of the rejects artifact; every row is in the export's rejects.parquet


class ExportParams(DatasetParams):
    """Parameters of the export flow: a pack's config and dataset, the format, where to write."""
    format: Literal[FORMATS] = Field(
        "acestep-v1", description="acestep-v1: ACE-Step's `datasets` folder + audio; acestep-1.5: per-song "
        "json/caption/lyrics files beside the audio; jsonl: one line per song with every label")
    out: str | None = Field(None, description="export directory on the worker, replaced whole (null: "
                            "<work_root>/exports/<dataset>/<format>)")


@task(name="export", cache_policy=NONE)
def export_task(cfg: Config, dataset: str, fmt: str, out: str | None) -> dict:
    return export_dataset(cfg, dataset, fmt, out)


def summary_markdown(summary: dict) -> str:
    reasons = "".join(f"\n| {code} | {n} |" for code, n in sorted(summary["reasons"].items()))
    return (f"# Export of {summary['dataset']} as {summary['format']}\n\n"
            f"{summary['tracks']} tracks ({summary['hours']} h) in `{summary['out']}`; "
            f"{summary['rejected']} left out (`{summary['rejects_path']}`)\n\n| reason | tracks |\n|---|---|"
            + (reasons or "\n| - | 0 |"))


@flow(name="export", log_prints=True)
def export(params: ExportParams = ExportParams()) -> dict:
    cfg = params.load()
    summary = export_task(cfg, params.dataset, params.format, params.out)
    # Prefect artifact keys allow lowercase letters, digits and dashes only.
    key = "export-" + re.sub(r"[^a-z0-9-]+", "-", f"{params.dataset}-{params.format}".lower()).strip("-")
    create_markdown_artifact(summary_markdown(summary), key=key,
                             description=f"export {params.dataset} as {params.format}")
    if summary["rejected"]:
        rows = pq.read_table(summary["rejects_path"]).slice(0, REJECT_ROWS).to_pylist()
        create_table_artifact(rows, key=f"{key}-rejects", description="tracks the export left out, and why")
    print(f"export {params.dataset} as {params.format}: {summary['tracks']} tracks to {summary['out']}, "
          f"{summary['rejected']} left out")
    if summary["tracks"] == 0 and summary["rejected"]:
        print(f"warning: nothing was exported; every track was left out ({summary['rejects_path']} says why)")
    return summary


def cli(args) -> int:
    """`acepipe export --format F [--dataset NAME] [--out DIR] [--config C] [--work W]`."""
    params = ExportParams(config=args.config, work_root=args.work, overrides=args.overrides,
                          dataset=args.dataset, format=args.format, out=args.out)
    summary = export(params)
    print(f"exported  {summary['tracks']} tracks ({summary['hours']} h) as {summary['format']} "
          f"to {summary['out']}")
    print(f"left out  {summary['rejected']}" + "".join(f"  {code}: {n}" for code, n in
                                                      sorted(summary["reasons"].items())))
    print(f"          (reasons per track in {posixpath.join(summary['out'], 'rejects.parquet')})")
    return 0
