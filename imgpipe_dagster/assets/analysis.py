"""image_analysis[shard]: every URL of the run's shards fetched, analysed on the GPU servers and
stored in url_analysis_results, with checks that nothing was lost."""


import json

from dagster import (
    AssetExecutionContext,
    AssetKey,
    BackfillPolicy,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)

from imgpipe_dagster.assets import checks
from imgpipe_dagster.assets.config import ImageAnalysisConfig
from imgpipe_dagster.engine.runner import ShardRunner
from imgpipe_dagster.engine.stats import RunSummary
from imgpipe_dagster.failure_kinds import CONFIG_ERROR, PERMANENT_FAILURE_KEY
from imgpipe_dagster.partitions import url_shards
from imgpipe_dagster.profiles import ProfileError
from imgpipe_dagster.resources import FetcherResource, GpuModelResource, PostgresResource
from imgpipe_dagster.router_snapshots import write_router_snapshot
from imgpipe_dagster.settings_map import engine_settings
from imgpipe_dagster.store.stats import parse_stats
from imgpipe_dagster.store.verify import verify

# One run takes up to this many shards of a backfill, so the GPU servers stay busy between shards.
SHARDS_PER_BACKFILL_RUN = 4


def summary_metadata(summary: RunSummary) -> dict:
    """The run's figures as materialization metadata (plain numbers stay plain)."""
    return {
        "urls_total": summary.urls_total,
        "urls_done": summary.final_count("done"),
        "urls_failed": summary.final_count("failed_permanent"),
        "urls_unfinished": summary.urls_unfinished,
        "images_per_s": summary.images_per_s,
        "elapsed_s": summary.elapsed_s,
        "download_ms_p50": summary.download_ms_p50 or 0.0,
        "download_ms_p95": summary.download_ms_p95 or 0.0,
        "inference_ms_p50": summary.inference_ms_p50 or 0.0,
        "inference_ms_p95": summary.inference_ms_p95 or 0.0,
        "per_gpu": MetadataValue.json({name: vars(gpu) for name, gpu in summary.per_gpu.items()}),
        "failures_by_class": MetadataValue.json(summary.failures_by_class),
        "gpu_request_retries": summary.gpu_request_retries,
        "failure_ratio": round(summary.failure_ratio, 4),
        # URLs left in the pool with a due time (retries, deferred hosts): a later run finishes them
        "urls_waiting_for_retry": summary.urls_waiting_for_retry,
        "next_retry_at": (summary.waiting_for_retry or {}).get("next_due_at") or "",
        "last_retry_at": (summary.waiting_for_retry or {}).get("last_due_at") or "",
        "downloads": MetadataValue.json(summary.downloads or {}),
    }


@asset(
    partitions_def=url_shards,
    deps=[AssetKey("url_corpus")],
    backfill_policy=BackfillPolicy.multi_run(max_partitions_per_run=SHARDS_PER_BACKFILL_RUN),
    check_specs=checks.analysis_check_specs("image_analysis"),
    group_name="analysis",
    kinds={"postgres", "pytorch"},
    description="Downloads every URL of the shard, analyses it with the Qwen-VL servers and stores one "
    "row per URL in url_analysis_results. Run config: a profile (conservative/medium/aggressive) plus overrides.",
)
def image_analysis(
    context: AssetExecutionContext,
    config: ImageAnalysisConfig,
    postgres: PostgresResource,
    gpu_model: GpuModelResource,
    fetcher: FetcherResource,
) -> MaterializeResult:
    shards = list(context.partition_keys)
    run_tags = dict(context.run.tags)
    profile = config.profile_name(run_tags)
    try:
        worker, gpu = config.resolve(run_tags)
    except ProfileError as exc:
        # the run's own config is wrong: the run-failure sensor must not retry it, nor Dagster the step
        raise Failure(str(exc), metadata={PERMANENT_FAILURE_KEY: CONFIG_ERROR}, allow_retries=False) from None
    model_path, tiny = gpu_model.resolved_model_path()
    if tiny:
        context.log.warning("analysing with the tiny random test model: its text is noise (set IMGPIPE_MODEL_PATH)")
    endpoints = gpu_model.ensure_endpoints(gpu)
    context.log.info(f"profile {profile}: {len(shards)} shard(s) {shards[0]}..{shards[-1]}, "
                     f"GPU servers {', '.join(endpoints)}")  # fmt: skip

    def progress(line: str, summary: RunSummary) -> None:
        context.log.info(line)
        # `imgpipe status` shows the breakers of live runs from these snapshots
        write_router_snapshot(context.run_id, summary.router)

    runner = ShardRunner(
        postgres.url(), context.run_id, shards, engine_settings(worker, fetcher.settings(worker)), endpoints,
        gpu_token=gpu_model.bearer_token(), progress=progress,
    )  # fmt: skip
    summary = runner.run()

    with postgres.connect() as conn:
        report = verify(conn, shards)
        parsing = parse_stats(conn, shards)

    metadata = {
        "profile": profile,
        "shards": MetadataValue.json(shards),
        "model": model_path + (" (tiny random test model: text is noise)" if tiny else ""),
    } | summary_metadata(summary)
    check_results = [checks.every_url_final(report), checks.analyses_parse(parsing, tiny), checks.failure_ratio(summary)]
    if not report.ok:
        context.log.error("verification failed:\n" + "\n".join(report.lines()))
    if report.unfinished and report.ok and sum(report.unfinished.values()) > summary.urls_waiting_for_retry:
        # URLs went back to the pool (GPU outage, or leased by another run): the shard is not done.
        raise Failure(
            f"{sum(report.unfinished.values())} URLs of {shards} are not final yet "
            f"({json.dumps(report.unfinished)}); they stay in the pool and a later run finishes them",
            metadata={k: v for k, v in metadata.items() if not isinstance(v, MetadataValue)},
        )
    return MaterializeResult(metadata=metadata, check_results=check_results)
