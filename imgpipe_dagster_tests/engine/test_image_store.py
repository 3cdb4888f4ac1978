"""The image store's files on their own: webdataset samples read back by seek, a crashed run's part
ignored, and the IMGPIPE_IMAGE_STORE setting."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from imgpipe_dagster.engine.image_store import ImageStore
from imgpipe_dagster.environment import read_environment
from imgpipe_dagster.fetch import FetchResult
from imgpipe_dagster.paths import image_store_dir


def jpeg(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buffer, "JPEG")
    return buffer.getvalue()


def fetched(url: str, colour: str) -> FetchResult:
    return FetchResult(key=None, url=url, ok=True, image_bytes=jpeg(colour), width=400, height=300,
                       resized_width=40, resized_height=30, format="JPEG", content_type="image/jpeg",
                       http_status=200, bytes=12345, sha256=colour * 4, phash=-7)  # fmt: skip


def test_samples_read_back_by_seek_from_a_closed_part(tmp_path):
    writer = ImageStore(tmp_path, "run-1")
    images = {f"{n:032x}": fetched(f"https://example.org/{n}.jpg", colour) for n, colour in enumerate(["red", "blue"])}
    for key, result in images.items():
        writer.add("s000001", key, result)
    writer.close()

    reader = ImageStore(tmp_path, "run-2")
    assert reader.stored("s000001") == 2
    for key, original in images.items():
        loaded = reader.load("s000001", key, original.url, "caller-key")
        assert loaded.ok and loaded.key == "caller-key" and loaded.image_bytes == original.image_bytes
        assert (loaded.sha256, loaded.phash, loaded.width, loaded.resized_height) == (original.sha256, -7, 400, 30)
    assert reader.load("s000001", "f" * 32, "https://example.org/x.jpg", None) is None
    (tar_path,) = (tmp_path / "s000001").glob("*.tar")
    with tarfile.open(tar_path) as tar:  # a plain tar any webdataset reader takes
        assert sorted(tar.getnames()) == sorted(f"{k}.{e}" for k in images for e in ("jpg", "json"))


def test_a_crashed_runs_part_is_ignored(tmp_path):
    crashed = ImageStore(tmp_path, "run-1")
    crashed.add("s000001", "a" * 32, fetched("https://example.org/a.jpg", "red"))
    # no close(): the run died; its part stays .tar.partial without an index
    assert [p.name.endswith(".tar.partial") for p in (tmp_path / "s000001").iterdir()] == [True]
    assert ImageStore(tmp_path, "run-2").stored("s000001") == 0


@pytest.mark.parametrize(("value", "expected"), [
    (None, None), ("0", None), ("off", None), ("1", "default"), ("on", "default"), ("/data/images", "/data/images"),
])  # fmt: skip
def test_image_store_setting(value, expected, tmp_path, monkeypatch):
    environ = {"IMGPIPE_HOME": str(tmp_path)} | ({"IMGPIPE_IMAGE_STORE": value} if value is not None else {})
    assert read_environment(environ).image_store == expected
    monkeypatch.setenv("IMGPIPE_HOME", str(tmp_path))
    if value is None:
        monkeypatch.delenv("IMGPIPE_IMAGE_STORE", raising=False)
    else:
        monkeypatch.setenv("IMGPIPE_IMAGE_STORE", value)
    if expected is None:
        assert image_store_dir() is None
    else:
        assert image_store_dir() == (tmp_path.resolve() / "image-store" if expected == "default" else Path(expected))


def test_an_unknown_prompt_is_a_clear_error():
    from imgpipe_dagster.versioning import configured_analysis_version

    with pytest.raises(ValueError, match="unknown prompt 'no_such_prompt'"):
        configured_analysis_version(read_environment({"IMGPIPE_PROMPT": "no_such_prompt"}))
