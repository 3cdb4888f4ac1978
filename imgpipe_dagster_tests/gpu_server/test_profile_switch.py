"""A warm GPU server never silently runs another profile's settings.

Real Dagster runs use the real gpu_model resource the way image_analysis does (ensure_endpoints with
the run's resolved profile) against a real tiny-model server process; /health shows what it runs.
"""

from pathlib import Path
from typing import Optional

import httpx
from dagster import Config, DagsterInstance, asset, materialize

from imgpipe_dagster.gpu_server.settings import settings_hash
from imgpipe_dagster.profiles import resolve
from imgpipe_dagster.resources import GpuModelResource


class SwitchConfig(Config):
    profile: str
    # gpu_server overrides of the profile, as a run's config may set them
    enable_tf32: Optional[bool] = None  # noqa: UP045 - Dagster reads typing.Optional


@asset
def gpu_servers_for_profile(config: SwitchConfig, gpu_model: GpuModelResource) -> list[str]:
    _, gpu = resolve(config.profile, gpu_overrides={"enable_tf32": config.enable_tf32})
    return gpu_model.ensure_endpoints(gpu)


def run(instance: DagsterInstance, gpu_model: GpuModelResource, profile: str, **overrides) -> tuple[str, list[str]]:
    """One real run; (its GPU server URL, the lines it logged)."""
    result = materialize(
        [gpu_servers_for_profile], instance=instance, resources={"gpu_model": gpu_model},
        run_config={"ops": {"gpu_servers_for_profile": {"config": {"profile": profile, **overrides}}}},
    )  # fmt: skip
    assert result.success
    (url,) = result.output_for_node("gpu_servers_for_profile")
    lines = [entry.user_message for entry in instance.all_logs(result.run_id) if entry.user_message]
    return url, [line for line in lines if line.startswith("GPU server")]


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=30).json()


def test_switching_profiles_reconfigures_live_fields_and_restarts_for_the_model_part(
    tiny_model_dir: Path, imgpipe_home: Path
) -> None:
    gpu_model = GpuModelResource(devices=["cpu"], base_port=0, model_path=str(tiny_model_dir),
                                 idle_timeout_s=300, startup_timeout_s=300, restart_wait_s=60)  # fmt: skip
    instance = DagsterInstance.ephemeral()
    try:
        url, lines = run(instance, gpu_model, "medium")
        first = health(url)
        medium = gpu_model.server_settings(resolve("medium")[1])
        assert (first["settings"]["max_inference_queue_size"], first["settings"]["max_batch_images"]) == (1000, 256)
        assert first["settings"]["max_concurrent_generations"] == first["workers"] == 6
        assert first["settings_hash"] == settings_hash(medium)
        assert len(lines) == 1 and lines[0].endswith(": started") and first["settings_hash"] in lines[0]

        # conservative differs in batching and queue fields only: the same process takes them over.
        url_again, lines = run(instance, gpu_model, "conservative")
        second = health(url_again)
        conservative = gpu_model.server_settings(resolve("conservative")[1])
        assert url_again == url and second["pid"] == first["pid"]
        assert (second["settings"]["max_inference_queue_size"], second["settings"]["max_batch_images"]) == (500, 128)
        assert second["workers"] == 4 and second["queue_capacity"] == 500
        assert second["settings"]["batch_wait_timeout"] == 0.05 and second["settings"]["gen_time_default_est"] == 4.0
        assert second["settings"]["model"]["clear_cache_every_n_requests"] == 50
        assert second["settings_hash"] == settings_hash(conservative) != first["settings_hash"]
        assert len(lines) == 1 and ": reconfigured (" in lines[0] and "max_inference_queue_size" in lines[0]
        record = next(iter(gpu_model.launcher(resolve("conservative")[1]).status()))
        assert record["settings_hash"] == second["settings_hash"]

        # The same profile again: nothing to change.
        assert run(instance, gpu_model, "conservative")[1][0].endswith(": reused")

        # A model-part field (a dtype flag) cannot change in a loaded model: the idle server restarts.
        url_third, lines = run(instance, gpu_model, "conservative", enable_tf32=False)
        third = health(url_third)
        assert third["pid"] != first["pid"] and third["settings"]["model"]["enable_tf32"] is False
        assert len(lines) == 1 and ": restarted (model.enable_tf32)" in lines[0]
    finally:
        gpu_model.launcher(resolve("medium")[1]).stop(timeout_s=10)
