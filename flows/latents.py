"""The latents flow: one task per audio shard (mapped on the configured task runner), then the index.

Each `latents-shard` task encodes one audio shard into its latent shard and record, or skips it
when the record on disk has the same fingerprint (tasks/latents.py); on CUDA the tasks carry
the `gpu` tag (runner.gpu_concurrency caps them) and only transient faults are retried. The `latents-index` task
runs last and writes index.parquet only once every shard is complete. A summary is printed,
returned, and published as a Prefect markdown artifact.
"""
from __future__ import annotations

from prefect import flow, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.utilities.annotations import quote

from flows.params import DatasetParams
from flows.runners import ensure_gpu_limit, gpu_tag, retry_only_transient, task_runner_for
from schemas.config import Config
from tasks.latents import encode_shard, plan, prepare, skipped_result, write_index
from tasks.store import StageStore


@task(name="latents-shard", cache_policy=NONE, retries=2, retry_delay_seconds=[10, 60],
      retry_condition_fn=retry_only_transient, task_run_name="latents-{shard_plan[shard]}")
def shard_task(cfg: Config, dataset: str, shard_plan: dict) -> dict:
    return encode_shard(cfg, dataset, shard_plan)


@task(name="latents-index", cache_policy=NONE)
def index_task(cfg: Config, the_plan: dict, results: list[dict], index_current: bool) -> dict:
    return write_index(cfg, the_plan, results, index_current=index_current)


@flow(name="latents-shards", log_prints=True)
def latents_shards(cfg: Config, dataset: str, names: list[str]) -> list[dict]:
    """Encode the named audio shards. Takes names, not the plan: a subflow's parameters go to
    Prefect's API, which refuses more than 512 KB (a plan lists every track)."""
    wanted = set(names)
    shards = [s for s in plan(cfg, dataset, StageStore(cfg.work_root), wanted)["shards"] if s["shard"] in wanted]
    tag = gpu_tag(True, cfg.device)   # capped by the gpu tag's concurrency limit on CUDA
    if tag == "gpu":
        ensure_gpu_limit(cfg.runner.gpu_concurrency)
    futures = shard_task.with_options(tags=[tag]).map(unmapped(cfg), unmapped(dataset), shards)
    results, failed = [], []
    for s, fut in zip(shards, futures):
        try:
            results.append(fut.result())
        except Exception as exc:  # noqa: BLE001 - named below; the other shards stay done
            failed.append(f"{s['shard']} ({type(exc).__name__}: {str(exc)[:200]})")
    if failed:
        raise RuntimeError(f"{len(failed)} latent shard(s) failed, so no index was written: "
                           f"{'; '.join(failed[:5])}. Fix the cause and re-run; finished shards are skipped")
    return results


def summary_markdown(summary: dict) -> str:
    lines = [f"# Latents: {summary['dataset']}", "",
             f"- tracks encoded: **{summary['tracks']}** ({summary['audio_hours']} h, "
             f"{summary['latent_frames']} latent frames); rejected: **{summary['rejected']}**",
             f"- shards: {summary['shards']} ({summary['shards_run']} encoded, "
             f"{summary['shards_skipped']} unchanged and skipped)",
             f"- encoding: {summary['encode_seconds']} s, "
             f"{summary['audio_seconds_per_second'] or '-'} s of audio per second",
             f"- output: `{summary['latents']}` (fingerprint `{summary['fingerprint']}`)", ""]
    if summary["by_reason"]:
        lines += ["| reason | tracks |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in summary["by_reason"].items()] + [""]
    lines += ["| shard | ok | rejected | audio s | seconds | skipped |", "|---|---:|---:|---:|---:|---|"]
    lines += [f"| {r['shard']} | {r['ok']} | {r['rejected']} | {r['audio_seconds']} | {r['seconds']} | "
              f"{'yes' if r['skipped'] else ''} |" for r in summary["per_shard"][:100]]
    return "\n".join(lines)


@flow(name="latents", log_prints=True)
def latents(params: DatasetParams = DatasetParams()) -> dict:
    cfg = params.load()
    if not cfg.latents.enabled:
        print("latents.enabled is false: nothing to do")
        return {"dataset": params.dataset, "disabled": True}
    store = StageStore(cfg.work_root)
    store.check_writable()
    runner = task_runner_for(cfg.runner)   # before planning: a runner that cannot exist fails up front
    the_plan = plan(cfg, params.dataset, store, tracks_for=set())   # the encoding subflow reads its shards' tracks
    index_current = prepare(cfg, the_plan, store)
    # Planned once: only shards whose latent shard is not done become task runs.
    done = {s["shard"]: skipped_result(params.dataset, s, store) for s in the_plan["shards"]}
    todo = [s for s in the_plan["shards"] if done[s["shard"]] is None]
    ran = latents_shards.with_options(task_runner=runner)(cfg, params.dataset,
                                                          [s["shard"] for s in todo]) if todo else []
    by_shard = {**{k: v for k, v in done.items() if v is not None}, **{r["shard"]: r for r in ran}}
    results = [by_shard[s["shard"]] for s in the_plan["shards"]]
    # quote: Prefect would walk every track of the plan looking for futures (7 of 8 s at 20k tracks)
    summary = index_task(cfg, quote(the_plan), results, index_current)
    create_markdown_artifact(summary_markdown(summary),
                             key=f"latents-{params.dataset}".replace("_", "-").lower(),
                             description=f"latents {params.dataset}: {summary['tracks']} tracks")
    print(f"latents {params.dataset}: {summary['tracks']} tracks in {summary['shards']} shards "
          f"({summary['shards_skipped']} skipped), {summary['rejected']} rejected")
    return summary


def cli(args) -> int:
    """`acepipe latents --config C --work W [--dataset NAME]`."""
    params = DatasetParams(config=args.config, work_root=args.work, overrides=args.overrides,
                           dataset=args.dataset)
    summary = latents(params)
    if summary.get("disabled"):
        return 0
    print(f"latents   {summary['latents']}  (index.parquet, {summary['shards']} shards, "
          f"{summary['shards_run']} encoded, {summary['shards_skipped']} skipped)")
    print(f"tracks    {summary['tracks']} ok, {summary['audio_hours']} h, "
          f"{summary['latent_frames']} latent frames")
    print(f"rejected  {summary['rejected']}   (see latents/{summary['dataset']}/rejects.parquet)")
    for reason, n in summary["by_reason"].items():
        print(f"  {n:5d}  {reason}")
    if summary["audio_seconds_per_second"]:
        print(f"speed     {summary['audio_seconds_per_second']} s of audio per second "
              f"({summary['encode_seconds']} s encoding)")
    return 0
