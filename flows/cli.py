"""`acepipe`: the one command-line entry point.

    acepipe synth OUT [--n N] [--seed S]        write the synthetic corpus
    acepipe run [--config C] [--source S] [--work W] [--set k=v]   the curate flow
    acepipe config [--config C] [--explain]      the effective config (YAML), or every key explained
    acepipe inspect TRACK_ID_OR_PATH [--config C] [--work W]      every stage output of a track
    acepipe verify [--repair] [--config C] [--work W]    check every output under the work root (--repair fixes)
    acepipe analyze FILE... [--json]              rhythm/key/structure of files, no flow, no store
    acepipe lyrics index --db DB --out DIR        build the IPA MinHash index of a lyrics database
    acepipe lyrics match --index DIR (--text T | --jsonl F)   one JSON line per query: id, lyric_id, score
    acepipe tiny-models DIR [NAME...]             build the tiny model twins
    acepipe pack|latents --config C --work W [--dataset NAME]   the pack and latents flows
    acepipe export --format acestep-v1|acestep-1.5|jsonl [--dataset NAME] [--out DIR]   the export flow
    acepipe review [--dataset NAME] [--per-label N] [--json]   lowest-confidence tracks per label
    acepipe override set|list|remove [--dataset NAME] ...   a person's corrections (win over stage outputs)
    acepipe pipeline [--config C] [--train-config T] [--max-steps N] [--no-train]   curate -> pack -> latents -> train
    acepipe train --config configs/train/tiny.yaml --out DIR [--resume]
    acepipe caption-server --checkpoint REF --port 8000    OpenAI-compatible caption endpoint
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import flows  # noqa: F401 - sets Prefect's offline environment before prefect is imported


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="default", help="profile (default, tiny) or YAML path")
    p.add_argument("--work", help="work root (local path or fsspec URL)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="config override, e.g. ingest.partition_size=100")


def _params(args):
    from flows.params import RunParams

    return RunParams(config=args.config, work_root=args.work,
                     sources=getattr(args, "source", None) or None, overrides=args.overrides)


def cmd_synth(args) -> int:
    from tasks.synth import generate_corpus

    try:
        truth = generate_corpus(args.out, n=args.n, seed=args.seed)
    except FileExistsError as exc:
        print(f"acepipe: error: {exc}", file=sys.stderr)
        return 2
    bad = sum(1 for s in truth["songs"] if s["expect"] != "ok")
    print(f"wrote {len(truth['songs'])} files ({bad} deliberately bad) and the lyrics database to {args.out}")
    return 0


def print_summary(summary: dict) -> None:
    print(f"\nwork root   {summary['work_root']}")
    print(f"found       {summary['found']} files -> {summary['tracks']} tracks "
          f"({summary['duplicates']} exact duplicates folded), {summary['partitions']} partitions "
          f"({summary['new_partitions']} new)")
    print(f"this run    {summary['new_tracks']} new tracks, {summary['known']} files already catalogued")
    print(f"kept        {summary['ok']}   rejected {summary['rejected']}   error {summary['error']}   "
          f"not yet processed {summary['pending']}   (all tracks of the catalog)")
    for reason, n in summary["by_reason"].items():
        print(f"  {n:5d}  {reason}")
    print(f"rejects     {summary['rejects_path']}   (every rejected or failed track, with its reason)")
    print("\n                     ---- this run ----          -- all partitions --")
    print("stage          run  skip     ok  rej  err    secs      ok   rej   err  partitions run  reasons")
    for s in summary["stages"]:
        print(f"{s['stage']:<13} {s['partitions_run']:4d} {s['partitions_skipped']:5d} {s['ok']:6d} "
              f"{s['rejected']:4d} {s['error']:4d} {s['seconds']:7.1f} {s['total_ok']:7d} "
              f"{s['total_rejected']:5d} {s['total_error']:5d}  {s['ran'] or '-':<14}  {s['reasons']}")
    print(f"\ntime        {summary['seconds']:.1f} s")


def cmd_run(args) -> int:
    from flows.curate import CurateFailed, curate
    from schemas.config import ConfigError

    params = _params(args)
    # Fail before Prefect starts: malformed config, missing source, unwritable work root.
    cfg = params.load()
    from tasks.ingest import check_sources
    from tasks.store import StageStore

    from flows.runners import task_runner_for

    check_sources(cfg.sources)
    StageStore(cfg.work_root).check_writable()
    task_runner_for(cfg.runner)
    from tasks.stage import check_stages, dag_order

    try:
        check_stages(cfg, dag_order(cfg.stages))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        summary, failure = curate(params), None
    except CurateFailed as exc:   # failed tasks: the summary still says what was done
        summary, failure = exc.summary, exc
    if summary is not None and args.json:
        print(json.dumps(summary, indent=1))
    elif summary is not None:
        print_summary(summary)
    if failure is not None:
        print(f"acepipe: error: {failure}", file=sys.stderr)
        return 1
    return 0


def cmd_pipeline(args) -> int:
    from flows.curate import CurateFailed
    from flows.pipeline import PipelineParams, pipeline

    from flows.runners import task_runner_for

    params = _params(args)
    task_runner_for(params.load().runner)  # a malformed config or runner fails here, before Prefect starts
    try:
        result = pipeline(PipelineParams(run=params, dataset=args.dataset, train=not args.no_train,
                                         train_config=args.train_config, max_steps=args.max_steps,
                                         train_overrides=args.train_set))
    except CurateFailed as exc:   # the pipeline stopped after curate: nothing was packed
        if exc.summary is not None:
            print_summary(exc.summary)
        print(f"acepipe: error: {exc}; pack, latents and train did not run", file=sys.stderr)
        return 1
    print_summary(result["curate"])
    pack, lat = result["pack"], result["latents"]
    print(f"\npack        {pack['packed']} tracks in {pack['shards']} shards ({pack['bytes'] / 1e6:.1f} MB), "
          f"{pack['rejected']} left out")
    print(f"latents     {lat['tracks']} tracks encoded in {lat['shards']} shards, {lat['rejected']} rejected")
    if "train" in result:
        final = result["train"]
        print(f"train       step {final['step']}, checkpoint {final['checkpoint']}")
        print("            " + (", ".join(f"{k} {v:.4f}" for k, v in sorted(final["metrics"].items()))
                                 or "nothing left to train: the run was already at its last step"))
    return 0


def cmd_config(args) -> int:
    import yaml

    from schemas.config import describe, section_dump

    cfg = _params(args).load()
    if not args.explain:
        print(yaml.safe_dump(section_dump(cfg), sort_keys=False, allow_unicode=True), end="")
        return 0
    rows = describe(cfg)
    width = max(len(k) for k, _, _ in rows)
    for key, value, text in rows:
        print(f"{key:<{width}}  {json.dumps(value, ensure_ascii=False):<24}  {text}")
    return 0


def cmd_inspect(args) -> int:
    from tasks.inspect import inspect_track

    cfg = _params(args).load()
    report = inspect_track(cfg, args.track)
    print(json.dumps(report, indent=1, default=str, ensure_ascii=False))
    return 0 if report.get("found") else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="acepipe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write the synthetic corpus")
    p.add_argument("out")
    p.add_argument("--n", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("run", help="run the curate flow")
    _add_config_args(p)
    p.add_argument("--source", action="append", help="source dir, URL or .txt list (repeatable)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("config", help="print the effective config (profile + overrides), validated")
    _add_config_args(p)
    p.add_argument("--explain", action="store_true", help="every key with its value and meaning")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("inspect", help="every stage output for one track")
    _add_config_args(p)
    p.add_argument("track", help="track_id or path of an ingested file")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", help="check every output under the work root (--repair to fix)")
    _add_config_args(p)
    p.add_argument("--repair", action="store_true", help="quarantine what is damaged, rewrite damaged shards")
    p.set_defaults(func=lambda a: _call("tasks.verify:cli_verify", a))

    p = sub.add_parser("analyze", help="rhythm, key and structure of audio files (no flow)")
    p.add_argument("files", nargs="+")
    p.add_argument("--json", action="store_true", help="JSON lines")
    _add_config_args(p)
    p.set_defaults(func=lambda a: _call("tasks.rhythm:cli_analyze", a))

    p = sub.add_parser("lyrics", help="canonical lyrics database tools")
    lsub = p.add_subparsers(dest="lyrics_command", required=True)
    q = lsub.add_parser("index", help="build the IPA MinHash index of a lyrics database")
    q.add_argument("--db", required=True, help="Parquet or JSONL lyrics database")
    q.add_argument("--out", required=True, help="index directory")
    _add_config_args(q)
    q.set_defaults(func=lambda a: _call("tasks.lyrics:cli_index", a))
    q = lsub.add_parser("match", help="match lyrics text against an index built by `lyrics index`")
    q.add_argument("--index", required=True, help="index directory written by `acepipe lyrics index`")
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="one query's text (e.g. a transcript)")
    src.add_argument("--jsonl", help='queries, one JSON object a line: {"id", "text", "language"?}')
    q.add_argument("--language", help="language of the queries (ISO 639-1) where a line gives none")
    q.add_argument("--id", default="text", help="id printed for --text (default: text)")
    _add_config_args(q)
    q.set_defaults(func=lambda a: _call("tasks.lyrics:cli_match", a))

    p = sub.add_parser("tiny-models", help="build the tiny model twins into DIR")
    p.add_argument("dir")
    p.add_argument("names", nargs="*", help="twin names (default: all)")
    p.add_argument("--force", action="store_true", help="rebuild existing twins")
    p.set_defaults(func=cmd_tiny_models)

    for name in ("pack", "latents"):
        p = sub.add_parser(name, help=f"run the {name} flow locally")
        _add_config_args(p)
        p.add_argument("--dataset", default="default", help="dataset name under manifest/ and shards/")
        if name == "pack":
            p.add_argument("--rebuild", action="store_true", help="pack every kept track again and drop the "
                           "tombstones (default: append new and changed tracks, keep the other shards)")
        p.set_defaults(func=lambda a, name=name: _call(f"flows.{name}:cli", a))

    p = sub.add_parser("review", help="the lowest-confidence tracks of a packed dataset, per label")
    _add_config_args(p)
    p.add_argument("--dataset", default="default", help="dataset name under manifest/")
    p.add_argument("--per-label", type=int, default=10, help="tracks listed per label (default 10)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=lambda a: _call("tasks.review:cli", a))

    p = sub.add_parser("override", help="a person's corrections of manifest fields (win over stage outputs)")
    osub = p.add_subparsers(dest="override_command", required=True)
    q = osub.add_parser("set", help="set (or replace) one track's field; the next pack applies it")
    q.add_argument("--track", required=True, help="track_id or path of an ingested file")
    q.add_argument("--field", required=True, help="manifest column, e.g. bpm, key, language, tags, caption")
    value = q.add_mutually_exclusive_group(required=True)
    value.add_argument("--value", help="the value: text for text fields, else JSON (120, [\"pop\"], true)")
    value.add_argument("--null", action="store_true", help="set the field to null")
    q.add_argument("--who", required=True, help="who sets it (kept in the table)")
    q = osub.add_parser("remove", help="remove a track's override (of --field, else all its fields)")
    q.add_argument("--track", required=True, help="track_id or path of an ingested file")
    q.add_argument("--field", help="manifest column (default: every overridden field of the track)")
    q = osub.add_parser("list", help="every override of the dataset")
    q.add_argument("--json", action="store_true", help="print JSON")
    for q in osub.choices.values():
        _add_config_args(q)
        q.add_argument("--dataset", default="default", help="dataset name (overrides/<dataset>.parquet)")
        q.set_defaults(func=lambda a: _call("tasks.overrides:cli", a))

    p = sub.add_parser("export", help="a packed dataset in another trainer's format (the export flow)")
    _add_config_args(p)
    p.add_argument("--dataset", default="default", help="dataset name under manifest/ and shards/")
    p.add_argument("--format", required=True, choices=["acestep-v1", "acestep-1.5", "jsonl"],
                   help="acestep-v1: ACE-Step's `datasets` folder; acestep-1.5: per-song files; jsonl")
    p.add_argument("--out", help="export directory, replaced whole (default <work root>/exports/<dataset>/<format>)")
    p.set_defaults(func=lambda a: _call("flows.export:cli", a))

    p = sub.add_parser("pipeline", help="curate -> pack -> latents -> train, as one Prefect run")
    _add_config_args(p)
    p.add_argument("--source", action="append", help="source dir, URL or .txt list (repeatable)")
    p.add_argument("--dataset", default="default", help="dataset name under manifest/, shards/, latents/")
    p.add_argument("--train-config", default="default", help="configs/train/<name>.yaml or a YAML path")
    p.add_argument("--max-steps", type=int, help="overrides trainer.max_steps")
    p.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                   help="training config override")
    p.add_argument("--no-train", action="store_true", help="stop after the latents")
    p.set_defaults(func=cmd_pipeline)

    # Listed for --help only: main() hands their arguments, untouched, to their own parsers.
    for name, (target, help_text) in FORWARDED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


# Commands whose options belong to another entry point's parser: `acepipe train --config X`
# must accept exactly what `python -m model.train` documents (argparse.REMAINDER refuses a
# leading option), so main() forwards everything after the command name.
FORWARDED = {
    "train": ("model.train:main", "train the DiT (the options of python -m model.train; see acepipe train --help)"),
    "caption-server": ("tasks.caption_server:main",
                       "OpenAI-compatible caption server over the Qwen-Omni adapter (acepipe caption-server --help)"),
}


def _call(target: str, arg) -> int:
    import importlib

    module, func = target.split(":")
    return int(getattr(importlib.import_module(module), func)(arg) or 0)


def cmd_tiny_models(args) -> int:
    from tasks.models import TINY_BUILDERS, build_all

    unknown = [n for n in args.names if n not in TINY_BUILDERS]
    if unknown:   # before building any: a typo must not leave half the list built
        print(f"acepipe: error: no tiny twin named {', '.join(map(repr, unknown))}; known: "
              f"{', '.join(TINY_BUILDERS)}", file=sys.stderr)
        return 2
    for path in build_all(args.dir, args.names or None, force=args.force):
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    from schemas.config import ConfigError
    from tasks.ingest import SourceError
    from tasks.models import ModelLoadError
    from tasks.store import StoreError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in FORWARDED:
        rest = argv[1:]
        return _call(FORWARDED[argv[0]][0], rest[1:] if rest[:1] == ["--"] else rest)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, SourceError, StoreError, ModelLoadError) as exc:
        print(f"acepipe: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
