"""image_analysis[shard]: every URL of the run's shards fetched, analysed on the GPU servers and
stored in url_analysis_results, with checks that nothing was lost."""


import json
import warnings

from dagster import (
    AssetExecutionContext,
    AssetKey,
    BackfillPolicy,
    BetaWarning,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)

from imgpipe_dagster.assets import checks
from imgpipe_dagster.assets.config import ASSET_OWNERS, GPU_POOL, PROFILE_TAG, ImageAnalysisConfig
from imgpipe_dagster.assets.shard_results import check_events, read_shard_outcomes, shard_metadata
from imgpipe_dagster.engine.heartbeat import RunHeartbeat
from imgpipe_dagster.engine.runner import ShardRunner
from imgpipe_dagster.engine.stats import RunSummary
from imgpipe_dagster.engine.versions import analysis_version, model_identity
from imgpipe_dagster.failure_kinds import CONFIG_ERROR, PERMANENT_FAILURE_KEY
from imgpipe_dagster.partitions import url_shards
from imgpipe_dagster.paths import image_store_dir
from imgpipe_dagster.profiles import ProfileError
from imgpipe_dagster.resources import FetcherResource, GpuModelResource, PostgresResource
from imgpipe_dagster.router_snapshots import write_router_snapshot
from imgpipe_dagster.run_log import forwarded_to_run_log
from imgpipe_dagster.settings_map import engine_settings
from imgpipe_dagster.store.verify import verify
from imgpipe_dagster.store.versions import ShardBusyError, duplicate_counts
from imgpipe_dagster.versioning import configured_analysis_version, configured_prompt

# BackfillPolicy is a beta parameter of @asset in Dagster 1.13, used here on purpose: its notice
# would repeat in every process that loads the code location.
warnings.filterwarnings("ignore", message="Parameter `backfill_policy`", category=BetaWarning)

# One run takes up to this many shards of a backfill, so the GPU servers stay busy between shards.
SHARDS_PER_BACKFILL_RUN = 4


def summary_metadata(summary: RunSummary) -> dict:
    """The whole run's figures, all its shards together, named ``run_*``; each shard's own figures
    (under the plain names: urls_total, images_per_s, ...) come from ``shard_results``."""
    waiting = summary.waiting_for_retry or {}
    return {
        "run_urls_total": summary.urls_total,
        "run_urls_done": summary.final_count("done"),
        "run_urls_failed": summary.final_count("failed_permanent"),
        "run_urls_unfinished": summary.urls_unfinished,
        "run_images_per_s": round(summary.images_per_s, 2),
        "run_elapsed_s": round(summary.elapsed_s, 1),
        "run_gpu_request_retries": summary.gpu_request_retries,
        "run_failure_ratio": round(summary.failure_ratio, 4),
        # URLs left in the pool with a due time (retries, deferred hosts): a later run finishes them
        "run_urls_waiting_for_retry": summary.urls_waiting_for_retry,
        "next_retry_at": waiting.get("next_due_at") or "",
        "last_retry_at": waiting.get("last_due_at") or "",
        "downloads": MetadataValue.json(summary.downloads or {}),
        # per GPU endpoint: the adaptive limiter's and the circuit breaker's figures, whatever the tier's API
        "gpu_tier": MetadataValue.json(gpu_tier_figures(summary.router)),
    }


def gpu_tier_figures(router: dict | None) -> dict:
    """The router's snapshot reduced to each endpoint's limiter and breaker figures."""
    router = router or {}
    return {
        "counters": router.get("counters", {}),
        "endpoints": {e["name"]: {"url": e["url"], "limiter": e["limiter"], "breaker": e["breaker"]}
                      for e in router.get("endpoints", [])},  # fmt: skip
    }


@asset(
    partitions_def=url_shards,
    deps=[AssetKey("url_corpus")],
    backfill_policy=BackfillPolicy.multi_run(max_partitions_per_run=SHARDS_PER_BACKFILL_RUN),
    # the prompt and model identity (engine/versions.py): a change shows analysed shards as out of date
    code_version=configured_analysis_version().label,
    check_specs=checks.analysis_check_specs("image_analysis"),
    pool=GPU_POOL,
    group_name="analysis",
    kinds={"postgres", "pytorch"},
    owners=ASSET_OWNERS,
    tags={"imgpipe/stage": "analysis"},
    description="Downloads every URL of the shard, analyses it with the Qwen-VL servers and stores one "
    "row per URL in url_analysis_results. Run config: a profile (conservative/medium/aggressive) plus "
    "overrides; an empty config (as the backfill dialog starts) means the job's profile, else medium. "
    f"Runs share the `{GPU_POOL}` concurrency pool (the profile's max_concurrent_workers).",
)
def image_analysis(
    context: AssetExecutionContext,
    config: ImageAnalysisConfig,
    postgres: PostgresResource,
    gpu_model: GpuModelResource,
    fetcher: FetcherResource,
):
    shards = list(context.partition_keys)
    run_tags = dict(context.run.tags)
    profile = config.profile_name(run_tags)
    if run_tags.get(PROFILE_TAG) != profile:
        # asset-page and backfill launches carry no profile tag: label every run with the one it uses
        context.instance.add_run_tags(context.run_id, {PROFILE_TAG: profile})
    try:
        worker, gpu = config.resolve(run_tags)
    except ProfileError as exc:
        # the run's own config is wrong: the run-failure sensor must not retry it, nor Dagster the step
        raise Failure(str(exc), metadata={PERMANENT_FAILURE_KEY: CONFIG_ERROR}, allow_retries=False) from None
    model_path, tiny = gpu_model.resolved_model_path()
    prompt_name = configured_prompt()
    version = analysis_version(prompt_name, model_identity(model_path, tiny)).label
    loaded_version = context.assets_def.code_versions_by_key.get(context.asset_key)
    if version != loaded_version:
        context.log.warning(f"analysis version {version} differs from the loaded code version {loaded_version}: "
                            "reload the code location")  # fmt: skip
    # From here on the run's process renews its heartbeat; if it dies, the dead_runs sensor fails the run.
    with RunHeartbeat(postgres.url(), context.run_id, shards, worker.lease_seconds):
        try:
            runner, summary = _analyse(context, shards, profile, worker, gpu, postgres, gpu_model, fetcher,
                                       prompt_name, version, config.reuse_duplicates)  # fmt: skip
        except ShardBusyError as exc:  # another version's run holds the shard: a later run takes it
            raise Failure(str(exc)) from None

    with postgres.connect() as conn:
        report = verify(conn, shards, analysis_version=version)
        outcomes = read_shard_outcomes(conn, shards, context.run_id, version)
        duplicates = {shard: duplicate_counts(conn, shard, version) for shard in shards}

    metadata = {
        "profile": profile,
        "run_shards": MetadataValue.json(shards),
        "model": model_path + (" (tiny random test model: text is noise)" if tiny else ""),
        "analysis_version": version,
        # shards this run moved from another version (their old results are kept): {shard: previous version}
        "previous_versions": MetadataValue.json(runner.rebound),
        "prompt": prompt_name,
        "images_from_store": runner.image_store.read if runner.image_store else 0,
        "images_stored": runner.image_store.written if runner.image_store else 0,
        "gpu_api": gpu_model.api,
    } | summary_metadata(summary)
    if not report.ok:
        context.log.error("verification failed:\n" + "\n".join(report.lines()))
    if report.unfinished and report.ok and sum(report.unfinished.values()) > summary.urls_waiting_for_retry:
        # URLs went back to the pool (GPU outage, or leased by another run): the shard is not done.
        raise Failure(
            f"{sum(report.unfinished.values())} URLs of {shards} are not final yet "
            f"({json.dumps(report.unfinished)}); they stay in the pool and a later run finishes them",
            metadata={k: v for k, v in metadata.items() if not isinstance(v, MetadataValue)},
        )
    for shard, outcome in outcomes.items():
        # the shard's own figures first, the run's after them (the UI lists metadata in this order)
        shard_own = shard_metadata(outcome, summary.elapsed_s) | {
            "duplicates_reused": duplicates[shard].reused,
            # same perceptual hash, other bytes: reported, analysed separately
            "near_duplicates": duplicates[shard].near_duplicates,
        }
        context.add_asset_metadata(shard_own | metadata, partition_key=shard)
    yield MaterializeResult()
    yield from check_events(context, outcomes, tiny)


def _analyse(
    context, shards, profile, worker, gpu, postgres, gpu_model, fetcher, prompt_name: str, version: str,
    reuse_duplicates: bool,
) -> tuple[ShardRunner, RunSummary]:
    model_path, tiny = gpu_model.resolved_model_path()
    if tiny:
        context.log.warning("analysing with the tiny random test model: its text is noise (set IMGPIPE_MODEL_PATH)")
    store_dir = image_store_dir()
    endpoints = gpu_model.ensure_endpoints(gpu, registry_url=postgres.url())
    context.log.info(f"profile {profile}: {len(shards)} shard(s) {shards[0]}..{shards[-1]}, "
                     f"GPU servers ({gpu_model.api} API) {', '.join(endpoints)}")  # fmt: skip

    def progress(line: str, summary: RunSummary) -> None:
        context.log.info(line)
        # `imgpipe status` shows the breakers of live runs from these snapshots
        write_router_snapshot(context.run_id, summary.router)

    runner = ShardRunner(
        postgres.url(), context.run_id, shards, engine_settings(worker, fetcher.settings(worker), prompt_name),
        endpoints, gpu_token=gpu_model.bearer_token(), progress=progress, analysis_version=version,
        image_store=str(store_dir) if store_dir else None, reuse_duplicates=reuse_duplicates,
        client_factory=gpu_model.client_factory(gpu, worker.images_per_request, tiny),
    )  # fmt: skip
    # a managed server that dies is restarted; the router's waiting/resumed lines reach the run log
    with gpu_model.keep_alive(), forwarded_to_run_log(context.log):
        return runner, runner.run()
