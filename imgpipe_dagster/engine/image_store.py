"""The opt-in image store: the resized images a shard sent to the model, kept for re-analysis.

Layout, the webdataset convention img2dataset users know, one folder per shard under the base path::

    <base>/<shard_id>/<part>.tar        samples <key>.jpg (the bytes the GPU server got) + <key>.json
    <base>/<shard_id>/<part>.index.json {key: [data offset, size, sample metadata]} for reads by seek

``key`` is the URL's url_hash in hex. Each run writes its own part (runs of one shard never share a
file); a part is written as ``.tar.partial`` and renamed when the run closes it, then its index is
written, so a crashed run leaves a partial file that is ignored (its images are downloaded again).
No Dagster here: the runner writes and reads it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import time
from pathlib import Path

from imgpipe_dagster.fetch import FetchResult

log = logging.getLogger("imgpipe.engine")

# The FetchResult fields a stored sample keeps (the url_analysis_results columns of a download).
SAMPLE_FIELDS = ("url", "sha256", "phash", "width", "height", "resized_width", "resized_height", "format",
                 "content_type", "http_status", "bytes")  # fmt: skip
_EXTENSIONS = {"JPEG": "jpg", "PNG": "png"}
_BLOCK = tarfile.BLOCKSIZE


class ShardImageWriter:
    """One run's part of one shard: samples appended as they are fetched, closed at the end of the run."""

    def __init__(self, folder: Path, part: str, image_format: str = "JPEG") -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.final_path = folder / f"{part}.tar"
        self.index_path = folder / f"{part}.index.json"
        self.partial_path = folder / f"{part}.tar.partial"
        self.extension = _EXTENSIONS.get(image_format.upper(), "jpg")
        self._tar = tarfile.open(self.partial_path, "w", format=tarfile.USTAR_FORMAT)
        self._index: dict[str, list] = {}

    def add(self, key: str, result: FetchResult) -> None:
        if key in self._index or not result.image_bytes:
            return
        meta = {name: getattr(result, name) for name in SAMPLE_FIELDS}
        self._add_member(f"{key}.json", json.dumps(meta, separators=(",", ":")).encode())
        offset = self._add_member(f"{key}.{self.extension}", result.image_bytes)
        self._index[key] = [offset, len(result.image_bytes), meta]

    def _add_member(self, name: str, data: bytes) -> int:
        """Append one file; returns the offset of its data in the tar."""
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = int(time.time())
        self._tar.addfile(info, io.BytesIO(data))
        # after a member the tar stands at the end of its data, padded to a whole block
        padded = -(-len(data) // _BLOCK) * _BLOCK
        return self._tar.offset - padded

    @property
    def samples(self) -> int:
        return len(self._index)

    def close(self) -> None:
        self._tar.close()
        if not self._index:
            self.partial_path.unlink(missing_ok=True)
            return
        os.replace(self.partial_path, self.final_path)
        temporary = self.index_path.with_suffix(".json.partial")
        temporary.write_text(json.dumps(self._index, separators=(",", ":")))
        os.replace(temporary, self.index_path)


class ImageStore:
    """The store under one base path: a writer per shard for a run, and reads of what earlier runs kept."""

    def __init__(self, base: str | Path, owner: str, image_format: str = "JPEG") -> None:
        self.base = Path(base)
        self.owner = owner
        self.image_format = image_format
        self._writers: dict[str, ShardImageWriter] = {}
        self._indexes: dict[str, dict[str, tuple[Path, int, int, dict]]] = {}
        self.read = 0  # images served from the store
        self.written = 0  # images added to the store

    def shard_folder(self, shard_id: str) -> Path:
        return self.base / shard_id

    def _index(self, shard_id: str) -> dict[str, tuple[Path, int, int, dict]]:
        """{key: (tar, offset, size, meta)} of the shard's closed parts (a later part wins)."""
        if shard_id not in self._indexes:
            found: dict[str, tuple[Path, int, int, dict]] = {}
            for index_path in sorted(self.shard_folder(shard_id).glob("*.index.json")):
                tar_path = index_path.with_name(index_path.name.removesuffix(".index.json") + ".tar")
                if not tar_path.is_file():
                    continue
                try:
                    entries = json.loads(index_path.read_text())
                except (OSError, ValueError) as exc:
                    log.warning("image store index %s unreadable (%s); its images are downloaded again", index_path, exc)
                    continue
                for key, (offset, size, meta) in entries.items():
                    found[key] = (tar_path, offset, size, meta)
            self._indexes[shard_id] = found
        return self._indexes[shard_id]

    def stored(self, shard_id: str) -> int:
        return len(self._index(shard_id))

    def load(self, shard_id: str, key: str, url: str, caller_key) -> FetchResult | None:
        """The stored sample of ``key`` as a successful FetchResult, or None when it is not stored."""
        entry = self._index(shard_id).get(key)
        if entry is None:
            return None
        tar_path, offset, size, meta = entry
        try:
            with open(tar_path, "rb") as file:
                file.seek(offset)
                data = file.read(size)
        except OSError as exc:
            log.warning("image store %s unreadable (%s); downloading %s again", tar_path, exc, url)
            return None
        if len(data) != size:
            return None
        self.read += 1
        fields = {name: meta.get(name) for name in SAMPLE_FIELDS if name != "url"}
        return FetchResult(key=caller_key, url=url, ok=True, image_bytes=data, download_ms=0.0, **fields)

    def add(self, shard_id: str, key: str, result: FetchResult) -> None:
        writer = self._writers.get(shard_id)
        if writer is None:
            part = f"{time.strftime('%Y%m%dT%H%M%S')}-{self.owner[:12]}"
            writer = self._writers[shard_id] = ShardImageWriter(self.shard_folder(shard_id), part, self.image_format)
        before = writer.samples
        writer.add(key, result)
        self.written += writer.samples - before

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
