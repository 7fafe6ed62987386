"""`acepipe review`: the lowest-confidence tracks of a packed dataset, per label, for a person
to listen to and correct (acepipe override).

Read from the manifest (tasks/pack.py), only the columns each label needs:

    tempo       bpm            by bpm_confidence (0-1, calibrated by the rhythm stage)
    key         key + scale    by key_confidence
    lyrics      lyric_id       by lyrics_score (matched tracks only)
    language    language       by language_prob (transcribe's)
    ce cu pc pq the axis       by the score itself (the lowest Audiobox Aesthetics scores)
    caption     the problem    a caption cut at its token cap (finish_reason length: 0) before
                               one without any recaption (0.5); whole captions are not listed

Lowest first, ties by track_id. A track without a confidence for a label (the stage did not
produce one) is counted, not listed; a track whose label a person already overrode is left
out (it was checked). The pack flow writes the same rows as a Prefect table artifact.
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas.pack import MANIFEST_SCHEMA, RECAPTION_KEYS
from tasks.store import StageStore

AXES = ("ce", "cu", "pc", "pq")
# label -> (value column, confidence column, manifest fields whose override settles it)
LABELS = {
    "tempo": ("bpm", "bpm_confidence", ("bpm", "bpm_confidence")),
    "key": ("key", "key_confidence", ("key", "scale", "key_confidence")),
    "lyrics": ("lyric_id", "lyrics_score", ("lyric_id", "lyrics", "lyrics_score")),
    "language": ("language", "language_prob", ("language", "language_prob")),
    **{axis: (axis, axis, (axis,)) for axis in AXES},
    "caption": ("caption_finish_reason", None, ("caption", "tags", "caption_finish_reason", "recaption")),
}
COLUMNS = ["track_id", "uri", "bpm", "bpm_confidence", "key", "scale", "key_confidence", "lyric_id",
           "lyrics_score", "language", "language_prob", *AXES, "caption_finish_reason", "recaption",
           "overridden"]


def read_for_review(store: StageStore, dataset: str) -> pa.Table:
    """The manifest's review columns; a column an older manifest lacks is all null."""
    path = store.path("manifest", f"{dataset}.parquet")
    if not store.exists(path):
        raise FileNotFoundError(f"{path} not found: run `acepipe pack --dataset {dataset}` first")
    with store.fs.open(path, "rb") as fh:
        names = set(pq.read_schema(fh).names)
    table = store.read_table(path, columns=[c for c in COLUMNS if c in names])
    for c in COLUMNS:
        if c not in names:
            table = table.append_column(MANIFEST_SCHEMA.field(c), pa.nulls(len(table), MANIFEST_SCHEMA.field(c).type))
    return table


def _overridden(table: pa.Table, fields: tuple[str, ...]) -> np.ndarray:
    """Per row: did a person override any of `fields`."""
    col = table.column("overridden").combine_chunks()
    hit = np.zeros(len(table), dtype=bool)
    flat = pc.list_flatten(col)
    if len(flat):
        parents = pc.list_parent_indices(col).to_numpy()
        hit[parents[pc.is_in(flat, pa.array(fields)).to_numpy(zero_copy_only=False)]] = True
    return hit


def _caption_confidence(table: pa.Table) -> pa.Array:
    """0 for a caption cut at its token cap, 0.5 for one without any non-empty recaption, else 1."""
    cut = pc.fill_null(pc.equal(table.column("caption_finish_reason"), "length"), False)
    recaption = table.column("recaption").combine_chunks()
    has = pa.array(np.zeros(len(table), dtype=bool))
    for k in RECAPTION_KEYS:
        style = pc.struct_field(recaption, k)
        has = pc.or_(has, pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(style)), 0), False))
    return pc.if_else(cut, 0.0, pc.if_else(has, 1.0, 0.5))


def _value(table: pa.Table, label: str, column: str) -> pa.Array:
    if label == "key":
        return pc.binary_join_element_wise(table.column("key"), pc.fill_null(table.column("scale"), ""), " ")
    if label == "caption":
        cut = pc.fill_null(pc.equal(table.column(column), "length"), False)
        return pc.if_else(cut, "cut at the token cap (finish_reason length)", "no recaption")
    return table.column(column)


def review(table: pa.Table, per_label: int = 10) -> dict:
    """{"labels": {label: [{track_id, uri, value, confidence}] lowest first}, "unscored": {label: n}}."""
    labels, unscored = {}, {}
    for label, (column, conf_column, settles) in LABELS.items():
        conf = _caption_confidence(table) if label == "caption" else table.column(conf_column)
        present = pc.is_valid(conf) if label != "caption" else pc.less(conf, 1.0)
        if label == "lyrics":   # no match has no match score: nothing to doubt
            present = pc.and_(present, pc.is_valid(table.column("lyric_id")))
        if label in ("tempo", "key", "language"):   # no value (e.g. no tempo given): nothing to check
            present = pc.and_(present, pc.is_valid(table.column(column)))
        if label != "caption":   # a value without a confidence: the stage gave none (older outputs)
            unscored[label] = pc.sum(pc.and_(pc.is_valid(table.column(column)), pc.is_null(conf))).as_py() or 0
        keep = pc.and_(present, pa.array(~_overridden(table, settles)))
        view = pa.table({"track_id": table.column("track_id"), "uri": table.column("uri"),
                         "value": _value(table, label, column), "confidence": pc.cast(conf, pa.float64())}
                        ).filter(keep)
        # the k lowest without sorting the whole dataset; track_id (unique) makes ties deterministic
        order = pc.select_k_unstable(view, k=min(per_label, len(view)),
                                     sort_keys=[("confidence", "ascending"), ("track_id", "ascending")])
        labels[label] = view.take(order).to_pylist()
    return {"labels": labels, "unscored": unscored}


def review_dataset(store: StageStore, dataset: str, per_label: int = 10) -> dict:
    return {"dataset": dataset, "per_label": per_label, **review(read_for_review(store, dataset), per_label)}


def table_rows(result: dict) -> list[dict]:
    """The review as one flat table (the Prefect table artifact): label, rank, track, value, confidence."""
    return [{"label": label, "rank": i + 1, "track_id": r["track_id"], "uri": r["uri"],
             "value": _plain(r["value"]), "confidence": None if r["confidence"] is None else round(r["confidence"], 4)}
            for label, rows in result["labels"].items() for i, r in enumerate(rows)]


def _plain(value):
    return round(value, 3) if isinstance(value, float) else value


def format_review(result: dict) -> str:
    lines = [f"lowest-confidence tracks of dataset {result['dataset']} (at most {result['per_label']} per label)"]
    for label, rows in result["labels"].items():
        unscored = result["unscored"].get(label)
        lines.append(f"\n{label}" + (f"  ({unscored} tracks without a confidence)" if unscored else ""))
        lines += [f"  {r['confidence']:.3f}  {r['track_id']}  {str(_plain(r['value'])):<24} {r['uri']}"
                  for r in rows] or ["  -"]
    lines.append("\ncorrect a label: acepipe override set --dataset NAME --track ID --field F --value V --who YOU")
    return "\n".join(lines)


def cli(args) -> int:
    """`acepipe review --dataset NAME [--per-label N] [--json]`."""
    from flows.params import DatasetParams
    from tasks.pack import check_dataset_name

    cfg = DatasetParams(config=args.config, work_root=args.work, overrides=args.overrides,
                        dataset=args.dataset).load()
    check_dataset_name(args.dataset)
    try:
        result = review_dataset(StageStore(cfg.work_root), args.dataset, args.per_label)
    except FileNotFoundError as exc:
        import sys

        print(f"acepipe: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1, ensure_ascii=False) if args.json else format_review(result))
    return 0
