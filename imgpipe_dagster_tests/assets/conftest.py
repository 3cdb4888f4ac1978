"""One managed tiny-model GPU server on the CPU for asset tests that need analyses but not two servers."""

from __future__ import annotations

import pytest

from imgpipe_dagster.gpu_server.launcher import GpuServerLauncher
from imgpipe_dagster.paths import gpu_server_records_dir
from imgpipe_dagster.resources import GpuModelResource


@pytest.fixture
def one_gpu_server(tiny_model_dir, imgpipe_home):
    resource = GpuModelResource(devices=["cpu"], base_port=0, model_path=str(tiny_model_dir), idle_timeout_s=300,
                                startup_timeout_s=300)  # fmt: skip
    yield resource
    GpuServerLauncher(gpu_server_records_dir(imgpipe_home)).stop()
