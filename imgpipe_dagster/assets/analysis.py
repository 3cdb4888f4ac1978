"""image_analysis[shard]: every URL of the run's shards fetched, analysed on the GPU servers and
stored in url_analysis_results, with checks that nothing was lost."""


import json

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    BackfillPolicy,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)

from imgpipe_dagster.assets.config import ImageAnalysisConfig
from imgpipe_dagster.engine.runner import ShardRunner
from imgpipe_dagster.engine.settings import engine_settings
from imgpipe_dagster.partitions import url_shards
from imgpipe_dagster.profiles import ProfileError
from imgpipe_dagster.resources import FetcherResource, GpuModelResource, PostgresResource
from imgpipe_dagster.status import write_router_snapshot
from imgpipe_dagster.store.verify import verify

# One run takes up to this many shards of a backfill, so the GPU servers stay busy between shards.
SHARDS_PER_BACKFILL_RUN = 4
# The failure-ratio check warns above the first and errors above the second share of failed URLs.
FAILURE_RATIO_WARN = 0.10
FAILURE_RATIO_ERROR = 0.50

# Below this share of analyses parsing as JSON, the prompt or the model is wrong.
MIN_PARSED_SHARE = 0.5

CHECK_COMPLETE = "every_url_final"
CHECK_PARSE = "analyses_parse"
CHECK_FAILURES = "failure_ratio"


@asset(
    partitions_def=url_shards,
    deps=[AssetKey("url_corpus")],
    backfill_policy=BackfillPolicy.multi_run(max_partitions_per_run=SHARDS_PER_BACKFILL_RUN),
    check_specs=[
        AssetCheckSpec(CHECK_COMPLETE, asset="image_analysis",
                       description="every URL of the shard is in exactly one final state with its result row"),
        AssetCheckSpec(CHECK_PARSE, asset="image_analysis",
                       description="analyses of successful URLs are non-empty and parse as JSON"),
        AssetCheckSpec(CHECK_FAILURES, asset="image_analysis",
                       description=f"failed URLs stay under {FAILURE_RATIO_WARN:.0%} (warn) / "
                                   f"{FAILURE_RATIO_ERROR:.0%} (error)"),
    ],  # fmt: skip
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
        raise Failure(str(exc)) from None
    model_path, tiny = gpu_model.resolved_model_path()
    if tiny:
        context.log.warning("analysing with the tiny random test model: its text is noise (set IMGPIPE_MODEL_PATH)")
    endpoints = gpu_model.ensure_endpoints(gpu)
    context.log.info(f"profile {profile}: {len(shards)} shard(s) {shards[0]}..{shards[-1]}, "
                     f"GPU servers {', '.join(endpoints)}")  # fmt: skip

    def progress(line: str, summary: dict) -> None:
        context.log.info(line)
        # `imgpipe status` shows the breakers of live runs from these snapshots
        write_router_snapshot(context.run_id, summary.get("router"))

    runner = ShardRunner(
        postgres.url(), context.run_id, shards, engine_settings(worker, fetcher.settings(worker)), endpoints,
        gpu_token=gpu_model.bearer_token(), progress=progress,
    )  # fmt: skip
    summary = runner.run()

    with postgres.connect() as conn:
        report = verify(conn, shards)
        parse_ok, parsed, empty = conn.execute(
            "SELECT count(*) FILTER (WHERE parse_ok), count(*), count(*) FILTER (WHERE coalesce(model_text, '') = '')"
            " FROM url_analysis_results WHERE shard_id = ANY(%s) AND status = 'ok'",
            (shards,),
        ).fetchone()

    counts = summary["final_state_counts"]
    finished = counts["done"] + counts["failed_permanent"]
    failure_ratio = counts["failed_permanent"] / finished if finished else 0.0
    metadata = {
        "profile": profile,
        "shards": MetadataValue.json(shards),
        "model": model_path + (" (tiny random test model: text is noise)" if tiny else ""),
        "urls_total": summary["urls_total"],
        "urls_done": counts["done"],
        "urls_failed": counts["failed_permanent"],
        "urls_unfinished": sum(counts[s] for s in ("pending", "leased", "failed_retryable")),
        "images_per_s": summary["images_per_s"],
        "elapsed_s": summary["elapsed_s"],
        "download_ms_p50": summary["download_ms_p50"] or 0.0,
        "download_ms_p95": summary["download_ms_p95"] or 0.0,
        "inference_ms_p50": summary["inference_ms_p50"] or 0.0,
        "inference_ms_p95": summary["inference_ms_p95"] or 0.0,
        "per_gpu": MetadataValue.json(summary["per_gpu"]),
        "failures_by_class": MetadataValue.json(summary["failures_by_class"]),
        "gpu_request_retries": summary["gpu_request_retries"],
        "failure_ratio": round(failure_ratio, 4),
        # URLs left in the pool with a due time (retries, deferred hosts): a later run finishes them
        "urls_waiting_for_retry": summary["waiting_for_retry"]["urls"],
        "next_retry_at": summary["waiting_for_retry"]["next_due_at"] or "",
        "last_retry_at": summary["waiting_for_retry"]["last_due_at"] or "",
        "downloads": MetadataValue.json(summary["downloads"]),
    }
    checks = [
        AssetCheckResult(
            check_name=CHECK_COMPLETE, passed=report.complete, severity=AssetCheckSeverity.ERROR,
            metadata={"report": MetadataValue.text("\n".join(report.lines())), "urls": report.urls,
                      "final": report.final, "unfinished": MetadataValue.json(report.unfinished),
                      "inconsistent": MetadataValue.json(report.inconsistent)},
        ),
        AssetCheckResult(
            # the tiny test model emits noise: only a real model is held to producing JSON
            check_name=CHECK_PARSE, passed=tiny or (empty == 0 and (parsed == 0 or parse_ok / parsed >= MIN_PARSED_SHARE)),
            severity=AssetCheckSeverity.WARN,
            metadata={"analyses": parsed, "parsed_json": parse_ok, "empty": empty,
                      "note": "tiny test model: JSON parsing not expected" if tiny else ""},
        ),
        AssetCheckResult(
            check_name=CHECK_FAILURES, passed=failure_ratio <= FAILURE_RATIO_WARN,
            severity=AssetCheckSeverity.ERROR if failure_ratio > FAILURE_RATIO_ERROR else AssetCheckSeverity.WARN,
            metadata={"failure_ratio": round(failure_ratio, 4), "failed": counts["failed_permanent"],
                      "finished": finished, "top_errors": MetadataValue.json(summary["failures_by_class"])},
        ),
    ]  # fmt: skip
    if not report.ok:
        context.log.error("verification failed:\n" + "\n".join(report.lines()))
    waiting = summary["waiting_for_retry"]["urls"]
    if report.unfinished and report.ok and sum(report.unfinished.values()) > waiting:
        # URLs went back to the pool (GPU outage, or leased by another run): the shard is not done.
        raise Failure(
            f"{sum(report.unfinished.values())} URLs of {shards} are not final yet "
            f"({json.dumps(report.unfinished)}); they stay in the pool and a later run finishes them",
            metadata={k: v for k, v in metadata.items() if not isinstance(v, MetadataValue)},
        )
    return MaterializeResult(metadata=metadata, check_results=checks)
