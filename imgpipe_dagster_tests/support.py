"""Helpers the tests share: seeding a corpus straight into the tables, and addresses where nothing
listens.

Servers the tests start bind port 0 and report the port they got; nothing here picks a port for a
server to bind later."""

from __future__ import annotations

import contextlib
import hashlib
import socket
from collections.abc import Iterator

import psycopg


@contextlib.contextmanager
def refused_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A port that refuses connections for as long as the block runs: bound by us, never listening.

    Holding the socket keeps anyone else from taking the port, so "nothing answers there" stays true.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        yield sock.getsockname()[1]


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
