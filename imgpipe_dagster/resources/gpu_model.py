from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from dagster import ConfigurableResource, Failure, InitResourceContext
from pydantic import Field, PrivateAttr

from imgpipe_dagster.environment import (
    GPU_BASE_PORT_ENV,
    GPU_DEVICES_ENV,
    GPU_TOKEN_ENV,
    MAX_NEW_TOKENS_ENV,
    MODEL_PATH_ENV,
)
from imgpipe_dagster.gpu_server.health import HealthUnavailable, fetch_health
from imgpipe_dagster.gpu_server.launcher import GpuServerLauncher, ServerStartError
from imgpipe_dagster.gpu_server.settings import ServerSettings
from imgpipe_dagster.paths import imgpipe_home
from imgpipe_dagster.profiles import GpuServerProfile
from imgpipe_dagster.settings_map import model_settings, server_settings

log = logging.getLogger("imgpipe.resources")

# The tiny test model's text is noise: generating the profile's 128 tokens of it only costs CPU time.
TINY_MODEL_MAX_NEW_TOKENS = 16
DEFAULT_BASE_PORT = 8000


class GpuModelResource(ConfigurableResource):
    """The Qwen-VL servers a run sends images to.

    ``managed``: health-check one server per GPU on base_port, base_port+1, … and start the missing
    ones as detached processes (a lock per port, so two runs never start the same one). A running
    server with other settings than the run's profile is reconfigured live or restarted once idle;
    the run log says which. Servers stay warm for the next run and leave after ``idle_timeout_s``.
    ``external``: only attach to ``endpoints`` (servers on other machines, started with
    ``imgpipe gpu-server start``). definitions.py fills the fields from the environment."""

    mode: Literal["managed", "external"] = Field(default="managed")
    endpoints: list[str] = Field(default_factory=list, description="external mode: server base URLs")
    model_path: str | None = Field(
        default=None,
        description=f"local Qwen2-VL / Qwen2.5-VL checkpoint (${MODEL_PATH_ENV}); empty means the tiny random "
        "test model (its text is noise)",
    )
    devices: list[str] | None = Field(
        default=None, description=f"managed mode: devices (cuda:0, cpu…; ${GPU_DEVICES_ENV}); empty means every GPU"
    )
    base_port: int = Field(
        default=DEFAULT_BASE_PORT,
        description=f"managed mode: first server's port (${GPU_BASE_PORT_ENV}); 0 means any free port per server",
    )
    idle_timeout_s: float = Field(default=900.0, description="managed servers exit after this long unused")
    startup_timeout_s: float = Field(default=900.0)
    restart_wait_s: float = Field(
        default=300.0, description="how long a run waits for a busy server to become idle before restarting it"
    )
    token: str | None = Field(default=None, description=f"bearer token (${GPU_TOKEN_ENV})")
    max_new_tokens: int | None = Field(
        default=None, description=f"overrides the profile's max_new_tokens (${MAX_NEW_TOKENS_ENV})"
    )
    compile_model: bool = Field(
        default=True,
        description="GPU servers: torch.compile the vision tower and the language step (the measured H200 "
        "figures used it; the first batch pays the compile time). Ignored on the CPU.",
    )
    # Dagster's logger of the run (or sensor) using the resource: what ensure_endpoints did reaches it.
    _log: logging.Logger | logging.LoggerAdapter | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: InitResourceContext) -> None:
        self._log = context.log

    def bearer_token(self) -> str | None:
        return self.token or None

    def resolved_model_path(self) -> tuple[str, bool]:
        """(path, is_tiny_test_model)."""
        if self.model_path:
            from imgpipe_dagster.gpu_server.tiny_model import is_tiny_model

            return self.model_path, is_tiny_model(self.model_path)
        return str(ensure_tiny_model()), True

    def server_settings(self, profile: GpuServerProfile) -> ServerSettings:
        """What the managed servers run for this profile (settings_map, with this deployment's fields)."""
        model_path, tiny = self.resolved_model_path()
        max_new_tokens = self.max_new_tokens or (min(profile.max_new_tokens, TINY_MODEL_MAX_NEW_TOKENS) if tiny else None)
        if max_new_tokens:
            profile = profile.model_copy(update={"max_new_tokens": max_new_tokens})
        model = model_settings(profile, model_path, compile_vision=self.compile_model,
                               compile_language=self.compile_model)  # fmt: skip
        return server_settings(profile, model, port=self.base_port, bearer_token=self.bearer_token(),
                               idle_timeout_s=self.idle_timeout_s)  # fmt: skip

    def launcher(self, profile: GpuServerProfile) -> GpuServerLauncher:
        return GpuServerLauncher(None, self.server_settings(profile), startup_timeout_s=self.startup_timeout_s,
                                 restart_wait_s=self.restart_wait_s)  # fmt: skip

    def ensure_endpoints(self, profile: GpuServerProfile) -> list[str]:
        """Base URLs of the servers this run uses (starting managed ones that are missing, and bringing
        running ones to this profile's settings)."""
        report = self._log or log
        if self.mode == "external":
            if not self.endpoints:
                raise ValueError("gpu_model mode 'external' needs at least one endpoint URL")
            for url in self.endpoints:
                try:
                    health = fetch_health(url, 5.0, token=self.bearer_token())
                    report.info(f"GPU server {url}: {health.status}, queue {health.queue_size}, "
                                f"settings {health.settings_hash or 'not reported'} (external: not changed by runs)")  # fmt: skip
                except HealthUnavailable as exc:
                    report.warning(f"GPU server {url} is not answering ({exc}); the run waits for it")
            return list(self.endpoints)
        try:
            endpoints = self.launcher(profile).ensure(self.devices, base_port=self.base_port)
        except ServerStartError as error:
            # the run's failure message is the one line that says why, not the stack below it
            raise Failure(description=f"GPU servers did not start: {error}", allow_retries=False) from None
        for endpoint in endpoints:
            report.info(endpoint.describe())
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
