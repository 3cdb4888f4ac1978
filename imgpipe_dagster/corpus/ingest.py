"""Load URL files into corpus_urls and cut the new URLs into shards.

One transaction per file: its corpus_files row, its URLs and its shards appear together or not at all.
Per file, a reader thread streams batches (read, normalise, hash, dedupe within the batch, render as
CSV) while this thread loads the previous batch: COPY into a temporary staging table, then one
INSERT … SELECT that drops URLs already in the corpus (including earlier batches of this file) and
numbers the new ones in file order, so shard N+1 starts where shard N ends. A file whose content was
ingested before is skipped; a new file only ever adds new shards holding new URLs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
from psycopg import sql

from imgpipe_dagster.corpus.errors import CorpusInputError
from imgpipe_dagster.corpus.normalize import OK, REASONS, decode_utf8, normalise_batch
from imgpipe_dagster.corpus.settings import IngestSettings
from imgpipe_dagster.corpus.shards import corpus_totals, shard_key_sql
from imgpipe_dagster.corpus.sources import (
    JSON_LINE,
    RawBatch,
    SourceFile,
    expand_paths,
    identify,
    read_batches,
)

log = logging.getLogger("imgpipe.corpus")

# Serialises ingests on one database: shard numbers are handed out by max(shard_no) + 1.
_INGEST_LOCK_KEY = 0x1A9B_C0A5
_STAGE = "corpus_ingest_stage"

ProgressCallback = Callable[[dict], None]


@dataclass(kw_only=True)
class IngestCounts:
    """What was read and kept: of one file, or summed over an ingest's files."""

    rows_read: int = 0
    valid: int = 0
    added: int = 0
    duplicates: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)

    @property
    def rejected(self) -> int:
        return sum(self.rejected_by_reason.values())

    def add(self, other: IngestCounts) -> None:
        self.rows_read += other.rows_read
        self.valid += other.valid
        self.added += other.added
        self.duplicates += other.duplicates
        for reason, count in other.rejected_by_reason.items():
            self.rejected_by_reason[reason] = self.rejected_by_reason.get(reason, 0) + count


@dataclass(kw_only=True)
class FileReport(IngestCounts):
    path: str
    format: str
    content_sha256: str
    file_id: int | None = None
    skipped: bool = False  # the same content was ingested before (file_id names that ingest)
    shards_added: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0


@dataclass(kw_only=True)
class IngestReport(IngestCounts):
    # Up to IngestSettings.reject_samples_per_reason per reason and file: {path, line, reason, value}.
    rejected_samples: list[dict] = field(default_factory=list)
    shards_added: list[str] = field(default_factory=list)
    files: list[dict] = field(default_factory=list)
    elapsed_s: float = 0.0
    urls_per_s: float = 0.0  # rows read per second of the whole call
    corpus_totals: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self) | {"rejected": self.rejected}


# ---------------------------------------------------------------- reader side


@dataclass
class _Column:
    """A metadata column as staged: its jsonb key, staging name and PostgreSQL type."""

    key: str
    stage_name: str
    pg_type: str


@dataclass
class _Prepared:
    csv: pa.Buffer  # COPY … (FORMAT csv) payload
    staged: int  # rows in the payload
    rows_read: int
    valid: int
    reason_counts: np.ndarray
    samples: list[tuple[int | None, str, str]]
    columns: list[_Column]


def _sample_text(value, limit: int) -> str:
    """A rejected value as printable text: invalid bytes and control characters escaped."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value[: limit * 4].decode("utf-8", "backslashreplace")
    shown = "".join(ch if ch >= " " and ch != "\x7f" else ch.encode("unicode_escape").decode() for ch in value[:limit])
    return shown + ("…" if len(value) > limit else "")


def _text_column(values: pa.Array) -> pa.Array:
    """Metadata text as PostgreSQL can store it: valid UTF-8, NUL replaced (text and jsonb refuse it)."""
    if pa.types.is_binary(values.type) or pa.types.is_large_binary(values.type):
        text, invalid = decode_utf8(values)
        if invalid.any():
            repaired = [raw.decode("utf-8", "replace") if raw is not None else None
                        for raw in values.filter(pa.array(invalid)).to_pylist()]
            positions = np.cumsum(invalid) - 1
            patch = pa.array(repaired, pa.large_string()).take(pa.array(np.maximum(positions, 0)))
            text = pc.if_else(pa.array(invalid), patch, text)
    else:
        text = values.cast(pa.large_string())
    return pc.replace_substring(text, "\x00", "\ufffd")


def _stage_metadata(name: str, values: pa.Array) -> tuple[str, pa.Array]:
    """(PostgreSQL type, values ready for CSV) of one metadata column."""
    kind = values.type
    if pa.types.is_dictionary(kind):
        values, kind = values.dictionary_decode(), kind.value_type
    if name == JSON_LINE:
        return "jsonb", values
    if pa.types.is_boolean(kind):
        return "boolean", values
    if pa.types.is_integer(kind):
        return ("numeric" if kind == pa.uint64() else "bigint"), values
    if pa.types.is_floating(kind):
        # jsonb has no NaN or infinity: those become null.
        finite = pc.is_finite(values.cast(pa.float64()))
        return "double precision", pc.if_else(finite, values.cast(pa.float64()), pa.scalar(None, pa.float64()))
    if (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind)):
        return "text", _text_column(values)
    try:
        return "text", _text_column(values.cast(pa.large_string()))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        import json

        rendered = [None if v is None else json.dumps(v, default=str, ensure_ascii=False) for v in values.to_pylist()]
        return "jsonb", pa.array(rendered, pa.large_string())


class _SeenFilter:
    """A Bloom filter over the URL hashes staged so far from one file. "Not seen" is certain, so when
    the corpus was empty before the file, those URLs skip the primary-key probe (a quarter of the
    database's work on a first load); "maybe seen" URLs are probed as usual."""

    BITS = 1 << 28  # 32 MiB: about 0.4% false "maybe" at 20M URLs, still correct (just slower) beyond

    def __init__(self):
        self._bits = np.zeros(self.BITS // 8, dtype=np.uint8)

    def check_and_add(self, digests: bytes) -> np.ndarray:
        """For each 16-byte digest (concatenated): whether it may have been added before; then adds all."""
        positions = np.frombuffer(digests, dtype="<u4").reshape(-1, 4) & np.uint32(self.BITS - 1)
        octets, masks = positions >> 3, (np.uint8(1) << (positions & 7).astype(np.uint8))
        maybe = ((self._bits[octets] & masks) != 0).all(axis=1)
        np.bitwise_or.at(self._bits, octets.ravel(), masks.ravel())
        return maybe


def _prepare(batch: RawBatch, seq_start: int, settings: IngestSettings, columns: list[_Column] | None,
             sample_room: dict[int, int], seen: _SeenFilter | None = None) -> _Prepared:
    """One read batch as the staging table's COPY payload, with its reject counts and samples."""
    normalised = normalise_batch(batch.urls, settings.max_url_length, batch.reasons)
    counts = _reason_counts(normalised.reasons, batch.unparsed)
    samples = _reject_samples(batch, normalised.reasons, counts, settings, sample_room)
    kept = np.flatnonzero(normalised.reasons == OK)
    urls = normalised.urls.take(pa.array(kept))
    first_rows, digests = _first_of_each_url(urls)
    must_probe = np.ones(len(digests), dtype=bool) if seen is None or not digests else seen.check_and_add(
        b"".join(digests))  # fmt: skip
    rows = kept[np.asarray(first_rows, dtype=np.int64)] if first_rows else np.zeros(0, dtype=np.int64)
    table = {
        "seq": pa.array(seq_start + np.arange(len(first_rows), dtype=np.int64)),
        "line": pa.array(batch.lines[rows]),
        "url": urls.take(pa.array(np.asarray(first_rows, dtype=np.int64))),
        "url_hash": pa.array(["\\x" + digest.hex() for digest in digests], pa.string()),
        "must_probe": pa.array(must_probe),
    }
    staged_columns = _stage_metadata_columns(batch, rows, table)
    if columns is not None and [(c.key, c.pg_type) for c in columns] != [(c.key, c.pg_type) for c in staged_columns]:
        # Parquet row groups can disagree on nothing here, but a change would corrupt the staging table.
        raise CorpusInputError("(batch)", "metadata columns changed type within the file")
    return _Prepared(
        csv=_copy_payload(table, len(first_rows)), staged=len(first_rows),
        rows_read=len(batch.urls) + len(batch.unparsed), valid=len(kept), reason_counts=counts, samples=samples,
        columns=staged_columns,
    )  # fmt: skip


def _reason_counts(reasons: np.ndarray, unparsed: list[tuple[int | None, str, str]]) -> np.ndarray:
    """Rejected rows per reason code (OK not counted), the lines the reader could not parse included."""
    counts = np.bincount(reasons, minlength=len(REASONS)).astype(np.int64)
    counts[OK] = 0
    for _line, reason, _text in unparsed:
        counts[REASONS.index(reason)] += 1
    return counts


def _reject_samples(batch: RawBatch, reasons: np.ndarray, counts: np.ndarray, settings: IngestSettings,
                    sample_room: dict[int, int]) -> list[tuple[int | None, str, str]]:
    """A few rejected values per reason, up to the room left for the file (``sample_room`` is spent)."""
    samples: list[tuple[int | None, str, str]] = []
    for line, reason, text in batch.unparsed:
        code = REASONS.index(reason)
        if sample_room.get(code, settings.reject_samples_per_reason) > 0:
            sample_room[code] = sample_room.get(code, settings.reject_samples_per_reason) - 1
            samples.append((line, reason, _sample_text(text, settings.reject_sample_chars)))
    for code in np.flatnonzero(counts):
        room = sample_room.get(int(code), settings.reject_samples_per_reason)
        if room <= 0:
            continue
        rows = np.flatnonzero(reasons == code)[:room]
        sample_room[int(code)] = room - len(rows)
        raw = batch.urls.take(pa.array(rows)).to_pylist()
        for row, value in zip(rows, raw, strict=True):
            samples.append((int(batch.lines[row]), REASONS[code], _sample_text(value, settings.reject_sample_chars)))
    return samples


def _first_of_each_url(urls: pa.Array) -> tuple[list[int], list[bytes]]:
    """(index of each URL's first occurrence in the batch, its md5 digest), in batch order."""
    # md5 in Python, on this thread, keeps the database backend (the bottleneck) free of it.
    digests: list[bytes] = []
    first_rows: list[int] = []
    first_seen: dict[bytes, int] = {}
    for index, url in enumerate(urls.cast(pa.large_binary()).to_pylist()):
        digest = hashlib.md5(url, usedforsecurity=False).digest()
        if first_seen.setdefault(digest, index) == index:
            first_rows.append(index)
            digests.append(digest)
    return first_rows, digests


def _stage_metadata_columns(batch: RawBatch, rows: np.ndarray, table: dict[str, pa.Array]) -> list[_Column]:
    """Adds the batch's metadata columns (the kept rows) to ``table`` as m0, m1, …; returns their description."""
    metadata_items = sorted(batch.metadata.items(), key=lambda item: item[0] != JSON_LINE)
    staged_columns = []
    for position, (name, values) in enumerate(metadata_items):
        pg_type, ready = _stage_metadata(name, values.take(pa.array(rows)))
        stage_name = f"m{position}"
        table[stage_name] = ready
        staged_columns.append(_Column(key=name, stage_name=stage_name, pg_type=pg_type))
    return staged_columns


def _copy_payload(table: dict[str, pa.Array], rows: int) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    pcsv.write_csv(pa.table(table), sink, write_options=pcsv.WriteOptions(
        include_header=False, batch_size=max(1, rows), quoting_style="needed"))
    return sink.getvalue()


def _prepare_file(source: SourceFile, settings: IngestSettings, corpus_was_empty: bool) -> Iterator[_Prepared]:
    seq = 0
    columns = None
    sample_room: dict[int, int] = {}
    seen = _SeenFilter() if corpus_was_empty else None
    for batch in read_batches(source, url_column=settings.url_column, block_bytes=settings.read_block_bytes,
                              batch_rows=settings.batch_rows):
        try:
            prepared = _prepare(batch, seq, settings, columns, sample_room, seen)
        except CorpusInputError as exc:
            raise CorpusInputError(source.path, exc.problem) from exc
        columns = prepared.columns if prepared.staged else columns
        seq += prepared.staged
        yield prepared


class _Prefetcher:
    """Runs a generator on a thread, a bounded number of items ahead; its exceptions re-raise here."""

    _DONE = object()

    def __init__(self, items: Iterator, depth: int):
        self._items = items
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="corpus-reader", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._items:
                if not self._put(("item", item)):
                    return
            self._put(("done", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consuming thread
            self._put(("error", exc))

    def __iter__(self):
        while True:
            kind, value = self._queue.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


# ---------------------------------------------------------------- database side


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _is_superuser(conn: psycopg.Connection) -> bool:
    return conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]


class _FileLoader:
    """The database half of one file's ingest, inside that file's transaction."""

    def __init__(self, conn: psycopg.Connection, file_id: int, settings: IngestSettings):
        self.conn = conn
        self.file_id = file_id
        self.settings = settings
        self.first_shard_no = conn.execute("SELECT coalesce(max(shard_no), 0) + 1 FROM shards").fetchone()[0]
        self.added = 0
        self.shards_reserved = 0  # shard rows created so far for this file
        self.columns: list[_Column] | None = None

    def _create_stage(self, columns: list[_Column]) -> None:
        extra = [sql.SQL("{} {}").format(sql.Identifier(c.stage_name), sql.SQL(c.pg_type)) for c in columns]
        # ON COMMIT DROP does not fire when the caller's open transaction turned ours into a savepoint.
        self.conn.execute(sql.SQL("DROP TABLE IF EXISTS pg_temp.{}").format(sql.Identifier(_STAGE)))
        self.conn.execute(sql.SQL(
            "CREATE TEMP TABLE {} (seq bigint, line bigint, url text, url_hash bytea, must_probe boolean{}) "
            "ON COMMIT DROP"
        ).format(sql.Identifier(_STAGE), sql.SQL("").join(sql.SQL(", ") + e for e in extra)))
        self.columns = columns

    def _metadata_expression(self) -> sql.Composable:
        if not self.columns:
            return sql.SQL("NULL::jsonb")
        if self.columns[0].key == JSON_LINE:
            return sql.SQL("(s.{} - {})").format(sql.Identifier(self.columns[0].stage_name),
                                                 sql.Literal(self.settings.url_column))
        # jsonb_build_object takes at most 100 arguments: 50 columns per call.
        parts = []
        for start in range(0, len(self.columns), 50):
            pairs = [sql.SQL("{}, s.{}").format(sql.Literal(c.key), sql.Identifier(c.stage_name))
                     for c in self.columns[start : start + 50]]
            parts.append(sql.SQL("jsonb_build_object({})").format(sql.SQL(", ").join(pairs)))
        return sql.SQL(" || ").join(parts)

    def _reserve_shards(self, upto_urls: int) -> None:
        """Shard rows must exist before the URLs that reference them; unused ones go at the end."""
        needed = -(-upto_urls // self.settings.shard_size)
        if needed <= self.shards_reserved:
            return
        first = self.first_shard_no + self.shards_reserved
        last = self.first_shard_no + needed - 1
        self.conn.execute(
            sql.SQL("INSERT INTO shards (shard_id, shard_no, file_id, url_count) "
                    "SELECT {}, n, %s, 0 FROM generate_series(%s::int, %s::int) AS n").format(shard_key_sql("n")),
            (self.file_id, first, last),
        )
        self.shards_reserved = needed

    def load(self, prepared: _Prepared) -> int:
        if not prepared.staged:
            return 0
        if self.columns is None:
            self._create_stage(prepared.columns)
        else:
            self.conn.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(_STAGE)))
        names = ["seq", "line", "url", "url_hash", "must_probe"] + [c.stage_name for c in self.columns]
        copy = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT csv)").format(
            sql.Identifier(_STAGE), sql.SQL(", ").join(map(sql.Identifier, names)))
        with self.conn.cursor().copy(copy) as writer:
            writer.write(memoryview(prepared.csv))
        self._reserve_shards(self.added + prepared.staged)
        shard_no = sql.SQL("({first}::int + ({added}::bigint + s.rank - 1) / {size}::int)").format(
            first=sql.Literal(self.first_shard_no), added=sql.Literal(self.added),
            size=sql.Literal(self.settings.shard_size))
        inserted = self.conn.execute(sql.SQL(
            "INSERT INTO corpus_urls (url_hash, url, shard_id, source_file_id, source_line, metadata) "
            "SELECT s.url_hash, s.url, {shard}, {file_id}, s.line, {metadata} "
            "FROM (SELECT t.*, row_number() OVER (ORDER BY t.seq) AS rank FROM {stage} t "
            "      WHERE NOT (t.must_probe AND EXISTS (SELECT 1 FROM corpus_urls c WHERE c.url_hash = t.url_hash))) s "
            "ORDER BY s.seq"
        ).format(shard=shard_key_sql(shard_no), file_id=sql.Literal(self.file_id),
                 metadata=self._metadata_expression(), stage=sql.Identifier(_STAGE))).rowcount
        self.added += inserted
        return inserted

    def finish(self) -> list[str]:
        """Drop unused reserved shards and set the others' sizes; returns the shard ids kept."""
        if self.columns is not None:
            self.conn.execute(sql.SQL("DROP TABLE pg_temp.{}").format(sql.Identifier(_STAGE)))
        size = self.settings.shard_size
        used = -(-self.added // size)
        last_no = self.first_shard_no + used - 1
        self.conn.execute("DELETE FROM shards WHERE file_id = %s AND shard_no > %s", (self.file_id, last_no))
        if not used:
            return []
        self.conn.execute(
            "UPDATE shards SET url_count = CASE WHEN shard_no = %s THEN %s ELSE %s END WHERE file_id = %s",
            (last_no, self.added - (used - 1) * size, size, self.file_id),
        )
        rows = self.conn.execute("SELECT shard_id FROM shards WHERE file_id = %s ORDER BY shard_no",
                                 (self.file_id,)).fetchall()
        return [row[0] for row in rows]


def _begin_file_transaction(conn: psycopg.Connection, settings: IngestSettings) -> None:
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_INGEST_LOCK_KEY,))
    conn.execute("SET LOCAL work_mem = '64MB'")
    # The staging batch is small and corpus_urls large: probe its primary key rather than hash it whole.
    conn.execute("SET LOCAL enable_hashjoin = off")
    conn.execute("SET LOCAL enable_mergejoin = off")
    if settings.skip_redundant_fk_checks and _is_superuser(conn):
        conn.execute("SET LOCAL session_replication_role = replica")


def _ingest_one(conn: psycopg.Connection, source: SourceFile, settings: IngestSettings,
                report: IngestReport, progress: ProgressCallback | None, started: float) -> FileReport:
    file_started = time.monotonic()
    sha = file_sha256(source.path)
    result = FileReport(path=str(source.path), format=source.format, content_sha256=sha)
    with conn.transaction():
        _begin_file_transaction(conn, settings)
        existing = conn.execute("SELECT file_id FROM corpus_files WHERE content_sha256 = %s", (sha,)).fetchone()
        if existing:
            result.file_id, result.skipped = existing[0], True
            log.info("%s: same content as ingested file %s; skipped", source.path, existing[0])
            return result
        result.file_id = conn.execute(
            "INSERT INTO corpus_files (path, content_sha256, size_bytes) VALUES (%s, %s, %s) RETURNING file_id",
            (str(source.path), sha, source.path.stat().st_size),
        ).fetchone()[0]
        loader = _FileLoader(conn, result.file_id, settings)
        corpus_was_empty = conn.execute("SELECT NOT EXISTS (SELECT 1 FROM corpus_urls)").fetchone()[0]
        reason_counts = np.zeros(len(REASONS), dtype=np.int64)
        samples: list[tuple[int | None, str, str]] = []
        prefetcher = _Prefetcher(_prepare_file(source, settings, corpus_was_empty), settings.prefetch_batches)
        try:
            for prepared in prefetcher:
                loader.load(prepared)
                result.rows_read += prepared.rows_read
                result.valid += prepared.valid
                reason_counts += prepared.reason_counts
                samples.extend(prepared.samples)
                if progress:
                    elapsed = time.monotonic() - started
                    done = report.rows_read + result.rows_read
                    progress({
                        "file": str(source.path), "file_rows_read": result.rows_read, "file_added": loader.added,
                        "rows_read": done, "added": report.added + loader.added,
                        "elapsed_s": round(elapsed, 3), "urls_per_s": round(done / elapsed, 1) if elapsed else 0.0,
                    })
        finally:
            prefetcher.close()
        if result.rows_read == 0:
            raise CorpusInputError(source.path, "file has no rows" + (" (only a header)" if source.format in
                                                                         ("csv", "tsv") else ""))
        result.added = loader.added
        result.duplicates = result.valid - loader.added
        result.rejected_by_reason = {REASONS[i]: int(n) for i, n in enumerate(reason_counts) if n}
        result.shards_added = loader.finish()
        conn.execute(
            "UPDATE corpus_files SET rows_read = %s, urls_added = %s, duplicates = %s, rejected = %s, "
            "rejected_by_reason = %s::jsonb, shards_added = %s WHERE file_id = %s",
            (result.rows_read, result.added, result.duplicates, result.rejected,
             psycopg.types.json.Jsonb(result.rejected_by_reason), len(result.shards_added), result.file_id),
        )
        if samples:
            with conn.cursor().copy("COPY corpus_rejects (file_id, line, reason, value) FROM STDIN") as writer:
                for line, reason, text in samples:
                    writer.write_row((result.file_id, line, reason, text))
        for line, reason, text in samples:
            report.rejected_samples.append({"path": str(source.path), "line": line, "reason": reason, "value": text})
    result.elapsed_s = round(time.monotonic() - file_started, 3)
    log.info("%s: %d rows, %d valid, %d new URLs in %d shards, %d rejected (%.1f s)", source.path,
             result.rows_read, result.valid, result.added, len(result.shards_added), result.rejected,
             result.elapsed_s)
    return result


def ingest_files(conn: psycopg.Connection, paths: list[str | os.PathLike] | str | os.PathLike, *,
                 url_column: str = "url", shard_size: int = 10_000, progress: ProgressCallback | None = None,
                 settings: IngestSettings | None = None) -> IngestReport:
    """Ingest files (paths or globs) in order, each in its own transaction, and report what happened.

    Raises CorpusInputError (one line: file and problem) for a missing, empty, unreadable or
    malformed file; files before it stay ingested, nothing of that file is kept. ``conn`` should not
    be inside a transaction, so that each file commits on its own.
    """
    settings = settings or IngestSettings(url_column=url_column, shard_size=shard_size)
    started = time.monotonic()
    was_idle = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    # Check every file before loading any, so a typo in the last path does not leave half a job done.
    sources = [identify(path) for path in expand_paths(paths)]
    report = IngestReport()
    for source in sources:
        result = _ingest_one(conn, source, settings, report, progress, started)
        report.add(result)
        report.shards_added.extend(result.shards_added)
        report.files.append(asdict(result) | {"rejected": result.rejected})
    report.elapsed_s = round(time.monotonic() - started, 3)
    report.urls_per_s = round(report.rows_read / report.elapsed_s, 1) if report.elapsed_s else 0.0
    report.corpus_totals = corpus_totals(conn)
    if was_idle and conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS:
        conn.commit()  # only the totals' read is open: do not leave the connection idle in a transaction
    return report
