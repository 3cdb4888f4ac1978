"""Input files: which ones (paths, globs), their format and compression, and readers that stream them
as Arrow batches of raw URL values with line numbers and metadata columns.

Formats: .txt (one URL a line), .csv / .tsv (URL column by name, other columns kept as metadata),
.jsonl (one object a line; the object minus the URL key is the metadata), .parquet; each plain or
compressed (.gz, .zst). Readers never hold more than one batch: 20M URLs stay out of Python.
"""

from __future__ import annotations

import csv
import errno
import glob
import gzip
import io
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.json as pjson
import pyarrow.parquet as pq
import zstandard

from imgpipe_dagster.corpus.errors import CorpusInputError
from imgpipe_dagster.corpus.normalize import REASON_CODE, decode_utf8

FORMATS = ("txt", "csv", "tsv", "jsonl", "parquet")
_FORMAT_ALIASES = {"text": "txt", "ndjson": "jsonl", "json": "jsonl", "pq": "parquet"}
COMPRESSIONS = {".gz": "gzip", ".gzip": "gzip", ".zst": "zstd", ".zstd": "zstd"}
# A line longer than this is not read into memory: it is counted as too long and skipped.
MAX_LINE_BYTES = 64 << 20
# Spreadsheet exports often start with a byte-order mark; it is not part of the first value.
UTF8_BOM = b"\xef\xbb\xbf"
# A text file whose first 64 KB is mostly control bytes or invalid UTF-8 is not a URL list.
_SNIFF_BYTES = 64 << 10
_BINARY_SHARE = 0.25


@dataclass(frozen=True)
class SourceFile:
    path: Path
    format: str  # one of FORMATS
    compression: str | None  # "gzip", "zstd" or None


@dataclass
class RawBatch:
    """One batch as read: raw URL values (null where the reader found none) and where they came from."""

    urls: pa.Array
    lines: np.ndarray  # int64, 1-based line (record) number of each row
    metadata: dict[str, pa.Array] = field(default_factory=dict)
    reasons: np.ndarray | None = None  # int8 rejections already decided by the reader
    # Records the reader could not turn into a row at all: (line, reason, text).
    unparsed: list[tuple[int | None, str, str]] = field(default_factory=list)


def expand_paths(paths: list[str | os.PathLike] | str | os.PathLike) -> list[Path]:
    """Files named directly or by a glob, in the order given (a glob's matches sorted), each once."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    found: list[Path] = []
    for entry in paths:
        text = os.fspath(entry)
        if glob.has_magic(text):
            matches = sorted(glob.glob(text, recursive=True))
            matches = [m for m in matches if os.path.isfile(m)]
            if not matches:
                raise CorpusInputError(text, "no file matches this pattern")
            found.extend(Path(m) for m in matches)
        else:
            found.append(Path(text))
    unique: dict[Path, None] = {}
    for path in found:
        try:
            unique.setdefault(path.resolve(), None)
        except (RuntimeError, OSError) as exc:  # Python 3.11 says RuntimeError for a symlink loop
            if isinstance(exc, RuntimeError) or exc.errno == errno.ELOOP:
                raise CorpusInputError(path, "symbolic link loop: the link leads back to itself") from None
            raise CorpusInputError(path, f"cannot follow this path: {exc.strerror or exc}") from None
    return list(unique)


def identify(path: Path) -> SourceFile:
    """Format and compression from the name; missing or empty files are refused here."""
    if not path.exists():
        raise CorpusInputError(path, "file not found")
    if not path.is_file():
        raise CorpusInputError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise CorpusInputError(path, "file is empty")
    try:
        with open(path, "rb"):
            pass  # found out here, before any row is read, not as a traceback halfway
    except OSError as exc:
        raise CorpusInputError(path, f"cannot be read ({exc.strerror or exc}): check its permissions") from None
    suffixes = [s.lower() for s in path.suffixes]
    compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    if compression:
        suffixes = suffixes[:-1]
    fmt = suffixes[-1].lstrip(".") if suffixes else ""
    fmt = _FORMAT_ALIASES.get(fmt, fmt)
    if fmt not in FORMATS:
        raise CorpusInputError(
            path, f"unknown file type {''.join(path.suffixes) or '(no extension)'}; "
            f"use .txt, .csv, .tsv, .jsonl or .parquet, optionally + .gz or .zst"
        )
    return SourceFile(path=path, format=fmt, compression=compression)


# ---------------------------------------------------------------- decompression


class _ZstdStream(io.RawIOBase):
    """zstd frames decompressed in order; unlike zstandard's stream_reader, a file cut short mid-frame
    is an error rather than a quiet early end."""

    def __init__(self, raw):
        self._raw = raw
        self._decompressor = zstandard.ZstdDecompressor()
        self._frame = self._decompressor.decompressobj()
        self._pending = b""
        self._finished = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending and not self._finished:
            chunk = self._raw.read(1 << 20)
            if not chunk:
                if not self._frame.eof:
                    raise zstandard.ZstdError("compressed data ends in the middle of a frame")
                self._finished = True
                break
            while chunk:
                if self._frame.eof:
                    self._frame = self._decompressor.decompressobj()
                self._pending += self._frame.decompress(chunk)
                chunk = self._frame.unused_data if self._frame.eof else b""
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size

    def close(self) -> None:
        self._raw.close()
        super().close()


DECOMPRESSION_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error, zstandard.ZstdError)


def open_stream(source: SourceFile) -> io.BufferedIOBase:
    """The file's decompressed bytes as a stream."""
    raw = open(source.path, "rb")  # noqa: SIM115 - the returned stream owns it
    if source.compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if source.compression == "zstd":
        return io.BufferedReader(_ZstdStream(raw), buffer_size=1 << 20)
    return raw


def damaged(source: SourceFile, exc: BaseException) -> CorpusInputError:
    kind = source.compression or "the"
    return CorpusInputError(
        source.path, f"{kind} compressed data is damaged or cut short ({exc.__class__.__name__}: {exc})"
    )


def sniff_binary(source: SourceFile) -> None:
    """Refuse text inputs that are really binary data (images, archives, random bytes)."""
    try:
        with open_stream(source) as stream:
            head = stream.read(_SNIFF_BYTES)
    except DECOMPRESSION_ERRORS as exc:
        raise damaged(source, exc) from exc
    if not head:
        raise CorpusInputError(source.path, "file is empty" + (" once decompressed" if source.compression else ""))
    text = head.decode("utf-8", "replace")
    odd = sum(1 for ch in text if ch == "\ufffd" or (ch < " " and ch not in "\t\r\n") or ch == "\x7f")
    if odd / len(text) > _BINARY_SHARE:
        raise CorpusInputError(
            source.path, f"looks like binary data, not a {source.format} URL list ({odd / len(text):.0%} of the "
            f"first {len(head)} bytes are control bytes or invalid UTF-8)"
        )


# ---------------------------------------------------------------- line-oriented formats


def _split_lines(block: bytes) -> pa.Array:
    """Lines of a block that ends with a newline, as large_binary values including the newline."""
    data = np.frombuffer(block, dtype=np.uint8)
    ends = np.flatnonzero(data == 10)
    offsets = np.empty(len(ends) + 1, dtype=np.int64)
    offsets[0] = 0
    offsets[1:] = ends + 1
    return pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(ends), [None, pa.py_buffer(offsets), pa.py_buffer(block)]
    )


def _line_blocks(stream, block_bytes: int) -> Iterator[tuple[pa.Array, int, list[int], bytes]]:
    """(lines, number of the first line, numbers of over-long lines skipped before them, the block's
    bytes), block by block."""
    carry = b""
    next_line = 1
    skipping = False  # inside a line longer than MAX_LINE_BYTES
    too_long: list[int] = []
    at_start = True
    while True:
        chunk = stream.read(block_bytes)
        if not chunk:
            break
        if at_start:
            chunk, at_start = chunk.removeprefix(UTF8_BOM), False
        if skipping:
            newline = chunk.find(b"\n")
            if newline < 0:
                continue
            chunk, skipping = chunk[newline + 1 :], False
            next_line += 1
        buffer = carry + chunk if carry else chunk
        last_newline = buffer.rfind(b"\n")
        if last_newline < 0:
            carry = buffer
            if len(carry) > MAX_LINE_BYTES:
                too_long.append(next_line)
                carry, skipping = b"", True
            continue
        complete, carry = buffer[: last_newline + 1], buffer[last_newline + 1 :]
        lines = _split_lines(complete)
        yield lines, next_line, too_long, complete
        next_line += len(lines)
        too_long = []
    if carry and not skipping:
        yield _split_lines(carry + b"\n"), next_line, too_long, carry + b"\n"
    elif too_long:
        yield pa.array([], pa.large_binary()), next_line, too_long, b""


def _strip_newline(lines: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Values without their line ending, and which lines were blank (skipped: they are not rows)."""
    lengths = np.asarray(pc.binary_length(lines))
    blank = lengths <= 1
    if blank.any():
        blank |= (lengths == 2) & np.asarray(pc.equal(lines, pa.scalar(b"\r\n", pa.large_binary())))
    stripped = pc.binary_slice(lines, 0, -1)
    return stripped, blank


def _numbered_rows(lines: pa.Array, first: int) -> tuple[pa.Array, np.ndarray]:
    """A block's lines without line endings and without blank lines, with their 1-based line numbers."""
    values, blank = _strip_newline(lines)
    numbers = first + np.arange(len(values), dtype=np.int64)
    if blank.any():
        keep = pa.array(~blank)
        values, numbers = values.filter(keep), numbers[~blank]
    return values, numbers


def _too_long_batch(numbers: list[int]) -> RawBatch:
    return RawBatch(
        urls=pa.array([b"<line longer than 64 MB>"] * len(numbers), pa.large_binary()),
        lines=np.asarray(numbers, dtype=np.int64),
        reasons=np.full(len(numbers), REASON_CODE["too_long"], dtype=np.int8),
    )


def read_txt(source: SourceFile, block_bytes: int) -> Iterator[RawBatch]:
    with open_stream(source) as stream:
        for lines, first, too_long, _block in _line_blocks(stream, block_bytes):
            if too_long:
                yield _too_long_batch(too_long)
            values, numbers = _numbered_rows(lines, first)
            if len(values):
                yield RawBatch(urls=values, lines=numbers)


def _json_rows_in_python(values: pa.Array, url_column: str) -> tuple[pa.Array, pa.Array, np.ndarray]:
    """Slow path for a block Arrow could not parse: (urls, metadata lines, reasons) line by line."""
    urls: list[str | None] = []
    objects: list[str | None] = []
    reasons = np.zeros(len(values), dtype=np.int8)
    for index, raw in enumerate(values.to_pylist()):
        url = line = None
        try:
            line = raw.decode("utf-8")
            obj = json.loads(line)
        except UnicodeDecodeError:
            reasons[index] = REASON_CODE["invalid_utf8"]
        except ValueError:
            reasons[index] = REASON_CODE["invalid_json"]
        else:
            if not isinstance(obj, dict):
                reasons[index] = REASON_CODE["invalid_json"]
            elif not isinstance(obj.get(url_column), str):
                reasons[index] = REASON_CODE["missing_url"]
            elif "\\u0000" in line:
                reasons[index] = REASON_CODE["control_characters"]
            else:
                url = obj[url_column]
        urls.append(url)
        objects.append(line if url is not None else None)
    return pa.array(urls, pa.large_string()), pa.array(objects, pa.large_string()), reasons


JSON_LINE = "\x00json_line"  # metadata key under which the JSONL reader hands over whole lines


def read_jsonl(source: SourceFile, block_bytes: int, url_column: str) -> Iterator[RawBatch]:
    schema = pa.schema([(url_column, pa.large_string())])
    options = pjson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    with open_stream(source) as stream:
        for lines, first, too_long, block in _line_blocks(stream, block_bytes):
            if too_long:
                yield _too_long_batch(too_long)
            values, numbers = _numbered_rows(lines, first)
            if not len(values):
                continue
            urls = objects = reasons = None
            text, invalid = decode_utf8(values)
            if not invalid.any():
                try:
                    # Arrow skips blank lines itself; the row count check below catches any mismatch.
                    table = pjson.read_json(pa.BufferReader(pa.py_buffer(block)), parse_options=options)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    table = None
                if table is not None and table.num_rows == len(values):
                    urls = table.column(url_column).combine_chunks()
                    objects = text
                    reasons = np.zeros(len(values), dtype=np.int8)
                    reasons[np.asarray(pc.is_null(urls))] = REASON_CODE["missing_url"]
                    nul = np.asarray(pc.match_substring(text, "\\u0000"))
                    reasons[(reasons == 0) & nul] = REASON_CODE["control_characters"]
            if urls is None:
                urls, objects, reasons = _json_rows_in_python(values, url_column)
            # Unparseable lines keep their text as the value, so their rejection sample shows it.
            rejected_raw = pa.array(reasons != 0) if reasons.any() else None
            shown = urls if rejected_raw is None else pc.if_else(rejected_raw, values.cast(pa.large_binary()),
                                                                  urls.cast(pa.large_binary()))
            yield RawBatch(urls=shown, lines=numbers, metadata={JSON_LINE: objects}, reasons=reasons)


# ---------------------------------------------------------------- CSV / TSV


def _csv_header(source: SourceFile, delimiter: str) -> list[str]:
    with open_stream(source) as stream:
        head = stream.read(1 << 20)
    first = head.removeprefix(UTF8_BOM).split(b"\n", 1)[0].rstrip(b"\r")
    text = first.decode("utf-8", "replace")
    if delimiter == "\t":
        return text.split("\t")
    return next(csv.reader([text], delimiter=delimiter))


def _shown_columns(names: list[str]) -> str:
    shown = [repr(name[:40]) for name in names[:20]]
    return ", ".join(shown) + (f" and {len(names) - 20} more" if len(names) > 20 else "")


def read_delimited(source: SourceFile, block_bytes: int, url_column: str) -> Iterator[RawBatch]:
    delimiter = "\t" if source.format == "tsv" else ","
    names = _csv_header(source, delimiter)
    if url_column not in names:
        raise CorpusInputError(source.path, f"no column named {url_column!r}; the header has {_shown_columns(names)}")
    if len(set(names)) != len(names):
        raise CorpusInputError(source.path, f"the header names a column twice: {_shown_columns(names)}")
    unparsed: list[tuple[int | None, str, str]] = []
    fatal: list[CorpusInputError] = []

    def on_invalid_row(row) -> str:
        if "\n" in row.text:
            fatal.append(CorpusInputError(
                source.path, f"unterminated quote in the record starting at line {row.number}: "
                "the rest of the file would be read as one value; close the quote or escape it as \"\""
            ))
            return "error"
        unparsed.append((row.number, "malformed_row", row.text))
        return "skip"

    quoting = source.format == "csv"
    read_options = pcsv.ReadOptions(block_size=max(block_bytes, 1 << 20), use_threads=False)
    parse_options = pcsv.ParseOptions(
        delimiter=delimiter, quote_char='"' if quoting else False, newlines_in_values=quoting,
        invalid_row_handler=on_invalid_row,
    )
    convert_options = pcsv.ConvertOptions(
        column_types={name: pa.large_binary() for name in names},
        strings_can_be_null=False, quoted_strings_can_be_null=False,
    )
    stream = _TailRecorder(open_stream(source))
    records = 0
    try:
        reader = pcsv.open_csv(stream, read_options=read_options, parse_options=parse_options,
                               convert_options=convert_options)
        last: pa.RecordBatch | None = None
        for batch in reader:
            skipped, unparsed[:] = list(unparsed), []
            numbers = 2 + records + len(skipped) + np.arange(batch.num_rows, dtype=np.int64)
            records += batch.num_rows + len(skipped)
            if batch.num_rows:
                last = batch
            metadata = {name: batch.column(name) for name in names if name != url_column}
            yield RawBatch(urls=batch.column(url_column), lines=numbers, metadata=metadata, unparsed=skipped)
        if unparsed:
            yield RawBatch(urls=pa.array([], pa.large_binary()), lines=np.zeros(0, np.int64),
                           unparsed=list(unparsed))
        if quoting and last is not None:
            _check_closed_quote(source, last, stream.tail, 1 + records)
    except pa.ArrowInvalid:
        if fatal:
            raise fatal[0] from None
        raise
    finally:
        stream.close()


def _check_closed_quote(source: SourceFile, last: pa.RecordBatch, tail: bytes, last_line: int) -> None:
    """A quote left open swallows the rest of the file into the last value without any parse error."""
    value = last.column(last.num_columns - 1)[-1].as_py() or b""
    if b"\n" in value and not tail.rstrip(b"\r\n").endswith(b'"'):
        raise CorpusInputError(
            source.path, f"unterminated quote in the last record (near line {last_line}): the file ends "
            "inside a quoted value; close the quote or escape it as \"\""
        )


class _TailRecorder(io.RawIOBase):
    """A read-through stream that remembers the last bytes read."""

    def __init__(self, inner):
        self._inner = inner
        self.tail = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._inner.read(len(buffer))
        size = len(data)
        buffer[:size] = data
        if size:
            self.tail = (self.tail + data)[-64:]
        return size

    def close(self) -> None:
        self._inner.close()
        super().close()


# ---------------------------------------------------------------- Parquet


def read_parquet(source: SourceFile, batch_rows: int, url_column: str) -> Iterator[RawBatch]:
    temporary = None
    path = source.path
    try:
        if source.compression:
            # Parquet needs random access: a compressed Parquet file is expanded to a temporary file first.
            handle, temporary = tempfile.mkstemp(suffix=".parquet")
            with os.fdopen(handle, "wb") as out, open_stream(source) as stream:
                shutil.copyfileobj(stream, out, 1 << 20)
            path = Path(temporary)
        try:
            # pre_buffer keeps every row group's column chunks cached until the reader is gone (+6 MB a batch).
            parquet = pq.ParquetFile(path, pre_buffer=False)
        except (pa.ArrowException, OSError) as exc:
            raise CorpusInputError(source.path, f"not a readable Parquet file ({exc})") from exc
        names = parquet.schema_arrow.names
        if url_column not in names:
            raise CorpusInputError(source.path, f"no column named {url_column!r}; the file has {_shown_columns(names)}")
        url_type = parquet.schema_arrow.field(url_column).type
        if pa.types.is_dictionary(url_type):
            url_type = url_type.value_type
        if not (pa.types.is_string(url_type) or pa.types.is_large_string(url_type)
                or pa.types.is_binary(url_type) or pa.types.is_large_binary(url_type)):
            raise CorpusInputError(source.path, f"column {url_column!r} holds {url_type}, not text")
        if parquet.metadata.num_rows == 0:
            raise CorpusInputError(source.path, "file has no rows")
        next_row = 1
        try:
            for batch in parquet.iter_batches(batch_size=batch_rows):
                urls = batch.column(url_column)
                if pa.types.is_dictionary(urls.type):
                    urls = urls.dictionary_decode()
                numbers = next_row + np.arange(batch.num_rows, dtype=np.int64)
                next_row += batch.num_rows
                metadata = {name: batch.column(name) for name in batch.schema.names if name != url_column}
                yield RawBatch(urls=urls.cast(pa.large_binary()), lines=numbers, metadata=metadata)
        except (pa.ArrowException, OSError) as exc:
            raise CorpusInputError(source.path, f"Parquet data is damaged ({exc})") from exc
    finally:
        if temporary:
            os.unlink(temporary)


def read_batches(source: SourceFile, *, url_column: str, block_bytes: int, batch_rows: int) -> Iterator[RawBatch]:
    """Raw batches of one file; decompression and parse failures become CorpusInputError."""
    if source.format != "parquet":
        sniff_binary(source)
    try:
        if source.format == "txt":
            yield from read_txt(source, block_bytes)
        elif source.format == "jsonl":
            yield from read_jsonl(source, block_bytes, url_column)
        elif source.format in ("csv", "tsv"):
            yield from read_delimited(source, block_bytes, url_column)
        else:
            yield from read_parquet(source, batch_rows, url_column)
    except DECOMPRESSION_ERRORS as exc:
        raise damaged(source, exc) from exc
    except pa.ArrowInvalid as exc:
        message = str(exc).strip().splitlines()[0]
        raise CorpusInputError(source.path, f"cannot parse {source.format}: {message}") from exc
