"""Results as files: one file per shard (Parquet with zstd, or JSON lines, or CSV) under a base
path on any filesystem pyarrow opens by URI (a local directory, ``file://``, ``s3://``, ``gs://``...),
plus a ``_manifest.json`` that lists the files, their row counts and versions.

A shard is streamed from PostgreSQL (``store.results``) one batch at a time and each batch becomes
one Parquet row group, so memory stays at one batch whatever the shard's size. A file is written
under a temporary name and moved into place, so a reader never sees half a file.
"""

from __future__ import annotations

import io
import json
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import psycopg
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from imgpipe_dagster.environment import read_environment
from imgpipe_dagster.paths import imgpipe_home
from imgpipe_dagster.store.errors import ConfigurationError
from imgpipe_dagster.store.results import DEFAULT_BATCH_ROWS, EXPORT_FORMATS, RESULT_FIELDS, stream_results

# Bump when a column is added, renamed or retyped; readers find it in every file and the manifest.
EXPORT_SCHEMA_VERSION = "2"
FORMATS = EXPORT_FORMATS
MANIFEST_NAME = "_manifest.json"
METADATA_PREFIX = "imgpipe."
_SHARD_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")

SCHEMA = pa.schema([
    ("url", pa.string()),
    ("shard_id", pa.string()),
    ("status", pa.string()),                 # ok / failed
    ("error_class", pa.string()),
    ("error_message", pa.string()),
    ("http_status", pa.int32()),
    ("content_type", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("format", pa.string()),
    ("bytes", pa.int64()),
    ("sha256", pa.string()),
    ("phash", pa.int64()),
    # the model's JSON answer, parsed (gpu_server/analysis_parse.py), next to its raw text
    ("caption", pa.string()),
    ("tags", pa.list_(pa.string())),
    ("objects", pa.list_(pa.string())),
    ("text", pa.string()),
    ("safety_nsfw", pa.bool_()),
    ("safety_violence", pa.bool_()),
    ("safety_rating", pa.string()),
    ("parse_ok", pa.bool_()),
    ("model_text", pa.string()),
    ("model", pa.string()),
    ("prompt_version", pa.string()),
    ("analysis_version", pa.string()),       # prompt + model (docs/VERSIONS.md)
    ("reused", pa.bool_()),                  # copied from an identical image's analysis, no GPU time
    ("prompt_tokens", pa.int32()),
    ("generated_tokens", pa.int32()),
    ("download_ms", pa.float32()),
    ("inference_ms", pa.float32()),
    ("gpu", pa.string()),
    ("attempts", pa.int32()),
    ("created_at", pa.timestamp("us", tz="UTC")),
])  # fmt: skip

_LIST_COLUMNS = ("tags", "objects")
_FIELD_INDEX = {name: i for i, name in enumerate(RESULT_FIELDS)}


class ExportError(ConfigurationError):
    """A bad base path, format or shard name; the message says what to change."""


@dataclass
class ExportedFile:
    """One shard's file, as listed in the manifest and the Dagster metadata."""

    shard_id: str
    file: str  # name relative to the base path
    format: str
    rows: int
    batches: int  # Parquet row groups (one per streamed batch)
    bytes: int
    models: list[str] = field(default_factory=list)
    prompt_versions: list[str] = field(default_factory=list)
    analysis_version: str | None = None
    export_schema_version: str = EXPORT_SCHEMA_VERSION
    exported_at: str = ""


# -- the parsed analysis as typed columns ------------------------------------------------------------


def _text_or_none(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _string_list(value) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):  # a model that answered "a, b" instead of ["a", "b"]
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, list):
        return [item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)
                for item in value if item is not None]  # fmt: skip
    return [_text_or_none(value)]


def _flag(value) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "false", "no", "0"):
        return value.strip().lower() in ("true", "yes", "1")
    if isinstance(value, int | float):
        return bool(value)
    return None


def analysis_fields(analysis) -> dict:
    """The parsed answer's fields as typed values; whatever the model wrote that does not fit a
    field's type stays readable (as JSON text) or None, and the raw text is exported beside it."""
    parsed = analysis if isinstance(analysis, dict) else {}
    safety = parsed.get("safety")
    nsfw = violence = rating = None
    if isinstance(safety, dict):
        nsfw, violence = _flag(safety.get("nsfw")), _flag(safety.get("violence"))
        rating = _text_or_none(safety.get("rating"))
    elif safety is not None:
        rating = _text_or_none(safety)
    return {
        "caption": _text_or_none(parsed.get("caption")),
        "tags": _string_list(parsed.get("tags")),
        "objects": _string_list(parsed.get("objects")),
        "text": _text_or_none(parsed.get("text")),
        "safety_nsfw": nsfw,
        "safety_violence": violence,
        "safety_rating": rating,
    }


def record_batch(rows: Sequence[tuple]) -> pa.RecordBatch:
    """Result rows (``RESULT_FIELDS`` tuples) as one batch of ``SCHEMA``."""
    columns: dict[str, list] = {name: [] for name in SCHEMA.names}
    analysis_at = _FIELD_INDEX["analysis"]
    plain = [name for name in SCHEMA.names if name in _FIELD_INDEX]
    for row in rows:
        for name in plain:
            columns[name].append(row[_FIELD_INDEX[name]])
        for name, value in analysis_fields(row[analysis_at]).items():
            columns[name].append(value)
    return pa.RecordBatch.from_pydict(columns, schema=SCHEMA)


# -- where the files go ------------------------------------------------------------------------------


def default_base_uri() -> str:
    """``$IMGPIPE_EXPORT_URI``, else ``$IMGPIPE_HOME/export``."""
    return read_environment().export_uri or str(imgpipe_home() / "export")


def open_base(base_uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the base path inside it; a plain path is a local directory."""
    if not base_uri.strip():
        raise ExportError("the export base path is empty; give a directory or a URI such as s3://bucket/prefix")
    uri = base_uri if "://" in base_uri else str(Path(base_uri).expanduser().resolve())
    try:
        filesystem, path = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"cannot open export base {base_uri!r}: {first_line}") from None
    filesystem.create_dir(path, recursive=True)
    return filesystem, path.rstrip("/")


def file_name(shard_id: str, fmt: str) -> str:
    if not _SHARD_NAME_RE.match(shard_id):
        raise ExportError(f"shard id {shard_id!r} cannot name a file (letters, digits, '_', '.', '-' only)")
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    return f"{shard_id}.{fmt}"


# -- writers: one per format, each fed batch by batch ------------------------------------------------


class _ParquetSink:
    def __init__(self, stream) -> None:
        self._writer = pq.ParquetWriter(stream, SCHEMA, compression="zstd")

    def write(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(batch)  # one call, one row group

    def close(self, versions: dict[str, str]) -> None:
        self._writer.add_key_value_metadata(versions)
        self._writer.close()


class _TextSink:
    """JSON lines (one object per row, lists as arrays) or CSV (through pandas, lists as JSON text in
    their cells), a batch at a time."""

    def __init__(self, stream, fmt: str) -> None:
        self._stream, self._fmt, self._header = stream, fmt, True

    def write(self, batch: pa.RecordBatch) -> None:
        text = self._csv(batch) if self._fmt == "csv" else "".join(
            json.dumps(_plain(row), ensure_ascii=False) + "\n" for row in batch.to_pylist())
        self._header = False
        self._stream.write(text.encode("utf-8"))

    def _csv(self, batch: pa.RecordBatch) -> str:
        frame = batch.to_pandas(types_mapper=pd.ArrowDtype)
        frame["created_at"] = [None if t is None else t.isoformat() for t in batch.column("created_at").to_pylist()]
        for name in _LIST_COLUMNS:
            frame[name] = [None if v is None else json.dumps(v, ensure_ascii=False)
                           for v in batch.column(name).to_pylist()]  # fmt: skip
        return frame.to_csv(index=False, header=self._header, lineterminator="\n")

    def close(self, versions: dict[str, str]) -> None:  # text formats carry versions in the manifest only
        pass


_FLOAT32_COLUMNS = tuple(f.name for f in SCHEMA if f.type == pa.float32())


def _plain(row: dict) -> dict:
    """A row as JSON values: times in ISO 8601, float32 timings without float64 noise (12.3, not 12.30000019)."""
    row["created_at"] = row["created_at"].isoformat() if row["created_at"] is not None else None
    for name in _FLOAT32_COLUMNS:
        if row[name] is not None:
            row[name] = float(f"{row[name]:.7g}")
    return row


def export_shard(
    conn: psycopg.Connection,
    shard_id: str,
    base_uri: str,
    fmt: str = "parquet",
    *,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    analysis_version: str | None = None,
) -> ExportedFile:
    """Write one shard's results to ``<base>/<shard_id>.<fmt>`` (replacing an earlier export)."""
    name = file_name(shard_id, fmt)
    filesystem, base = open_base(base_uri)
    final, temporary = f"{base}/{name}", f"{base}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
    exported = ExportedFile(shard_id=shard_id, file=name, format=fmt, rows=0, batches=0, bytes=0,
                            analysis_version=analysis_version)  # fmt: skip
    models: set[str] = set()
    prompts: set[str] = set()
    versions_seen: set[str] = set()
    try:
        with filesystem.open_output_stream(temporary) as stream:
            sink = _ParquetSink(stream) if fmt == "parquet" else _TextSink(stream, fmt)
            for rows in stream_results(conn, [shard_id], analysis_version=analysis_version, batch_rows=batch_rows):
                batch = record_batch(rows)
                sink.write(batch)
                exported.rows += batch.num_rows
                exported.batches += 1
                models.update(v for v in batch.column("model").to_pylist() if v)
                prompts.update(v for v in batch.column("prompt_version").to_pylist() if v)
                versions_seen.update(v for v in batch.column("analysis_version").to_pylist() if v)
            exported.models, exported.prompt_versions = sorted(models), sorted(prompts)
            # asked for none: the shard's bound version, which every row read carries
            exported.analysis_version = analysis_version or ",".join(sorted(versions_seen)) or None
            sink.close(file_metadata(exported))
        filesystem.move(temporary, final)
    except BaseException:
        _delete_quietly(filesystem, temporary)
        raise
    exported.bytes = filesystem.get_file_info(final).size or 0
    exported.exported_at = datetime.now(UTC).isoformat(timespec="seconds")
    return exported


def file_metadata(exported: ExportedFile) -> dict[str, str]:
    """Key-value metadata of a Parquet file: the versions a reader needs to trust its rows."""
    return {
        f"{METADATA_PREFIX}export_schema_version": exported.export_schema_version,
        f"{METADATA_PREFIX}shard_id": exported.shard_id,
        f"{METADATA_PREFIX}models": json.dumps(exported.models),
        f"{METADATA_PREFIX}prompt_versions": json.dumps(exported.prompt_versions),
        f"{METADATA_PREFIX}analysis_version": exported.analysis_version or "",
        f"{METADATA_PREFIX}rows": str(exported.rows),
    }


def _delete_quietly(filesystem: pafs.FileSystem, path: str) -> None:
    try:
        filesystem.delete_file(path)
    except (OSError, pa.ArrowException):
        pass


# -- the manifest --------------------------------------------------------------------------------------


def update_manifest(base_uri: str, exported: Iterable[ExportedFile]) -> dict:
    """Merge these files' entries into ``<base>/_manifest.json`` (an entry per file name, the newest
    wins) and return the manifest. On a local directory a lock keeps concurrent shard runs from
    losing each other's entries; on an object store two writers at once can lose one's entries, and
    exporting those shards again writes them back."""
    filesystem, base = open_base(base_uri)
    if isinstance(filesystem, pafs.LocalFileSystem):
        from filelock import FileLock

        with FileLock(f"{base}/.manifest.lock", timeout=60):
            return _merge_manifest(filesystem, base, exported)
    return _merge_manifest(filesystem, base, exported)


def _merge_manifest(filesystem: pafs.FileSystem, base: str, exported: Iterable[ExportedFile]) -> dict:
    path = f"{base}/{MANIFEST_NAME}"
    entries: dict[str, dict] = {}
    if filesystem.get_file_info(path).type == pafs.FileType.File:
        try:
            with filesystem.open_input_stream(path) as stream:
                entries = {entry["file"]: entry for entry in json.loads(stream.read()).get("files", [])}
        except (ValueError, KeyError, TypeError, AttributeError):
            entries = {}  # an unreadable manifest is rebuilt from what this export knows
    for item in exported:
        entries[item.file] = asdict(item)
    files = [entries[name] for name in sorted(entries)]
    manifest = {
        "export_schema_version": EXPORT_SCHEMA_VERSION,
        "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows": sum(entry["rows"] for entry in files),
        "models": sorted({m for entry in files for m in entry.get("models", [])}),
        "prompt_versions": sorted({p for entry in files for p in entry.get("prompt_versions", [])}),
        "files": files,
    }
    temporary = f"{base}/.{MANIFEST_NAME}.{uuid.uuid4().hex[:8]}.tmp"
    with filesystem.open_output_stream(temporary) as stream:
        stream.write(json.dumps(manifest, indent=1).encode("utf-8"))
    filesystem.move(temporary, path)
    return manifest


def read_manifest(base_uri: str) -> dict:
    filesystem, base = open_base(base_uri)
    with filesystem.open_input_stream(f"{base}/{MANIFEST_NAME}") as stream:
        return json.load(io.BytesIO(stream.read()))


def export_shards(
    conn: psycopg.Connection,
    shard_ids: Sequence[str],
    base_uri: str,
    fmt: str = "parquet",
    *,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    analysis_version: str | None = None,
) -> list[ExportedFile]:
    """Export each shard, then record them all in the manifest at once."""
    exported = [
        export_shard(conn, shard, base_uri, fmt, batch_rows=batch_rows, analysis_version=analysis_version)
        for shard in shard_ids
    ]
    update_manifest(base_uri, exported)
    return exported
