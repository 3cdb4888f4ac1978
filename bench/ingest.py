"""Benchmark: ingest a realistic 20M-URL file (Parquet and CSV) into a fresh database.

Prints one JSON line per figure: generation, each ingest (URLs/s, peak RSS of the ingesting process
and of its PostgreSQL backend), a naive baseline measured in the same run (per-row Python
normalise + md5 + executemany on a subset) and the ratio against it.

    .venv/bin/python bench/ingest.py                      # 20M rows, Parquet then CSV
    .venv/bin/python bench/ingest.py --rows 1000000 --formats parquet

The database is the project's (IMGPIPE_DATABASE_URL, else the embedded server under ./.imgpipe/pg);
each ingest gets its own database (imgpipe_bench_*), dropped afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imgpipe_dagster.store import database as db  # noqa: E402
from imgpipe_dagster.store.migrations import migrate  # noqa: E402

CHUNK = 1_000_000
WORDS = ("cat dog beach sunset city street portrait food car mountain river forest flower bird night snow "
         "red blue green old new big small happy family wedding party product sale shoe dress phone").split()
EXTENSIONS = ("jpg", "jpg", "jpg", "jpeg", "png", "webp", "gif", "JPG")


def emit(figure: str, **values) -> None:
    print(json.dumps({"figure": figure, **values}), flush=True)


# ---------------------------------------------------------------- data


def _hosts(rng: random.Random, count: int = 5000) -> list[str]:
    tlds = ("com", "net", "org", "de", "fr", "co.uk", "io", "jp", "com.br", "ru")
    hosts = []
    for index in range(count):
        base = f"{rng.choice(WORDS)}{rng.choice(WORDS)}{index}"
        style = rng.random()
        if style < 0.4:
            host = f"cdn{rng.randint(1, 9)}.{base}.{rng.choice(tlds)}"
        elif style < 0.7:
            host = f"images.{base}.{rng.choice(tlds)}"
        else:
            host = f"{base}.{rng.choice(tlds)}"
        hosts.append(host)
    return hosts


def _chunk(rng: random.Random, np_rng: np.random.Generator, hosts: list[str], start: int, size: int,
           previous: list[str]) -> tuple[list[str], list[int], list[str]]:
    """URLs for rows start..start+size: ~4% duplicates, ~1% junk, ~3% needing normalisation."""
    urls: list[str] = []
    kinds = np_rng.random(size)
    host_picks = np_rng.integers(0, len(hosts), size)
    numbers = np_rng.integers(0, 10**12, size)
    for offset in range(size):
        kind = kinds[offset]
        if kind < 0.04 and previous:
            urls.append(previous[int(numbers[offset]) % len(previous)])
            continue
        host = hosts[host_picks[offset]]
        number = int(numbers[offset])
        depth = 1 + number % 4
        path = "/".join(WORDS[(number >> (3 * d)) % len(WORDS)] for d in range(depth))
        url = f"https://{host}/{path}/{number:x}.{EXTENSIONS[number % len(EXTENSIONS)]}"
        if number % 10 < 3:
            url += f"?w={100 + number % 1900}&h={100 + (number >> 7) % 1900}&sig={number * 2654435761 % 2**48:012x}"
        if kind > 0.99:  # junk and rejections
            url = rng.choice([
                "ftp://" + host + "/x.jpg", "not a url", "", "javascript:alert(1)", "https://user:pw@" + host + "/a.jpg",
                "http://" + host + "/bad\x07bell.jpg", "data:image/png;base64,iVBORw0KGgo=", "http:///nohost.jpg",
            ])
        elif kind > 0.97:  # valid but not in normal form: case, default port, fragment, no path
            url = rng.choice([
                url.replace("https://", "HTTPS://").replace(host, host.upper()), url.replace(host, host + ":443"),
                url + "#section", f"  {url}  ", f"https://{host}",
            ])
        urls.append(url)
    ids = list(range(start, start + size))
    captions = [f"{WORDS[n % len(WORDS)]} {WORDS[(n >> 5) % len(WORDS)]} photo \"{n % 97}\"" for n in numbers.tolist()]
    return urls, ids, captions


def generate(rows: int, out_dir: Path, seed: int = 20) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    parquet_path = out_dir / f"urls_{rows}.parquet"
    csv_path = out_dir / f"urls_{rows}.csv"
    if parquet_path.exists() and csv_path.exists():
        emit("generate", rows=rows, reused=True, parquet_mb=round(parquet_path.stat().st_size / 2**20, 1),
             csv_mb=round(csv_path.stat().st_size / 2**20, 1))
        return {"parquet": parquet_path, "csv": csv_path}
    started = time.monotonic()
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    hosts = _hosts(rng)
    schema = pa.schema([("id", pa.int64()), ("url", pa.string()), ("caption", pa.string())])
    previous: list[str] = []
    parquet_tmp, csv_tmp = Path(f"{parquet_path}.tmp"), Path(f"{csv_path}.tmp")
    with pq.ParquetWriter(parquet_tmp, schema, compression="zstd") as parquet_writer, \
            pcsv.CSVWriter(csv_tmp, schema) as csv_writer:
        for start in range(0, rows, CHUNK):
            size = min(CHUNK, rows - start)
            urls, ids, captions = _chunk(rng, np_rng, hosts, start, size, previous)
            previous = urls[: 50_000]  # duplicates refer back to the previous chunk, across batches
            table = pa.table({"id": ids, "url": urls, "caption": captions}, schema=schema)
            parquet_writer.write_table(table, row_group_size=200_000)
            csv_writer.write_table(table)
    parquet_tmp.rename(parquet_path)
    csv_tmp.rename(csv_path)
    emit("generate", rows=rows, reused=False, elapsed_s=round(time.monotonic() - started, 1),
         parquet_mb=round(parquet_path.stat().st_size / 2**20, 1), csv_mb=round(csv_path.stat().st_size / 2**20, 1))
    return {"parquet": parquet_path, "csv": csv_path}


# ---------------------------------------------------------------- measured runs (child processes)


def _fresh_database(name: str) -> str:
    url = db.with_database(db.resolve_database_url(), name)
    db.drop_database(url)
    db.ensure_database(url)
    with db.connect(url) as conn:
        migrate(conn)
    return url


class _PeakRss:
    """Samples a process's RSS (here: the PostgreSQL backend serving the ingest)."""

    def __init__(self, pid: int):
        import psutil

        self._process = psutil.Process(pid)
        self.peak = 0
        self.cpu_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self._process.memory_info().rss)
                times = self._process.cpu_times()
                self.cpu_s = times.user + times.system
            except Exception:  # noqa: BLE001 - the backend may be gone at the end
                return
            self._stop.wait(0.5)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        try:
            times = self._process.cpu_times()
            self.cpu_s = times.user + times.system
        except Exception:  # noqa: BLE001
            pass
        return self.peak


def child_ingest(path: str, url: str, label: str) -> None:
    from imgpipe_dagster.corpus import ingest_files

    last = [0.0]

    def progress(state: dict) -> None:
        if state["elapsed_s"] - last[0] >= 30:
            last[0] = state["elapsed_s"]
            print(json.dumps({"progress": label, **state}), file=sys.stderr, flush=True)

    with db.connect(url) as conn:
        backend = _PeakRss(conn.info.backend_pid)
        report = ingest_files(conn, [path], progress=progress)
        backend_peak = backend.stop()
    emit(f"ingest_{label}", rows_read=report.rows_read, valid=report.valid, added=report.added,
         duplicates=report.duplicates, rejected=report.rejected, rejected_by_reason=report.rejected_by_reason,
         shards=len(report.shards_added), elapsed_s=report.elapsed_s, urls_per_s=report.urls_per_s,
         peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
         pg_backend_peak_rss_mb=round(backend_peak / 2**20, 1),
         # CPU seconds show what the ingest costs when the machine is shared (wall time then says little).
         python_cpu_s=round(_own_cpu_s(), 1), pg_backend_cpu_s=round(backend.cpu_s, 1),
         load_avg_1m=round(os.getloadavg()[0], 2))


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child_baseline(path: str, url: str, rows: int) -> None:
    """The obvious implementation: read rows, normalise each in Python, md5, executemany INSERT."""
    import hashlib

    from imgpipe_dagster.corpus.normalize import UrlRejected, normalise_url

    table = pq.ParquetFile(path).read_row_group(0, columns=["url", "id", "caption"]).slice(0, rows)
    started = time.monotonic()
    values = []
    for line, (raw, ident, caption) in enumerate(zip(*(table.column(i).to_pylist() for i in range(3)), strict=True), 1):
        try:
            normal = normalise_url(raw)
        except UrlRejected:
            continue
        values.append((hashlib.md5(normal.encode()).digest(), normal, line, json.dumps({"id": ident, "caption": caption})))
    with db.connect(url) as conn:
        file_id = conn.execute("INSERT INTO corpus_files (path, content_sha256, size_bytes) VALUES ('b', 'b', 0) "
                               "RETURNING file_id").fetchone()[0]
        conn.execute("INSERT INTO shards (shard_id, shard_no, file_id, url_count) VALUES ('s000001', 1, %s, 0)",
                     (file_id,))
        with conn.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO corpus_urls (url_hash, url, shard_id, source_file_id, source_line, metadata) "
                "VALUES (%s, %s, 's000001', %s, %s, %s::jsonb) ON CONFLICT (url_hash) DO NOTHING",
                [(h, u, file_id, line, meta) for h, u, line, meta in values],
            )
        conn.commit()
    elapsed = time.monotonic() - started
    emit("baseline_naive_executemany", rows_read=rows, elapsed_s=round(elapsed, 2), urls_per_s=round(rows / elapsed, 1),
         peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))


def _run_child(*args: str) -> dict:
    output = subprocess.run([sys.executable, __file__, *args], check=True, stdout=subprocess.PIPE, text=True).stdout
    line = [x for x in output.splitlines() if x.startswith("{")][-1]
    print(line, flush=True)
    return json.loads(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000_000)
    parser.add_argument("--formats", default="parquet,csv", help="which generated files to ingest, in order")
    parser.add_argument("--baseline-rows", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=ROOT / ".bench_out" / "ingest")
    parser.add_argument("--keep-db", action="store_true", help="keep the bench databases")
    parser.add_argument("--child", nargs=4, metavar=("KIND", "PATH", "DB_URL", "ARG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, path, url, extra = args.child
        child_ingest(path, url, extra) if kind == "ingest" else child_baseline(path, url, int(extra))
        return
    files = generate(args.rows, args.out)
    emit("machine", cpus=os.cpu_count(), load_avg_1m=round(os.getloadavg()[0], 2))
    created = []
    try:
        name = "imgpipe_bench_baseline"
        created.append(url := _fresh_database(name))
        baseline = _run_child("--child", "baseline", str(files["parquet"]), url, str(args.baseline_rows))
        for fmt in args.formats.split(","):
            created.append(url := _fresh_database(f"imgpipe_bench_{fmt}"))
            figure = _run_child("--child", "ingest", str(files[fmt]), url, fmt)
            emit(f"ratio_{fmt}_vs_baseline", ratio=round(figure["urls_per_s"] / baseline["urls_per_s"], 1),
                 target_met=figure["elapsed_s"] <= 600 and figure["peak_rss_mb"] < 2048)
            emit("machine", load_avg_1m=round(os.getloadavg()[0], 2))
    finally:
        if not args.keep_db:
            for url in created:
                db.drop_database(url)


if __name__ == "__main__":
    main()
