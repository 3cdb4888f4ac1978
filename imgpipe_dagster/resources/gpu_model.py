from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

import httpx
from dagster import ConfigurableResource
from pydantic import Field

from imgpipe_dagster.gpu_server.launcher import GpuServerLauncher
from imgpipe_dagster.gpu_server.settings import ServerSettings
from imgpipe_dagster.paths import imgpipe_home
from imgpipe_dagster.profiles import GpuServerProfile

log = logging.getLogger("imgpipe.resources")

MODEL_PATH_ENV = "IMGPIPE_MODEL_PATH"
MAX_NEW_TOKENS_ENV = "IMGPIPE_MAX_NEW_TOKENS"
# The tiny test model's text is noise: generating the profile's 128 tokens of it only costs CPU time.
TINY_MODEL_MAX_NEW_TOKENS = 16
TOKEN_ENV = "IMGPIPE_GPU_TOKEN"
DEVICES_ENV = "IMGPIPE_GPU_DEVICES"
BASE_PORT_ENV = "IMGPIPE_GPU_BASE_PORT"
DEFAULT_BASE_PORT = 8000


class GpuModelResource(ConfigurableResource):
    """The Qwen-VL servers a run sends images to.

    ``managed``: health-check one server per GPU on base_port, base_port+1, … and start the missing
    ones as detached processes (a lock per port, so two runs never start the same one). Servers stay
    warm for the next run and leave after ``idle_timeout_s``. ``external``: only attach to
    ``endpoints`` (servers on other machines, started with ``imgpipe gpu-server start``)."""

    mode: Literal["managed", "external"] = Field(default="managed")
    endpoints: list[str] = Field(default_factory=list, description="external mode: server base URLs")
    model_path: str | None = Field(
        default=None,
        description=f"local Qwen2-VL / Qwen2.5-VL checkpoint; empty means ${MODEL_PATH_ENV}, else the tiny "
        "random test model (its text is noise)",
    )
    devices: list[str] | None = Field(
        default=None, description=f"managed mode: devices (cuda:0, cpu…); empty means ${DEVICES_ENV} or every GPU"
    )
    base_port: int | None = Field(
        default=None, description=f"managed mode: first server's port; empty means ${BASE_PORT_ENV}, else 8000"
    )
    idle_timeout_s: float = Field(default=900.0, description="managed servers exit after this long unused")
    startup_timeout_s: float = Field(default=900.0)
    token: str | None = Field(default=None, description=f"bearer token; empty means ${TOKEN_ENV}")
    compile_model: bool = Field(
        default=True,
        description="GPU servers: torch.compile the vision tower and the language step (the measured H200 "
        "figures used it; the first batch pays the compile time). Ignored on the CPU.",
    )

    def bearer_token(self) -> str | None:
        return self.token or os.environ.get(TOKEN_ENV) or None

    def resolved_model_path(self) -> tuple[str, bool]:
        """(path, is_tiny_test_model)."""
        configured = self.model_path or os.environ.get(MODEL_PATH_ENV)
        if configured:
            from imgpipe_dagster.gpu_server.tiny_model import is_tiny_model

            return configured, is_tiny_model(configured)
        return str(ensure_tiny_model()), True

    def resolved_base_port(self) -> int:
        return self.base_port or int(os.environ.get(BASE_PORT_ENV) or DEFAULT_BASE_PORT)

    def resolved_devices(self) -> list[str] | None:
        if self.devices:
            return list(self.devices)
        configured = os.environ.get(DEVICES_ENV)
        return [d.strip() for d in configured.split(",") if d.strip()] if configured else None

    def max_new_tokens(self, profile: GpuServerProfile, tiny: bool) -> int:
        configured = os.environ.get(MAX_NEW_TOKENS_ENV)
        if configured:
            return int(configured)
        return min(profile.max_new_tokens, TINY_MODEL_MAX_NEW_TOKENS) if tiny else profile.max_new_tokens

    def server_settings(self, profile: GpuServerProfile) -> ServerSettings:
        model_path, tiny = self.resolved_model_path()
        return ServerSettings(
            max_concurrent_generations=profile.max_concurrent_generations,
            max_inference_queue_size=profile.max_inference_queue_size,
            max_inference_batch_size=profile.max_inference_batch_size,
            max_batch_images=profile.max_batch_images,
            batch_wait_timeout=profile.batch_wait_timeout,
            gen_time_default_est=profile.gen_time_default_est,
            clear_cache_every_n_requests=profile.clear_cache_every_n_requests,
            enable_memory_defrag=profile.enable_memory_defrag,
            use_fp16=profile.use_fp16,
            enable_tf32=profile.enable_tf32,
            use_flash_attention=profile.use_flash_attention,
            max_new_tokens=self.max_new_tokens(profile, tiny),
            engine_options={"compile_vision": self.compile_model, "compile_language": self.compile_model},
            port=self.resolved_base_port(),
            model_path=model_path,
            bearer_token=self.bearer_token(),
            idle_timeout_s=self.idle_timeout_s,
        )

    def launcher(self, profile: GpuServerProfile) -> GpuServerLauncher:
        return GpuServerLauncher(
            imgpipe_home() / "gpu-servers", self.server_settings(profile), startup_timeout_s=self.startup_timeout_s
        )

    def ensure_endpoints(self, profile: GpuServerProfile) -> list[str]:
        """Base URLs of the servers this run uses (starting managed ones that are missing)."""
        if self.mode == "external":
            if not self.endpoints:
                raise ValueError("gpu_model mode 'external' needs at least one endpoint URL")
            for url in self.endpoints:
                try:
                    health = httpx.get(url.rstrip("/") + "/health", timeout=5).json()
                    log.info("GPU server %s: %s, queue %s", url, health.get("status"), health.get("queue_size"))
                except (httpx.HTTPError, ValueError) as exc:
                    log.warning("GPU server %s is not answering (%s); the run waits for it", url, exc)
            return list(self.endpoints)
        endpoints = self.launcher(profile).ensure(self.resolved_devices(), base_port=self.resolved_base_port())
        return [e.url for e in endpoints]


def ensure_tiny_model() -> Path:
    """The tiny random Qwen2-VL under $IMGPIPE_HOME/models/tiny-qwen2-vl (built once, under a lock)."""
    from filelock import FileLock

    from imgpipe_dagster.gpu_server.tiny_model import build_tiny_model, is_tiny_model

    target = imgpipe_home() / "models" / "tiny-qwen2-vl"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock", timeout=300):
        if not is_tiny_model(target):
            log.warning("no %s set: building the tiny random test model in %s (its text is noise)",
                        MODEL_PATH_ENV, target)
            build_tiny_model(target)
    return target
