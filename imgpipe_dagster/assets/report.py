"""progress_report: the whole corpus at a glance (the legacy psql and redis-cli checks, as an asset)."""


from dagster import (
    AssetExecutionContext,
    AssetKey,
    AutomationCondition,
    MaterializeResult,
    MetadataValue,
    asset,
)

from imgpipe_dagster.assets.config import ASSET_OWNERS
from imgpipe_dagster.plots import compact_throughput_markdown, throughput_markdown
from imgpipe_dagster.resources import PostgresResource
from imgpipe_dagster.status import format_eta
from imgpipe_dagster.store.shard_report import results_query
from imgpipe_dagster.store.stats import progress, throughput_series

# The report refreshes by itself (the report_refresh automation sensor): after any shard
# materializes, and on this cron so rates and the ETA stay current while long runs are in progress.
REPORT_CRON = "*/15 * * * *"
REPORT_REFRESH = (
    AutomationCondition.any_deps_updated() | AutomationCondition.cron_tick_passed(REPORT_CRON)
).with_label("after a shard run or every 15 minutes") & ~AutomationCondition.in_progress()


@asset(
    deps=[AssetKey("image_analysis")],
    automation_condition=REPORT_REFRESH,
    owners=ASSET_OWNERS,
    tags={"imgpipe/stage": "report"},
    group_name="analysis",
    kinds={"postgres"},
    description="URLs total/done/failed/pending, rate over the last 10 minutes and hour, ETA of the backlog, "
    "top error classes and per-GPU rate.",
)
def progress_report(context: AssetExecutionContext, postgres: PostgresResource) -> MaterializeResult:
    with postgres.connect() as conn:
        p = progress(conn)
        series = throughput_series(conn, hours=24)
        (now,) = conn.execute("SELECT now()").fetchone()
    states = p.urls_by_state
    lines = [
        f"URLs: {p.urls_total} total, {states['done']} done, {states['failed_permanent']} failed, "
        f"{p.urls_unfinished} unfinished (pending {states['pending']}, leased {states['leased']}, "
        f"retry later {states['failed_retryable']})",
        f"shards: {p.shards_total} total, {p.shards_unfinished} unfinished",
        f"rate: {p.rate_10m_per_s * 60:.0f} URLs/min (10 min), {p.rate_1h_per_s * 60:.0f} URLs/min (1 h)",
        f"ETA of the backlog: {format_eta(p.eta_s)}",
    ]
    context.log.info("\n".join(lines))
    return MaterializeResult(
        metadata={
            "summary": MetadataValue.md("\n".join(f"- {line}" for line in lines)),
            # inline in the UI (short Markdown); the detailed chart opens with [Show Markdown]
            "throughput_24h": MetadataValue.md(compact_throughput_markdown(series, now)),
            "throughput_24h_detail": MetadataValue.md(throughput_markdown(series, now)),
            # every analysis, for psql (`imgpipe db url` prints the connection string)
            "results_query": MetadataValue.text(results_query()),
            "urls_total": p.urls_total,
            "urls_done": states["done"],
            "urls_failed": states["failed_permanent"],
            "urls_unfinished": p.urls_unfinished,
            "shards_unfinished": p.shards_unfinished,
            "urls_per_min_10m": round(p.rate_10m_per_s * 60, 1),
            "urls_per_min_1h": round(p.rate_1h_per_s * 60, 1),
            "eta": format_eta(p.eta_s),
            "eta_s": round(p.eta_s or 0.0),
            "top_errors_24h": MetadataValue.json(dict(p.top_errors_24h)),
            "per_gpu_images_per_s_10m": MetadataValue.json({k: round(v, 2) for k, v in p.per_gpu_10m.items()}),
        }
    )
