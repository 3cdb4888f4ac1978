"""Helpers the tests share: seeding a corpus straight into the tables, free ports."""

from __future__ import annotations

import hashlib
import socket

import psycopg


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port_pair() -> int:
    """A base port whose successor is free too (two GPU servers on base, base+1)."""
    for _ in range(50):
        base = free_port()
        try:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", base + 1))
            return base
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


def seed_corpus(conn: psycopg.Connection, shards: dict[str, list[str]]) -> None:
    """Insert shards and their URLs as an ingest would (pending, no attempts)."""
    for number, (shard_id, urls) in enumerate(shards.items(), start=1):
        conn.execute(
            "INSERT INTO shards (shard_id, shard_no, url_count) VALUES (%s, %s, %s)", (shard_id, number, len(urls))
        )
        with conn.cursor().copy("COPY corpus_urls (url_hash, url, shard_id, source_line) FROM STDIN") as copy:
            for line, url in enumerate(urls, start=1):
                copy.write_row((hashlib.md5(url.encode()).digest(), url, shard_id, line))
    conn.commit()
