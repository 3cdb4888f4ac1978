"""Settings of the URL corpus ingest (no legacy .env equivalents: these are new)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class IngestSettings:
    # Name of the URL column in .csv/.tsv/.jsonl/.parquet inputs (ignored for .txt).
    url_column: str = "url"
    # URLs per shard; each shard is one Dagster partition of url_shards.
    shard_size: int = 10_000
    # Rows per batch read from Parquet (text formats use read_block_bytes instead).
    batch_rows: int = 200_000
    # Bytes of decompressed text read per batch for .txt/.csv/.tsv/.jsonl.
    read_block_bytes: int = 16 << 20
    # Longest accepted URL in UTF-8 bytes, after normalisation.
    max_url_length: int = 4096
    # Rejected lines kept per reason and file (with line numbers) in corpus_rejects.
    reject_samples_per_reason: int = 20
    # Characters of a rejected line kept in its sample.
    reject_sample_chars: int = 300
    # Batches prepared ahead of the database (each holds one batch's COPY buffer in memory).
    prefetch_batches: int = 2
    # Skip the per-row foreign-key triggers while loading, where the role may (superuser): every
    # corpus_urls row references a shard and file row created in the same transaction, so the checks
    # cannot fail, and they cost about two thirds of the insert time.
    skip_redundant_fk_checks: bool = True

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be at least 1, got {self.shard_size}")
        if not self.url_column:
            raise ValueError("url_column must not be empty")
