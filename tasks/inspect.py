"""`acepipe inspect`: everything the store knows about one track, for a person to read."""
from __future__ import annotations

import os

import pyarrow.compute as pc

from schemas.config import Config
from tasks import audio
from tasks.stage import STAGE_MODULES, dag_order, stage_keys
from tasks.store import StageStore


def _plain(row: dict) -> dict:
    return {k: (audio.display_path(v) if isinstance(v, bytes) else v) for k, v in row.items()}


def inspect_track(cfg: Config, track: str) -> dict:
    store = StageStore(cfg.work_root)
    catalog = store.read_catalog()
    if len(catalog) == 0:
        return {"found": False, "error": f"no catalog under {cfg.work_root!r}: run `acepipe run` first"}
    mask = pc.equal(catalog.column("track_id"), track)
    if not pc.any(mask).as_py():
        raw = os.fsencode(os.path.abspath(track))
        mask = pc.equal(catalog.column("uri_raw"), raw)
    hits = catalog.filter(mask).to_pylist()
    if not hits:  # an exact duplicate is catalogued under its first path
        path = audio.display_path(os.path.abspath(track))
        hits = [r for r in catalog.to_pylist() if path in (r["aliases"] or [])]
    if not hits:
        return {"found": False, "error": f"{track!r} is neither a track_id nor an ingested path"}
    row = hits[0]
    report = {"found": True, "track_id": row["track_id"], "catalog": _plain(row), "stages": {}}
    known = [s for s in dag_order(cfg.stages) if s in STAGE_MODULES]
    keys = stage_keys(cfg, known)
    for name in known:
        path = store.stage_path(name, keys[name], row["partition"])
        existed = store.exists(path)
        t = store.read_table_or_quarantine(path) if existed else None
        if t is None:
            report["stages"][name] = {"key": keys[name], "status": "not run" if not existed else
                                      "output did not read and was moved to quarantine/; "
                                      "`acepipe run` recomputes it"}
            continue
        found = t.filter(pc.equal(t.column("track_id"), row["track_id"])).to_pylist()
        report["stages"][name] = ({"key": keys[name], **_plain(found[0])} if found else
                                  {"status": "not processed (rejected upstream)", "key": keys[name]})
    return report
