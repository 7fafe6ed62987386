"""Run summaries: per-stage counts, each track's final outcome across the DAG, and the rejects.

A track's outcome is its first non-ok row in DAG order (catalog, then each stage). A track
still ok whose partition has no output of the next stage yet (a failed or interrupted task, or
an output that does not read, which is then moved to quarantine/) is `pending`, so
`tracks == ok + rejected + error + pending` holds on every run and a rejected track names the
stage and the reason that stopped it. One pass over the catalog and the stage outputs, a
partition at a time, gives the outcomes, each stage's cumulative counts and the rejects table
(schemas/summary.py) that the curate flow writes and shows.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from schemas.common import STATUS_ERROR, STATUS_OK, STATUS_REJECTED, reason_code
from schemas.summary import REJECTS_SCHEMA
from tasks.store import StageStore

STATUS_PENDING = "pending"   # a summary's word only: no stage output carries it


def partition_outcomes(store: StageStore, order: list[str], keys: dict[str, str],
                       partition: int) -> tuple[dict[str, dict[str, Any]], dict[str, Counter]]:
    """Each catalog track's outcome in one partition, and each stage's status counts there
    ("ingest" for the catalog)."""
    outcomes: dict[str, dict[str, Any]] = {}
    totals: dict[str, Counter] = {}
    catalog = store.read_catalog(partition).select(["track_id", "status", "reason", "uri"]).to_pylist()
    for r in catalog:
        outcomes[r["track_id"]] = {"uri": r["uri"], "track_id": r["track_id"], "partition": partition,
                                   "stage": "ingest", "status": r["status"], "reason": r["reason"]}
    totals["ingest"] = Counter(r["status"] for r in catalog)
    for name in order:
        # An output that does not read is quarantined and counts as missing (its tracks pending):
        # one damaged file never stops the summary, and the next run recomputes it.
        table = store.read_table_or_quarantine(store.stage_path(name, keys[name], partition),
                                               columns=["track_id", "status", "reason"])
        rows = {}
        if table is not None:
            rows = {r["track_id"]: r for r in table.to_pylist()}
            totals[name] = Counter(r["status"] for r in rows.values())
        for track_id, o in outcomes.items():
            if o["status"] != STATUS_OK:
                continue
            r = rows.get(track_id)
            if r is None:
                o.update(status=STATUS_PENDING, stage=name,
                         reason=f"pending: no {name} output for partition {partition} yet")
            elif r["status"] != STATUS_OK:
                o.update(status=r["status"], reason=r["reason"], stage=name)
    return outcomes, totals


def track_outcomes(store: StageStore, order: list[str], keys: dict[str, str],
                   partitions: list[int]) -> dict[str, dict[str, Any]]:
    """track_id -> outcome over the given partitions (small catalogs, tests, inspection)."""
    outcomes: dict[str, dict[str, Any]] = {}
    for p in partitions:
        outcomes.update(partition_outcomes(store, order, keys, p)[0])
    return outcomes


@dataclass
class CatalogSummary:
    """What the whole catalog holds now: outcome counts, per-stage totals, every reject."""
    status: Counter = field(default_factory=Counter)
    by_reason: Counter = field(default_factory=Counter)         # "stage/code" -> tracks
    totals: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    rejects: pa.Table = field(default_factory=REJECTS_SCHEMA.empty_table)

    def counts(self) -> dict[str, Any]:
        return {"tracks": sum(self.status.values()), "ok": self.status[STATUS_OK],
                "rejected": self.status[STATUS_REJECTED], "error": self.status[STATUS_ERROR],
                "pending": self.status[STATUS_PENDING], "by_reason": dict(sorted(self.by_reason.items()))}


def summarize_catalog(store: StageStore, order: list[str], keys: dict[str, str],
                      partitions: list[int]) -> CatalogSummary:
    """One read of every partition's catalog and stage outputs; only the rejects are kept
    (as Arrow), so memory grows with the rejects, not with the catalog."""
    summary = CatalogSummary()
    rejects = []
    for p in partitions:
        outcomes, totals = partition_outcomes(store, order, keys, p)
        for stage, counts in totals.items():
            summary.totals[stage].update(counts)
        summary.status.update(o["status"] for o in outcomes.values())
        summary.by_reason.update(f"{o['stage']}/{reason_code(o['reason'])}"
                                 for o in outcomes.values() if o["status"] != STATUS_OK)
        bad = [o for o in outcomes.values() if o["status"] in (STATUS_REJECTED, STATUS_ERROR)]
        if bad:
            rejects.append(pa.Table.from_pylist(bad, schema=REJECTS_SCHEMA))
    if rejects:
        summary.rejects = pa.concat_tables(rejects)
    return summary


def write_rejects(store: StageStore, rejects: pa.Table) -> str:
    """Replace reports/curate-rejects.parquet (atomically); returns where it lies, as a URL
    or local path a person can open."""
    path = store.path("reports", "curate-rejects.parquet")
    store.write_table(path, rejects)
    return path if store.local else store.fs.unstrip_protocol(path)


def stage_table(results: list[dict[str, Any]],
                totals: dict[str, Counter] | None = None) -> list[dict[str, Any]]:
    """Rows of the per-stage summary artifact: partitions run/skipped, this run's counts and
    reasons (a skipped partition did no work), seconds, then the stage's cumulative counts
    over every partition's output (`totals`, from summarize_catalog)."""
    by_stage: dict[str, dict[str, Any]] = defaultdict(lambda: {
        "run": 0, "skipped": 0, "ok": 0, "rejected": 0, "error": 0, "seconds": 0.0,
        "reasons": Counter(), "ran": []})
    order: list[str] = []
    for r in results:
        if r["stage"] not in by_stage:
            order.append(r["stage"])
        s = by_stage[r["stage"]]
        if r.get("not_run"):   # an upstream task failed: neither run nor skipped, but say why
            s["reasons"].update(r["reasons"])
            continue
        s["skipped" if r["skipped"] else "run"] += 1
        s["seconds"] += r.get("seconds", 0.0)   # an ingest that found nothing new still listed
        if r["skipped"]:
            continue
        if r.get("partition", -1) >= 0:
            s["ran"].append(r["partition"])
        for k in ("ok", "rejected", "error"):
            s[k] += r[k]
        s["reasons"].update(r["reasons"])
    rows = []
    for name in order:
        s = by_stage[name]
        row = {"stage": name, "partitions_run": s["run"], "partitions_skipped": s["skipped"],
               "ok": s["ok"], "rejected": s["rejected"], "error": s["error"],
               "seconds": round(s["seconds"], 2), "ran": ranges(s["ran"]),
               "reasons": ", ".join(f"{k}={v}" for k, v in sorted(s["reasons"].items()))}
        if totals is not None:
            total = totals.get(name, Counter())
            row.update(total_ok=total[STATUS_OK], total_rejected=total[STATUS_REJECTED],
                       total_error=total[STATUS_ERROR])
        rows.append(row)
    return rows


def ranges(parts: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8': which partitions a run (re)did, for a person."""
    parts = sorted(set(parts))
    out, i = [], 0
    while i < len(parts):
        j = i
        while j + 1 < len(parts) and parts[j + 1] == parts[j] + 1:
            j += 1
        out.append(str(parts[i]) if i == j else f"{parts[i]}-{parts[j]}")
        i = j + 1
    return ",".join(out)


def summary_line(summary: dict[str, Any]) -> str:
    """The curate run's one line: every catalog track accounted for, and where the rejects are."""
    return (f"curate: {summary['tracks']} tracks ({summary['ok']} kept, {summary['rejected']} rejected, "
            f"{summary['error']} error, {summary['pending']} not yet processed); this run found "
            f"{summary['found']} files ({summary['new_tracks']} new tracks, {summary['duplicates']} "
            f"exact duplicates folded, {summary['known']} already catalogued); "
            f"rejects in {summary['rejects_path']}")
