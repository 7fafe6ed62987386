"""Overrides: a person's corrections of manifest fields, which win over stage outputs in pack.

    overrides/<dataset>.parquet   track_id, field, value (JSON text), who, when (schemas/overrides.py)

A person fills it with `acepipe override set|remove` (or writes the Parquet file in that
schema); `acepipe override list` shows it. Pack (tasks/pack.py) puts each value into the
track's manifest row before the pack filter looks at it, names the field in the row's
`overridden`, and hashes the table into its fingerprint: a changed override packs again, an
unchanged one does not. The file lives apart from stage outputs, so a curate rerun or a stage
version bump leaves it, and the next pack applies it again. Every value is checked against the
manifest column's type when it is set and again when pack reads it (the file may have been
edited by hand): a bad one fails with the row named, never silently.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time

import pyarrow as pa
import pyarrow.compute as pc

from schemas.config import ConfigError
from schemas.overrides import NOT_OVERRIDABLE, OVERRIDES_SCHEMA
from schemas.pack import MANIFEST_SCHEMA
from tasks.store import StageStore, StoreError


class OverrideError(ConfigError):
    """An override a person can fix: the message names the track, the field and what is wrong."""


def overridable_fields() -> list[str]:
    return [f.name for f in MANIFEST_SCHEMA if f.name not in NOT_OVERRIDABLE]


def field_type(field: str) -> pa.DataType:
    if field not in overridable_fields():
        why = "is set by pack from the file itself" if field in NOT_OVERRIDABLE else "is not a manifest column"
        raise OverrideError(f"unknown_field: {field!r} {why}; fields a person can override: "
                            f"{', '.join(overridable_fields())}")
    return MANIFEST_SCHEMA.field(field).type


# -- values: JSON text <-> the manifest column's type -------------------------------------------
def checked_value(field: str, value):
    """`value` as the manifest column `field` holds it; OverrideError when it is not of that type
    (pyarrow alone would turn true into 1.0, cut 1.5 to 1 and a string into a list of letters)."""
    return _checked(value, field_type(field), field)


def _checked(value, typ: pa.DataType, where: str):
    if value is None:
        return None
    if pa.types.is_string(typ):
        if isinstance(value, str):
            return value
    elif pa.types.is_boolean(typ):
        if isinstance(value, bool):
            return value
    elif pa.types.is_floating(typ):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif pa.types.is_integer(typ):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            try:
                pa.array([value], type=typ)
            except (pa.ArrowInvalid, OverflowError):
                raise OverrideError(f"bad_value: {where} = {value} does not fit {typ}") from None
            return value
    elif pa.types.is_list(typ):
        if isinstance(value, list):
            return [_checked(v, typ.value_type, f"{where}[{i}]") for i, v in enumerate(value)]
    elif pa.types.is_struct(typ):
        names = [typ.field(i).name for i in range(typ.num_fields)]
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(names))
            if unknown:
                raise OverrideError(f"bad_value: {where} has no key {', '.join(unknown)}; its keys: "
                                    f"{', '.join(names)}")
            return {n: _checked(value.get(n), typ.field(n).type, f"{where}.{n}") for n in names}
    raise OverrideError(f"bad_value: {where} must be {_describe(typ)}, not {json.dumps(value)[:80]}")


def _describe(typ: pa.DataType) -> str:
    if pa.types.is_list(typ):
        return f"a JSON list, each item {_describe(typ.value_type)}"
    if pa.types.is_struct(typ):
        return "a JSON object with keys " + ", ".join(typ.field(i).name for i in range(typ.num_fields))
    return {"string": "a string", "bool": "true or false"}.get(str(typ), f"a number ({typ})")


def parse_cli_value(field: str, text: str | None) -> object:
    """`acepipe override set --value TEXT`: a string column takes TEXT as it is, any other column
    reads it as JSON (120, true, ["pop", "rock"], {"simplified": "..."}); None (--null) is null."""
    typ = field_type(field)
    if text is None or pa.types.is_string(typ):
        return checked_value(field, text)
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise OverrideError(f"bad_value: {field} must be {_describe(typ)} written as JSON, "
                            f"not {text!r}") from None
    return checked_value(field, value)


# -- the table ------------------------------------------------------------------------------------
def overrides_path(store: StageStore, dataset: str) -> str:
    return store.path("overrides", f"{dataset}.parquet")


def read_overrides(store: StageStore, dataset: str) -> pa.Table:
    """The dataset's overrides (empty when none were set). A file that does not read is a
    person's work: it is named, never quarantined or replaced."""
    path = overrides_path(store, dataset)
    if not store.exists(path):
        return OVERRIDES_SCHEMA.empty_table()
    try:
        table = store.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise StoreError(f"{path} does not read ({type(exc).__name__}: {str(exc)[:200]}); restore it "
                         "from a copy or delete it (its corrections are then lost)") from None
    missing = [n for n in OVERRIDES_SCHEMA.names if n not in table.column_names]
    if missing:
        raise OverrideError(f"{path} lacks the column(s) {', '.join(missing)}; its columns must be "
                            f"{', '.join(OVERRIDES_SCHEMA.names)}")
    return table.select(OVERRIDES_SCHEMA.names).cast(OVERRIDES_SCHEMA)


def load_overrides(store: StageStore, dataset: str) -> tuple[dict[str, dict[str, object]], str]:
    """({track_id: {field: value}}, digest) for pack: every row checked; the digest covers what
    decides the manifest (track, field, value), not who or when. No overrides: digest ''."""
    table = read_overrides(store, dataset)
    by_track: dict[str, dict[str, object]] = {}
    for row in table.to_pylist():   # a person's corrections: hundreds, not a row per track of the corpus
        where = f"{overrides_path(store, dataset)}: track {row['track_id']} field {row['field']}"
        if row["field"] in by_track.get(row["track_id"], {}):
            raise OverrideError(f"duplicate_override: {where} is set twice; keep one row")
        try:
            value = checked_value(row["field"], json.loads(row["value"]) if row["value"] is not None else None)
        except json.JSONDecodeError:
            raise OverrideError(f"bad_value: {where}: value {row['value']!r} is not JSON (a string needs "
                                "quotes)") from None
        except OverrideError as exc:
            raise OverrideError(f"{where}: {exc}") from None
        by_track.setdefault(row["track_id"], {})[row["field"]] = value
    return by_track, overrides_digest(by_track)


def overrides_digest(by_track: dict[str, dict[str, object]]) -> str:
    if not by_track:
        return ""
    canonical = sorted((t, f, json.dumps(v, sort_keys=True)) for t, fields in by_track.items()
                       for f, v in fields.items())
    return hashlib.sha256(json.dumps(canonical).encode()).hexdigest()[:16]


def apply_overrides(row: dict, fields: dict[str, object] | None) -> dict:
    """The manifest row with a person's values in place and `overridden` naming them ([]: none)."""
    row["overridden"] = sorted(fields) if fields else []
    if fields:
        row.update(fields)
    return row


# -- acepipe override set | list | remove -----------------------------------------------------------
def resolve_track(store: StageStore, track: str) -> str:
    """A track_id of the catalog, given one or the path of an ingested file (an exact duplicate
    is catalogued under its first path, with the others as aliases)."""
    from tasks.audio import display_path

    paths = {os.path.abspath(track), os.path.realpath(track)}   # as given, and through symlinks
    raw, shown = [os.fsencode(p) for p in paths], {display_path(p) for p in paths}
    for p in store.catalog_partitions():
        catalog = store.read_table(store.catalog_path(p), columns=["track_id", "uri_raw", "aliases"])
        for hit in (catalog.filter(pc.equal(catalog.column("track_id"), track)),
                    catalog.filter(pc.is_in(catalog.column("uri_raw"), pa.array(raw, pa.binary())))):
            if len(hit):
                return hit.column("track_id")[0].as_py()
        for row in catalog.filter(pc.is_valid(catalog.column("aliases"))).to_pylist():
            if shown & set(row["aliases"]):
                return row["track_id"]
    raise OverrideError(f"unknown_track: {track!r} is neither a track_id nor an ingested path under "
                        f"{store.url} (acepipe inspect finds a track; `acepipe run` ingests new files)")


def set_override(store: StageStore, dataset: str, track: str, field: str, value, who: str) -> dict:
    """Set (or replace) one override; returns its row."""
    value = checked_value(field, value)
    if not who or not who.strip():
        raise OverrideError("missing_who: say who sets the override (--who NAME): the table keeps it")
    track_id = resolve_track(store, track)
    row = {"track_id": track_id, "field": field, "value": json.dumps(value, sort_keys=True, ensure_ascii=False),
           "who": who.strip(), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with store.lock(f"overrides-{dataset}"):
        rows = [r for r in read_overrides(store, dataset).to_pylist()
                if (r["track_id"], r["field"]) != (track_id, field)]
        _write(store, dataset, rows + [row])
    return row


def remove_override(store: StageStore, dataset: str, track: str, field: str | None = None) -> list[dict]:
    """Remove a track's override of `field` (every field when None); returns the rows removed."""
    if field is not None:
        field_type(field)
    with store.lock(f"overrides-{dataset}"):
        rows = read_overrides(store, dataset).to_pylist()
        ids = {r["track_id"] for r in rows}
        track_id = track if track in ids else resolve_track(store, track)
        gone = [r for r in rows if r["track_id"] == track_id and field in (None, r["field"])]
        if not gone:
            raise OverrideError(f"no_override: track {track_id} has no override"
                                f"{f' of {field}' if field else ''} in dataset {dataset}")
        _write(store, dataset, [r for r in rows if r not in gone])
    return gone


def _write(store: StageStore, dataset: str, rows: list[dict]) -> None:
    rows.sort(key=lambda r: (r["track_id"], r["field"]))
    store.write_table(overrides_path(store, dataset), pa.Table.from_pylist(rows, schema=OVERRIDES_SCHEMA))


def cli(args) -> int:
    """`acepipe override set|list|remove --dataset NAME ...`."""
    from flows.params import DatasetParams
    from tasks.pack import check_dataset_name

    cfg = DatasetParams(config=args.config, work_root=args.work, overrides=args.overrides,
                        dataset=args.dataset).load()
    check_dataset_name(args.dataset)
    store = StageStore(cfg.work_root)
    if args.override_command == "set":
        value = None if args.null else parse_cli_value(args.field, args.value)
        row = set_override(store, args.dataset, args.track, args.field, value, args.who)
        print(f"override {row['track_id']} {row['field']} = {row['value']}  (by {row['who']}, {row['when']}); "
              f"`acepipe pack --dataset {args.dataset}` applies it")
    elif args.override_command == "remove":
        for row in remove_override(store, args.dataset, args.track, args.field):
            print(f"removed {row['track_id']} {row['field']} (was {row['value']})")
    else:
        rows = read_overrides(store, args.dataset).to_pylist()
        if args.json:
            print(json.dumps(rows, indent=1, ensure_ascii=False))
        else:
            for r in rows:
                print(f"{r['track_id']}  {r['field']:<22} {r['value']:<30} {r['who']}  {r['when']}")
            print(f"{len(rows)} override(s) in {overrides_path(store, args.dataset)}")
    return 0
