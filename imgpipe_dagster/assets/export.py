"""analysis_export[shard]: each shard's stored results as one Parquet file (store/export.py does the work)."""

from typing import Optional

from dagster import (
    AssetExecutionContext,
    AssetKey,
    BackfillPolicy,
    Config,
    MaterializeResult,
    MetadataValue,
    asset,
)
from pydantic import Field

from imgpipe_dagster.partitions import url_shards
from imgpipe_dagster.resources import PostgresResource
from imgpipe_dagster.store.export import (
    EXPORT_SCHEMA_VERSION,
    MANIFEST_NAME,
    default_base_uri,
    export_shard,
    update_manifest,
)
from imgpipe_dagster.store.results import DEFAULT_BATCH_ROWS
from imgpipe_dagster.store.work import UNFINISHED_STATES, shard_state_counts

# Exporting a shard takes about a second: a backfill over thousands of shards runs them in batches.
SHARDS_PER_EXPORT_RUN = 50


class AnalysisExportConfig(Config):
    base_uri: Optional[str] = Field(  # noqa: UP045 - Dagster reads typing.Optional
        default=None, description="directory or pyarrow URI (s3://bucket/prefix, ...); empty: "
        "$IMGPIPE_EXPORT_URI, else $IMGPIPE_HOME/export")
    batch_rows: int = Field(default=DEFAULT_BATCH_ROWS, ge=1, description="rows per streamed batch = Parquet row group")
    analysis_version: Optional[str] = Field(  # noqa: UP045
        default=None, description="only results of this analysis (prompt) version; empty: all")


@asset(
    partitions_def=url_shards,
    deps=[AssetKey("image_analysis")],
    backfill_policy=BackfillPolicy.multi_run(max_partitions_per_run=SHARDS_PER_EXPORT_RUN),
    group_name="analysis",
    kinds={"parquet"},
    description="The shard's results as <base>/<shard>.parquet (zstd, typed columns, parsed analysis next to the "
    "raw text, versions in the file metadata) and an entry in <base>/_manifest.json; reads with pandas, DuckDB.",
)
def analysis_export(
    context: AssetExecutionContext, config: AnalysisExportConfig, postgres: PostgresResource
) -> MaterializeResult:
    base = config.base_uri or default_base_uri()
    shards = list(context.partition_keys)
    with postgres.connect() as conn:
        files = [
            export_shard(conn, shard, base, batch_rows=config.batch_rows, analysis_version=config.analysis_version)
            for shard in shards
        ]
        states = shard_state_counts(conn, shards)
    unfinished = sum(states[state] for state in UNFINISHED_STATES)
    if unfinished:  # exported anyway: the files hold what is final now, a later export adds the rest
        context.log.warning(f"{unfinished} URLs of {shards} are not final yet; their rows are not in the export")
    manifest = update_manifest(base, files)
    for item in files:
        context.log.info(f"{item.shard_id}: {item.rows} rows in {item.batches} row group(s), {item.bytes} bytes "
                         f"-> {base}/{item.file}")  # fmt: skip
    return MaterializeResult(metadata={
        "base_uri": base,
        "manifest": f"{base}/{MANIFEST_NAME}",
        "rows": sum(item.rows for item in files),
        "files": MetadataValue.json({item.file: {"rows": item.rows, "row_groups": item.batches, "bytes": item.bytes}
                                     for item in files}),
        "models": MetadataValue.json(sorted({m for item in files for m in item.models})),
        "prompt_versions": MetadataValue.json(sorted({p for item in files for p in item.prompt_versions})),
        "export_schema_version": EXPORT_SCHEMA_VERSION,
        "manifest_rows": manifest["rows"],
        "urls_not_final": unfinished,
    })  # fmt: skip
