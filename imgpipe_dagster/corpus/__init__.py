"""URL corpus: read URL files of any common shape, normalise and validate, dedupe, load into
PostgreSQL and cut into shards (no Dagster here; see imgpipe_dagster.assets.corpus for the asset)."""

from imgpipe_dagster.corpus.errors import CorpusInputError
from imgpipe_dagster.corpus.ingest import FileReport, IngestReport, ingest_files
from imgpipe_dagster.corpus.normalize import UrlRejected, normalise_url
from imgpipe_dagster.corpus.settings import IngestSettings
from imgpipe_dagster.corpus.shards import corpus_totals, shard_id, sync_shard_partitions

__all__ = [
    "CorpusInputError",
    "FileReport",
    "IngestReport",
    "IngestSettings",
    "UrlRejected",
    "corpus_totals",
    "ingest_files",
    "normalise_url",
    "shard_id",
    "sync_shard_partitions",
]
