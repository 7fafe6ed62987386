"""`acepipe verify [--repair]`: check every output under a work root against what its writer
recorded; with --repair, move what is damaged aside so the step that wrote it writes it again.

It sits beside the DAG, not in it, and reads:
  catalog/part-*.parquet, catalog/seen.parquet      every page against its checksum
  stages/<stage>/<key>/part-*.parquet               (store.unreadable(full=True))
  manifest/<dataset>.parquet, shards/<dataset>/     manifest, index and rejects read; each shard has
                                                    the size and blake2b its index recorded
  latents/<dataset>/                                index, rejects and records read; each latent tar
                                                    has the size and blake2b its record holds
What --repair does, in this order (a damaged file goes to quarantine/, kept for a person):
  a stage output        quarantined: the next `acepipe run` recomputes it
  a catalog partition   quarantined with its partition's stage outputs. Curate cannot rebuild a
                        partition from nothing, but the next `acepipe run` catalogues its files
                        again as new tracks: ingest's seen memo maps a file to its track_id only to
                        spare the hash, and a track is new when no catalog partition holds it
  catalog/seen.parquet  quarantined: the next ingest hashes every file once more
  a pack                its damaged shards, manifest, rejects or index quarantined, then pack runs
                        for the dataset (tasks/pack.py, what the flow runs): it writes missing
                        shards again alone, or the whole pack; it refuses when this config and the
                        stage outputs no longer give the packed data
  latents               a damaged latent tar quarantined and its record removed, a record or index
                        that does not read quarantined: the next `acepipe latents` encodes that
                        shard again (and writes the index)
One line per problem, then a count line; exit 0 when clean or all repaired, 1 when problems remain.
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Callable

from schemas.config import Config, load_config
from schemas.pack import SHARD_DIGEST_COLUMNS
from tasks.pack import pack
from tasks.shards import file_digest
from tasks.store import PART_RE, StageStore, StoreError


@dataclass
class Problem:
    path: str                             # relative to the work root
    what: str                             # what is wrong with it
    repair: str                           # what --repair does, or what to run
    fix: Callable[[], str] | None = None  # does the repair, says what it did; None: nothing to do here
    group: str = ""                       # problems one fix repairs together (a dataset's pack)


@dataclass
class Findings:
    store: StageStore
    checked: int = 0
    problems: list[Problem] = field(default_factory=list)

    def add(self, path: str, what: str, repair: str, fix: Callable[[], str] | None = None, group: str = ""):
        self.problems.append(Problem(posixpath.relpath(path, self.store.root), " ".join(what.split()),
                                     repair, fix, group))   # one line per problem, whatever Arrow says

    def parquet(self, path: str) -> str | None:
        """Why a Parquet file does not read to its last page checksum ('missing' when absent)."""
        self.checked += 1
        try:
            return self.store.unreadable(path, full=True)
        except FileNotFoundError:
            return "missing"


def _files(store: StageStore, *parts: str) -> list[str]:
    """Visible names under a directory (temporaries of a live or killed writer are not outputs)."""
    return sorted(n for n in store.listdir(store.path(*parts)) if not n.startswith("."))


def _quarantine(store: StageStore, path: str, why: str) -> str:
    return f"moved to {posixpath.relpath(store.quarantine(path, why), store.root)}"


# -- catalog and stage outputs -------------------------------------------------------------------
def check_catalog(store: StageStore, found: Findings) -> None:
    for name in _files(store, "catalog"):
        path = store.path("catalog", name)
        match = PART_RE.fullmatch(name)
        if name != "seen.parquet" and not match:
            continue
        why = found.parquet(path)
        if why is None:
            continue
        if match is None:
            found.add(path, why, "quarantine it; the next ingest hashes every file once more",
                      lambda path=path, why=why: _quarantine(store, path, why))
            continue
        found.add(path, why, "quarantine it with its partition's stage outputs; the next `acepipe run` "
                  "catalogues its files again as new tracks and computes their stages",
                  lambda path=path, why=why, p=int(match.group(1)): _quarantine_partition(store, path, why, p))


def _quarantine_partition(store: StageStore, path: str, why: str, partition: int) -> str:
    """A catalog partition and every stage output of it: ingest catalogues the partition's files
    again (maybe under another partition number); outputs left under this number would be
    skipped as done for tracks they do not hold."""
    done = _quarantine(store, path, why)
    outputs = [store.stage_path(stage, key, partition) for stage in _files(store, "stages")
               for key in _files(store, "stages", stage)]
    moved = [p for p in outputs if store.exists(p)]
    for p in moved:
        store.quarantine(p, f"its catalog partition {partition} was quarantined")
    return f"{done}, with {len(moved)} stage output(s) of partition {partition}"


def check_stages(store: StageStore, found: Findings) -> None:
    for stage in _files(store, "stages"):
        for key in _files(store, "stages", stage):
            for name in _files(store, "stages", stage, key):
                path = store.path("stages", stage, key, name)
                if not PART_RE.fullmatch(name):
                    continue
                why = found.parquet(path)
                if why is not None and why != "missing":   # missing: curate moved it meanwhile
                    found.add(path, why, "quarantine it; the next `acepipe run` recomputes it",
                              lambda path=path, why=why: _quarantine(store, path, why))


# -- packs -----------------------------------------------------------------------------------------
def check_pack(store: StageStore, cfg: Config, dataset: str, found: Findings) -> None:
    shard_dir = store.path("shards", dataset)
    index_path = posixpath.join(shard_dir, "index.parquet")
    manifest_path = store.path("manifest", f"{dataset}.parquet")
    bad: list[tuple[str, str]] = []        # (path, why) of files in the way of pack
    damaged: list[tuple[str, str]] = []    # of those, the ones that exist: quarantined before pack
    expect = None                          # the fingerprint the dataset was packed with
    for path in (manifest_path, posixpath.join(shard_dir, "rejects.parquet"), index_path):
        why = found.parquet(path)
        if why is not None:
            bad.append((path, why))
            if why != "missing":
                damaged.append((path, why))
        else:
            meta = store.read_table(path, columns=[]).schema.metadata or {}
            expect = meta.get(b"fingerprint", b"").decode() or expect   # the index's, read last, wins
    if not any(p == index_path for p, _ in bad):
        index = store.read_table(index_path)
        if not all(c in index.column_names for c in SHARD_DIGEST_COLUMNS):
            bad.append((index_path, "written by an older acepipe: no shard sizes or checksums to check"))
        else:
            recorded = {r["shard"]: (r["shard_bytes"], r["shard_blake2b"]) for r in
                        index.select(["shard", *SHARD_DIGEST_COLUMNS]).to_pylist()}
            for shard, (size, checksum) in sorted(recorded.items()):
                path = posixpath.join(shard_dir, shard)
                found.checked += 1
                try:
                    actual = file_digest(store, path)
                except FileNotFoundError:
                    bad.append((path, "missing"))
                    continue
                if actual != (size, checksum):
                    why = (f"{actual[0]} bytes, the index recorded {size}" if actual[0] != size else
                           f"blake2b {actual[1]}, the index recorded {checksum}")
                    bad.append((path, why))
                    damaged.append((path, why))
    for path, why in bad:
        found.add(path, why, f"quarantine the damaged files of dataset {dataset}, then pack it (damaged "
                  "shards are written again alone when the pack's inputs are unchanged)",
                  lambda: _repack(store, cfg, dataset, damaged, expect), group=f"pack:{dataset}")


def _repack(store: StageStore, cfg: Config, dataset: str, damaged: list[tuple[str, str]],
            expect: str | None) -> str:
    for path, why in damaged:
        if store.exists(path):
            store.quarantine(path, why)
    summary = pack(cfg, dataset, store, expect_fingerprint=expect)
    if summary["rewritten"]:
        return f"pack wrote {', '.join(summary['rewritten'])} again (recorded size and checksum); the rest unchanged"
    if summary["skipped"]:
        return "pack found the dataset complete"
    note = "" if expect else " (no readable index or manifest said how it was packed: with this config)"
    return f"pack wrote the dataset again: {summary['packed']} tracks in {summary['shards']} shards{note}"


# -- latents ---------------------------------------------------------------------------------------
def check_latents(store: StageStore, dataset: str, found: Findings) -> None:
    out = store.path("latents", dataset)
    rerun = f"the next `acepipe latents --dataset {dataset}` encodes that shard again"
    records = [n for n in _files(store, "latents", dataset, "records") if n.endswith(".parquet")]
    index_path, rejects_path = posixpath.join(out, "index.parquet"), posixpath.join(out, "rejects.parquet")
    why = found.parquet(index_path)
    if why == "missing" and records:
        found.add(index_path, "missing (a latents run did not finish)",
                  f"nothing to remove: run `acepipe latents --dataset {dataset}`")
    elif why is not None and why != "missing":
        found.add(index_path, why, "quarantine it; the next `acepipe latents` writes it again",
                  lambda why=why: _quarantine(store, index_path, why))
    elif why is None:
        rejects_why = found.parquet(rejects_path)
        if rejects_why is not None:
            found.add(rejects_path, rejects_why, "quarantine it and remove the index: the next "
                      "`acepipe latents` writes both again",
                      lambda: _drop_rejects(store, rejects_path, index_path, rejects_why))
    for name in records:
        rec_path = posixpath.join(out, "records", name)
        tar_path = posixpath.join(out, name.replace(".parquet", ".tar"))
        why = found.parquet(rec_path)
        if why is not None:
            if why != "missing":
                found.add(rec_path, why, f"quarantine it; {rerun}",
                          lambda rec_path=rec_path, why=why: _quarantine(store, rec_path, why))
            continue
        meta = store.read_table(rec_path, columns=[]).schema.metadata or {}
        found.checked += 1
        try:
            size, checksum = file_digest(store, tar_path)
        except FileNotFoundError:
            found.add(tar_path, "missing", f"remove its record; {rerun}",
                      lambda rec_path=rec_path: _remove(store, rec_path))
            continue
        if b"tar_blake2b" not in meta:   # written before records held a checksum: existence only
            continue
        recorded = (int(meta[b"tar_bytes"]), meta[b"tar_blake2b"].decode())
        if (size, checksum) != recorded:
            why = (f"{size} bytes, its record says {recorded[0]}" if size != recorded[0] else
                   f"blake2b {checksum}, its record says {recorded[1]}")
            found.add(tar_path, why, f"quarantine it and remove its record; {rerun}",
                      lambda tar_path=tar_path, rec_path=rec_path, why=why:
                      f"{_quarantine(store, tar_path, why)}; {_remove(store, rec_path)}")


def _remove(store: StageStore, path: str) -> str:
    store.fs.rm(path)
    return f"removed {posixpath.relpath(path, store.root)}"


def _drop_rejects(store: StageStore, rejects_path: str, index_path: str, why: str) -> str:
    done = _quarantine(store, rejects_path, why) if store.exists(rejects_path) else "missing"
    return f"{done}; {_remove(store, index_path)}"


# -- the whole work root ---------------------------------------------------------------------------
def check(store: StageStore, cfg: Config) -> Findings:
    found = Findings(store)
    check_catalog(store, found)
    check_stages(store, found)
    datasets = set(_files(store, "shards")) | {n.removesuffix(".parquet") for n in _files(store, "manifest")
                                               if n.endswith(".parquet")}
    for dataset in sorted(datasets):
        check_pack(store, cfg, dataset, found)
    for dataset in _files(store, "latents"):
        check_latents(store, dataset, found)
    return found


def repair(found: Findings) -> dict[int, str | None]:
    """Run each problem's fix once per group, in the order found; problem index -> what it did
    (None: not repaired, the line says why)."""
    done: dict[str, tuple[bool, str]] = {}
    results = {}
    for i, problem in enumerate(found.problems):
        if problem.fix is None:
            results[i] = None
            continue
        key = problem.group or f"#{i}"
        if key not in done:
            try:
                done[key] = (True, problem.fix())
            except Exception as exc:  # noqa: BLE001 - said on its line; the other repairs go on
                done[key] = (False, f"not repaired: {exc}" if isinstance(exc, StoreError)
                             else f"not repaired: {type(exc).__name__}: {exc}")
        ok, text = done[key]
        results[i] = text if ok else None
        if not ok:
            problem.repair = " ".join(text.split())
    return results


def cli_verify(args) -> int:
    """`acepipe verify [--repair] [--config C] [--work W] [--set k=v]`."""
    cfg = load_config(args.config, [*args.overrides, *([f"work_root={args.work}"] if args.work else [])])
    store = StageStore(cfg.work_root)
    if not store.fs.exists(store.root):
        raise StoreError(f"work root {store.url!r} does not exist: nothing to verify")
    found = check(store, cfg)
    results = repair(found) if args.repair else {}
    left = 0
    for i, p in enumerate(found.problems):
        if not args.repair:
            print(f"problem   {p.path}: {p.what}; --repair: {p.repair}")
        elif results.get(i) is not None:
            print(f"repaired  {p.path}: {p.what}; {results[i]}")
        else:
            print(f"left      {p.path}: {p.what}; {p.repair}")
        left += not args.repair or results.get(i) is None
    n = len(found.problems)
    tail = ("no problems" if not n else f"{n} problem(s), {n - left} repaired, {left} left"
            + ("" if args.repair else " (run with --repair)"))
    print(f"verify {cfg.work_root}: {found.checked} files checked, {tail}")
    return 1 if left else 0
