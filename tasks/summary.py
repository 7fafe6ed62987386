"""Run summaries: per-stage counts, and each track's final outcome across the DAG.

A track's outcome is its first non-ok row in DAG order (catalog, then each stage), so
`tracks in == ok + rejected + error` holds for every run, and a rejected track names
the stage and the reason that stopped it.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from schemas.common import STATUS_OK, reason_code
from tasks.store import StageStore


def track_outcomes(store: StageStore, order: list[str], keys: dict[str, str],
                   partitions: list[int]) -> dict[str, dict[str, Any]]:
    outcomes: dict[str, dict[str, Any]] = {}
    for p in partitions:
        for r in store.read_catalog(p).select(["track_id", "status", "reason", "uri"]).to_pylist():
            outcomes[r["track_id"]] = {"status": r["status"], "reason": r["reason"],
                                       "stage": "ingest", "uri": r["uri"], "partition": p}
        for name in order:
            path = store.stage_path(name, keys[name], p)
            if not store.exists(path):
                continue
            for r in store.read_table(path, columns=["track_id", "status", "reason"]).to_pylist():
                o = outcomes.get(r["track_id"])
                if o is not None and o["status"] == STATUS_OK and r["status"] != STATUS_OK:
                    o.update(status=r["status"], reason=r["reason"], stage=name)
    return outcomes


def stage_table(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of the per-stage summary artifact: stage, partitions run/skipped, counts, reasons."""
    by_stage: dict[str, dict[str, Any]] = defaultdict(lambda: {
        "run": 0, "skipped": 0, "ok": 0, "rejected": 0, "error": 0, "seconds": 0.0,
        "reasons": Counter(), "ran": []})
    order: list[str] = []
    for r in results:
        if r["stage"] not in by_stage:
            order.append(r["stage"])
        s = by_stage[r["stage"]]
        s["skipped" if r["skipped"] else "run"] += 1
        if not r["skipped"] and r.get("partition", -1) >= 0:
            s["ran"].append(r["partition"])
        for k in ("ok", "rejected", "error"):
            s[k] += r[k]
        s["seconds"] += r.get("seconds", 0.0)
        s["reasons"].update(r["reasons"])
    return [{"stage": name, "partitions_run": by_stage[name]["run"],
             "partitions_skipped": by_stage[name]["skipped"], "ok": by_stage[name]["ok"],
             "rejected": by_stage[name]["rejected"], "error": by_stage[name]["error"],
             "seconds": round(by_stage[name]["seconds"], 2),
             "ran": ranges(by_stage[name]["ran"]),
             "reasons": ", ".join(f"{k}={v}" for k, v in sorted(by_stage[name]["reasons"].items()))}
            for name in order]


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


def outcome_counts(outcomes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    status = Counter(o["status"] for o in outcomes.values())
    reasons = Counter(f"{o['stage']}/{reason_code(o['reason'])}" for o in outcomes.values()
                      if o["status"] != STATUS_OK)
    return {"tracks": len(outcomes), "ok": status.get("ok", 0),
            "rejected": status.get("rejected", 0), "error": status.get("error", 0),
            "by_reason": dict(sorted(reasons.items()))}
