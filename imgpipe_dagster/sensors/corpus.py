"""The corpus sensor: URL files dropped into ``IMGPIPE_CORPUS_DIR`` become an ``ingest_corpus`` run.

Every 30 s it lists the top level of the drop directory for URL files (``.txt .csv .tsv .jsonl
.parquet``, optionally ``.gz`` / ``.zst``; hidden files and writers' temporary names such as
``.part``/``.tmp`` are ignored) and requests one ``ingest_corpus`` run naming the ready files.

* **A file still being written is not taken**: a file is ready when its size and mtime are the
  same as at the previous tick (the cursor remembers what each tick saw), or when its mtime is
  older than ``SETTLED_AFTER_S`` (a file that was complete before the sensor first looked).
* **A file is taken once**: the cursor keys taken files by path + size + mtime; a file replaced
  by a different one (new size or mtime) is taken again, and the ingest itself skips content it
  already holds (corpus_files.content_sha256).

Default status: running; with ``IMGPIPE_CORPUS_DIR`` unset it skips with that reason. Dropping a
file is the operator's explicit act, so ingesting it needs no further switch (ingesting adds
shards; analysing them is the throttle's decision).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from dagster import DefaultSensorStatus, RunRequest, SensorEvaluationContext, SensorResult, SkipReason, sensor

from imgpipe_dagster.environment import CORPUS_DIR_ENV, read_environment
from imgpipe_dagster.jobs import INGEST_JOB

URL_FILE_SUFFIXES = (".txt", ".csv", ".tsv", ".jsonl", ".parquet")
COMPRESSION_SUFFIXES = (".gz", ".zst")
TEMPORARY_SUFFIXES = (".part", ".partial", ".tmp", ".crdownload", ".download", ".filepart")
# A file whose mtime is this old is complete even if the sensor never saw it before.
SETTLED_AFTER_S = 120.0
# Files per ingest run at most (a directory full of files becomes several runs over ticks).
MAX_FILES_PER_RUN = 100
# The url_corpus asset's Config field that lists the files to ingest.
INGEST_OP = "url_corpus"
INGEST_PATHS_FIELD = "paths"


@dataclass(frozen=True)
class Seen:
    path: str
    size: int
    mtime_ns: int

    @property
    def key(self) -> str:
        return f"{self.size}:{self.mtime_ns}"


def is_url_file(name: str) -> bool:
    lower = name.lower()
    if lower.startswith(".") or lower.endswith(TEMPORARY_SUFFIXES):
        return False
    for compression in ("", *COMPRESSION_SUFFIXES):
        if lower.endswith(compression):
            base = lower[: len(lower) - len(compression)] if compression else lower
            if base.endswith(URL_FILE_SUFFIXES):
                return True
    return False


def scan(directory: Path) -> list[Seen]:
    found = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if not entry.is_file(follow_symlinks=True) or not is_url_file(entry.name):
                continue
            try:
                stat = entry.stat(follow_symlinks=True)
            except OSError:
                continue  # removed between listing and stat
            found.append(Seen(str(Path(entry.path).resolve()), stat.st_size, stat.st_mtime_ns))
    return sorted(found, key=lambda s: s.path)


def load_cursor(cursor: str | None) -> dict:
    try:
        data = json.loads(cursor) if cursor else {}
    except ValueError:
        data = {}
    return {"taken": dict(data.get("taken", {})), "seen": dict(data.get("seen", {}))}


def plan(files: list[Seen], cursor: dict, now: float) -> tuple[list[Seen], list[Seen], dict]:
    """(ready files to take, files still settling, the next cursor)."""
    taken, seen_before = cursor["taken"], cursor["seen"]
    ready, settling = [], []
    for f in files:
        if taken.get(f.path) == f.key:
            continue
        stable = seen_before.get(f.path) == f.key
        settled = now - f.mtime_ns / 1e9 >= SETTLED_AFTER_S
        if (stable or settled) and f.size > 0:
            ready.append(f)
        else:
            settling.append(f)
    ready = ready[:MAX_FILES_PER_RUN]
    new_taken = {**taken, **{f.path: f.key for f in ready}}
    present = {f.path for f in files}
    # Forget files that disappeared, so the cursor does not grow without bound.
    new_taken = {path: key for path, key in new_taken.items() if path in present}
    # What this tick saw of every file not taken: next tick, an unchanged one is stable.
    seen_now = {f.path: f.key for f in files if new_taken.get(f.path) != f.key}
    return ready, settling, {"taken": new_taken, "seen": seen_now}


def ingest_run_config(paths: list[str]) -> dict:
    return {"ops": {INGEST_OP: {"config": {INGEST_PATHS_FIELD: paths}}}}


def corpus_tick(context: SensorEvaluationContext, directory: str | None, now: float | None = None):
    if not directory:
        return SkipReason(f"{CORPUS_DIR_ENV} is not set: no drop directory to watch")
    folder = Path(directory)
    if not folder.is_dir():
        return SkipReason(f"drop directory {folder} does not exist")
    files = scan(folder)
    ready, settling, cursor = plan(files, load_cursor(context.cursor), time.time() if now is None else now)
    waiting = f"; {len(settling)} still being written: {', '.join(Path(s.path).name for s in settling)}"
    if not ready:
        return SensorResult(
            cursor=json.dumps(cursor), skip_reason=f"no new URL file in {folder}{waiting if settling else ''}"
        )
    paths = [f.path for f in ready]
    run_key = (
        "corpus:" + hashlib.sha256("\n".join(f"{f.path}:{f.key}" for f in ready).encode()).hexdigest()[:24]
    )
    context.log.info(f"ingesting {len(paths)} file(s): {', '.join(Path(p).name for p in paths)}")
    request = RunRequest(
        run_key=run_key,
        run_config=ingest_run_config(paths),
        tags={"imgpipe/kind": "ingest", "imgpipe/files": str(len(paths))},
    )
    return SensorResult(run_requests=[request], cursor=json.dumps(cursor))


@sensor(
    name="corpus_files",
    job=INGEST_JOB,
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    description=f"Ingests new URL files dropped into ${CORPUS_DIR_ENV} (each file once, never half-written).",
)
def corpus_files(context: SensorEvaluationContext):
    return corpus_tick(context, read_environment().corpus_dir)
