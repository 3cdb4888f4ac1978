"""The wheel carries resources/ (SQL, prompts, sample photos, configs) and the instance files."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from imgpipe_dagster.paths import resource_path
from imgpipe_dagster.store.migrations import available_migrations

REPO = Path(__file__).resolve().parents[2]


def test_resources_are_found_from_a_checkout():
    assert resource_path("sql").is_dir()
    assert available_migrations()[0].name == "initial"


@pytest.mark.slow
def test_wheel_ships_resources_and_instance_files(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, timeout=300)  # fmt: skip
    (wheel,) = tmp_path.glob("imgpipe_dagster-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "imgpipe_dagster/_resources/sql/001_initial.sql" in names
    assert any(n.startswith("imgpipe_dagster/_resources/prompts/") for n in names)
    assert "imgpipe_dagster/_resources/instance/dagster.yaml" in names
    assert "imgpipe_dagster/_resources/profiles/medium.yaml" in names
    assert not any(n.startswith("imgpipe_dagster_tests/") for n in names)
