"""url_corpus: URL files ingested into corpus_urls, their new shards added as url_shards partitions.

The work is imgpipe_dagster.corpus.ingest_files (no Dagster there); this asset passes its config,
logs progress, keeps the dynamic partitions equal to the shards table, and reports the figures.
"""

import json
import time

import psycopg
from dagster import (
    AssetCheckEvaluation,
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetMaterialization,
    Config,
    DagsterInstance,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)
from pydantic import Field

from imgpipe_dagster.assets.config import ASSET_OWNERS
from imgpipe_dagster.corpus import CorpusInputError, IngestReport, ingest_files, sync_shard_partitions
from imgpipe_dagster.corpus.shards import shard_ids
from imgpipe_dagster.partitions import url_shards
from imgpipe_dagster.resources import PostgresResource

# Seconds between progress lines in the run log during a long ingest.
PROGRESS_LOG_EVERY_S = 15.0
# Rejected-line samples shown in the materialization (all of them are in corpus_rejects).
SAMPLES_SHOWN = 20


class UrlCorpusConfig(Config):
    paths: list[str] = Field(
        default_factory=list,
        description="URL files to ingest (.txt/.csv/.tsv/.jsonl/.parquet, optionally .gz/.zst); globs allowed",
    )
    glob: str | None = Field(default=None, description="a glob pattern of files to ingest, added to paths")
    url_column: str = Field(default="url", description="the URL column of .csv/.tsv/.jsonl/.parquet files")
    shard_size: int = Field(default=10_000, ge=1, description="URLs per shard (one url_shards partition each)")


def _progress_logger(context: AssetExecutionContext):
    last = [time.monotonic()]

    def log_progress(state: dict) -> None:
        now = time.monotonic()
        if now - last[0] >= PROGRESS_LOG_EVERY_S:
            last[0] = now
            context.log.info(
                f"ingest: {state['rows_read']:,} rows read, {state['added']:,} new URLs, "
                f"{state['urls_per_s']:,.0f} rows/s ({state['file']})"
            )

    return log_progress


def report_metadata(report: IngestReport, partitions_added: int) -> dict:
    samples = report.rejected_samples[:SAMPLES_SHOWN]
    rows = []
    for sample in samples:
        value = sample["value"][:80].replace("|", "\\|").replace("`", "'")
        rows.append(f"| {sample['path'].rsplit('/', 1)[-1]} | {sample['line']} | {sample['reason']} | `{value}` |\n")
    sample_table = "| file | line | reason | value |\n|---|---|---|---|\n" + "".join(rows)
    shards = report.shards_added
    return {
        "rows_read": report.rows_read,
        "valid": report.valid,
        "urls_added": report.added,
        "duplicates": report.duplicates,
        "rejected": report.rejected,
        "rejected_by_reason": MetadataValue.json(report.rejected_by_reason),
        "rejected_samples": MetadataValue.md(sample_table if samples else "none"),
        "shards_added": len(shards),
        "shard_range": f"{shards[0]} … {shards[-1]}" if shards else "none",
        "partitions_added": partitions_added,
        "files": MetadataValue.json([
            {k: f[k] for k in ("path", "format", "skipped", "rows_read", "added", "duplicates", "rejected")}
            for f in report.files
        ]),
        "corpus_urls": report.corpus_totals.get("urls", 0),
        "corpus_shards": report.corpus_totals.get("shards", 0),
        "corpus_files": report.corpus_totals.get("files", 0),
        "elapsed_s": report.elapsed_s,
        "urls_per_s": report.urls_per_s,
    }


def _sync_after(context: AssetExecutionContext, conn) -> list[str]:
    try:
        if conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
            conn.rollback()
        return sync_shard_partitions(context.instance, conn, partitions_name=url_shards.name)
    except (psycopg.Error, OSError) as exc:  # never hide the ingest's own failure behind this one
        context.log.warning(f"could not sync url_shards partitions: {exc}")
        return []


CHECK_PARTITIONS = "partitions_match_shards"
URL_CORPUS_KEY = AssetKey("url_corpus")


@asset(
    name="url_corpus",
    kinds={"postgres"},
    group_name="corpus",
    owners=ASSET_OWNERS,
    tags={"imgpipe/stage": "corpus"},
    check_specs=[AssetCheckSpec(CHECK_PARTITIONS, asset="url_corpus",
                                description="the url_shards partitions are exactly the shards table's ids")],
    description="URL files ingested into corpus_urls (normalised, deduplicated) and cut into url_shards partitions.",
)
def url_corpus(context: AssetExecutionContext, config: UrlCorpusConfig, postgres: PostgresResource) -> MaterializeResult:
    paths = [*config.paths, *([config.glob] if config.glob else [])]
    if not paths:
        raise Failure(description="url_corpus needs files: set paths (or glob) in the run config")
    with postgres.connect() as conn:
        try:
            report = ingest_files(conn, paths, url_column=config.url_column, shard_size=config.shard_size,
                                  progress=_progress_logger(context))
        except CorpusInputError as exc:
            raise Failure(description=str(exc)) from exc
        finally:
            # Also after a failure: files before the bad one were committed and their shards must show.
            added = _sync_after(context, conn)
    context.log.info(
        f"ingested {report.rows_read:,} rows: {report.added:,} new URLs in {len(report.shards_added)} shards, "
        f"{report.duplicates:,} duplicates, {report.rejected:,} rejected {json.dumps(report.rejected_by_reason)}"
    )
    with postgres.connect() as conn:
        passed, check_metadata = partitions_check(conn, context.instance)
    check = AssetCheckResult(check_name=CHECK_PARTITIONS, passed=passed, metadata=check_metadata)
    return MaterializeResult(metadata=report_metadata(report, len(added)), check_results=[check])


def partitions_check(conn, instance: DagsterInstance) -> tuple[bool, dict]:
    """(passed, metadata) of the partitions_match_shards check: url_shards equals the shards table."""
    shards = set(shard_ids(conn))
    partitions = set(instance.get_dynamic_partitions(url_shards.name))
    return shards == partitions, {
        "shards": len(shards), "partitions": len(partitions),
        "missing_partitions": MetadataValue.json(sorted(shards - partitions)[:20]),
        "partitions_without_shard": MetadataValue.json(sorted(partitions - shards)[:20]),
    }  # fmt: skip


def record_ingest_outside_a_run(instance: DagsterInstance, conn, report: IngestReport, partitions_added: int,
                                source: str) -> None:  # fmt: skip
    """An ingest done outside Dagster (`imgpipe ingest`, `imgpipe demo`) recorded as a run would:
    a url_corpus materialization with the asset's metadata and an evaluation of its check, so the UI
    shows the corpus as it is and does not offer to materialize it again upstream of image_analysis."""
    instance.report_runless_asset_event(AssetMaterialization(
        asset_key=URL_CORPUS_KEY, metadata=report_metadata(report, partitions_added), tags={"imgpipe/source": source},
    ))  # fmt: skip
    passed, metadata = partitions_check(conn, instance)
    instance.report_runless_asset_event(AssetCheckEvaluation(
        asset_key=URL_CORPUS_KEY, check_name=CHECK_PARTITIONS, passed=passed, metadata=metadata,
    ))  # fmt: skip
