"""Helpers the tests share: seeding a corpus straight into the tables, and addresses where nothing
listens.

Servers the tests start bind port 0 and report the port they got; nothing here picks a port for a
server to bind later, except ``gpu_base_port`` (the chaos test restarts a killed GPU server on its port)."""

from __future__ import annotations

import contextlib
import hashlib
import random
import socket
from collections.abc import Iterator
from pathlib import Path

import psycopg


@contextlib.contextmanager
def refused_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A port that refuses connections for as long as the block runs: bound by us, never listening.

    Holding the socket keeps anyone else from taking the port, so "nothing answers there" stays true.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        yield sock.getsockname()[1]


_RANDOM = random.SystemRandom()  # never the global generator: a test may seed that one


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def gpu_base_port(host: str = "127.0.0.1") -> int:
    """A base port for the GPU server launcher, whose servers bind base, base+1, ... themselves.

    The launcher takes a base port, not port 0, so this one has to be chosen ahead of the servers.
    To keep that from racing with the rest of the machine it is drawn at random below the kernel's
    ephemeral range (outgoing connections and port-0 binds never land there), and checked free.
    """
    low = _ephemeral_low()
    for _ in range(200):
        base = _RANDOM.randrange(max(1024, low - 12000), low - 2)
        try:
            with socket.socket() as first, socket.socket() as second:
                first.bind((host, base))
                second.bind((host, base + 1))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no two adjacent free ports below {low}")


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
