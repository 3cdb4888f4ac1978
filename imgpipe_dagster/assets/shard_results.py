"""Per-shard truth for image_analysis: a run of several shards records, for each shard (partition),
its own materialization metadata (counts, rate, latency, failure classes, a sample of results) and
its own asset check results, so the partition view, its plots and a backfill's page show what
happened to that shard and not a sum over the run.

Dagster turns a check result returned from a multi-partition step into one evaluation without a
partition, so the checks are emitted here as one ``AssetCheckEvaluation`` per shard instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import psycopg
from dagster import (
    AssetCheckEvaluation,
    AssetExecutionContext,
    AssetRecordsFilter,
    MetadataValue,
    Output,
    TableColumn,
    TableRecord,
    TableSchema,
)
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)

from imgpipe_dagster.assets import checks
from imgpipe_dagster.store.shard_report import (
    ResultSample,
    ShardFigures,
    results_query,
    results_sample,
    shard_figures,
)
from imgpipe_dagster.store.stats import ParseStats, parse_stats
from imgpipe_dagster.store.verify import VerifyReport, verify

SAMPLE_SCHEMA = TableSchema(columns=[
    TableColumn("url", "string"), TableColumn("size", "string", description="bytes, width x height"),
    TableColumn("caption", "string", description="the caption, else the first words of the model's text"),
    TableColumn("error_class", "string"),
])  # fmt: skip


@dataclass(frozen=True)
class ShardOutcome:
    figures: ShardFigures
    report: VerifyReport
    parsing: ParseStats
    sample: list[ResultSample]


def read_shard_outcomes(
    conn: psycopg.Connection, shards: Sequence[str], run_id: str, analysis_version: str
) -> dict[str, ShardOutcome]:
    """Each shard's figures of this run, and its verification, parse statistics and sample under the
    run's analysis version."""
    figures = shard_figures(conn, shards, run_id)
    return {
        shard: ShardOutcome(figures[shard], verify(conn, [shard], analysis_version=analysis_version),
                            parse_stats(conn, [shard], analysis_version),
                            results_sample(conn, shard, analysis_version))
        for shard in shards
    }  # fmt: skip


def _ms(value: float | None) -> float:
    return round(float(value), 1) if value is not None else 0.0  # a number, so the UI can plot it


def _size(row: ResultSample) -> str:
    if row.bytes is None:
        return ""
    kib = f"{row.bytes / 1024:.1f} KiB"
    return f"{kib}, {row.width}x{row.height}" if row.width and row.height else kib


def sample_table(sample: list[ResultSample]) -> MetadataValue:
    records = [
        TableRecord({"url": row.url, "size": _size(row), "caption": " ".join(row.text.split()),
                     "error_class": row.error_class or ""})
        for row in sample
    ]  # fmt: skip
    return MetadataValue.table(records=records, schema=SAMPLE_SCHEMA)


def shard_metadata(outcome: ShardOutcome, elapsed_s: float) -> dict:
    """One shard's figures, for the materialization of its partition."""
    f = outcome.figures
    elapsed = max(elapsed_s, 1e-9)
    return {
        "urls_total": f.urls_total,
        "urls_done": f.state_counts.get("done", 0),
        "urls_failed": f.state_counts.get("failed_permanent", 0),
        "urls_unfinished": f.urls_unfinished,
        "urls_waiting_for_retry": f.state_counts.get("failed_retryable", 0),
        "urls_written_by_run": f.results_written,
        "images_per_s": round((f.results_written - f.failed_written) / elapsed, 2),
        "download_ms_p50": _ms(f.download_ms_p50),
        "download_ms_p95": _ms(f.download_ms_p95),
        "inference_ms_p50": _ms(f.inference_ms_p50),
        "inference_ms_p95": _ms(f.inference_ms_p95),
        "per_gpu": MetadataValue.json({
            gpu: {"images": n, "images_per_s": round(n / elapsed, 2)} for gpu, n in f.images_by_gpu.items()
        }),  # fmt: skip
        "failures_by_class": MetadataValue.json(f.failures_by_class),
        "failure_ratio": round(f.failure_ratio, 4),
        "results_sample": sample_table(outcome.sample),
        "results_query": MetadataValue.text(results_query(f.shard_id)),
    }


def _latest_materialization(context: AssetExecutionContext, shard: str):
    records = context.instance.fetch_materializations(
        AssetRecordsFilter(asset_key=context.asset_key, asset_partitions=[shard]), limit=1
    ).records
    if not records:
        return None
    record = records[0]
    return AssetCheckEvaluationTargetMaterializationData(
        run_id=record.event_log_entry.run_id, storage_id=record.storage_id, timestamp=record.timestamp
    )


def check_events(context: AssetExecutionContext, outcomes: dict[str, ShardOutcome], tiny_model: bool) -> Iterator:
    """Each shard's check evaluations (after its materialization, which they point at), then the empty
    outputs Dagster expects of the check steps."""
    specs = {spec.name: spec for spec in context.assets_def.check_specs}
    for shard, outcome in outcomes.items():
        target = _latest_materialization(context, shard)
        for result in (checks.every_url_final(outcome.report), checks.analyses_parse(outcome.parsing, tiny_model),
                       checks.failure_ratio(outcome.figures)):  # fmt: skip
            yield AssetCheckEvaluation(
                asset_key=context.asset_key, check_name=result.check_name, passed=result.passed,
                metadata=result.metadata, severity=result.severity, blocking=specs[result.check_name].blocking,
                partition=shard, target_materialization_data=target,
            )  # fmt: skip
    for output_name in context.assets_def.node_check_specs_by_output_name:
        yield Output(None, output_name=output_name)
