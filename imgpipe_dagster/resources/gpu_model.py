from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Literal

from dagster import ConfigurableResource, Failure, InitResourceContext
from pydantic import Field, PrivateAttr

from imgpipe_dagster.environment import (
    GPU_API_ENV,
    GPU_BASE_PORT_ENV,
    GPU_DEVICES_ENV,
    GPU_TOKEN_ENV,
    MAX_NEW_TOKENS_ENV,
    MODEL_PATH_ENV,
    OPENAI_API_KEY_ENV,
)
from imgpipe_dagster.gpu_server.client import GpuClient
from imgpipe_dagster.gpu_server.discovery import discover_endpoints
from imgpipe_dagster.gpu_server.health import HealthUnavailable, fetch_health
from imgpipe_dagster.gpu_server.launcher import Endpoint, GpuServerLauncher, ServerStartError
from imgpipe_dagster.gpu_server.openai_client import OpenAIClient, openai_base_url
from imgpipe_dagster.gpu_server.registration import model_name
from imgpipe_dagster.gpu_server.settings import ServerSettings
from imgpipe_dagster.gpu_server.watchdog import ServerWatchdog
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
    ``imgpipe gpu-server start``). Both modes add the live servers registered in the project database
    that serve the run's model (``use_registry``). ``api`` chooses the protocol: the native one or the
    OpenAI chat completions (docs/GPU_TIER.md). definitions.py fills the fields from the environment."""

    mode: Literal["managed", "external"] = Field(default="managed")
    endpoints: list[str] = Field(
        default_factory=list,
        description="external mode: server base URLs (api openai: OpenAI-compatible base URLs, /v1 added "
        "when the URL has no path)",
    )
    api: Literal["native", "openai"] = Field(
        default="native",
        description=f"how runs talk to the GPU tier (${GPU_API_ENV}): native (the project's /v1/analyze, "
        "batched images) or openai (one chat-completions request per image: vLLM, SGLang, LMDeploy, TGI or "
        "the project's own server)",
    )
    api_key: str | None = Field(
        default=None, description=f"api openai: bearer API key (${OPENAI_API_KEY_ENV}); the token when unset"
    )
    openai_model: str | None = Field(
        default=None, description="api openai: the served model name; empty: the first of each server's /v1/models"
    )
    use_registry: bool = Field(
        default=True,
        description="also use the live GPU servers registered in the project database (gpu_servers) that "
        "serve this run's model (external mode with no model_path: every live one)",
    )
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
    # managed mode: the launcher and endpoints of the last ensure_endpoints (what keep_alive watches)
    _managed: tuple[GpuServerLauncher, list[Endpoint]] | None = PrivateAttr(default=None)

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

    def server_settings(self, profile: GpuServerProfile, registry_url: str | None = None) -> ServerSettings:
        """What the managed servers run for this profile (settings_map, with this deployment's fields)."""
        model_path, tiny = self.resolved_model_path()
        max_new_tokens = self.max_new_tokens or (min(profile.max_new_tokens, TINY_MODEL_MAX_NEW_TOKENS) if tiny else None)
        if max_new_tokens:
            profile = profile.model_copy(update={"max_new_tokens": max_new_tokens})
        model = model_settings(profile, model_path, compile_vision=self.compile_model,
                               compile_language=self.compile_model)  # fmt: skip
        server = server_settings(profile, model, port=self.base_port, bearer_token=self.bearer_token(),
                                 idle_timeout_s=self.idle_timeout_s)  # fmt: skip
        # managed servers announce themselves where the run's database is (a placement field: not hashed)
        return server.replace(registry_url=registry_url) if registry_url else server

    def launcher(self, profile: GpuServerProfile, registry_url: str | None = None) -> GpuServerLauncher:
        return GpuServerLauncher(None, self.server_settings(profile, registry_url),
                                 startup_timeout_s=self.startup_timeout_s, restart_wait_s=self.restart_wait_s)  # fmt: skip

    def ensure_endpoints(self, profile: GpuServerProfile, registry_url: str | None = None) -> list[str]:
        """Base URLs of the servers this run uses: managed ones (started when missing, brought to this
        profile's settings) or the listed ones, then the live servers of the registry in ``registry_url``
        that serve the run's model. With api openai, the OpenAI base URLs of those servers."""
        report = self._log or log
        if self.mode == "external":
            urls = list(self.endpoints)
            if self.api == "native":
                for url in urls:
                    _report_health(report, url, self.bearer_token())
        else:
            launcher = self.launcher(profile, registry_url)
            try:
                endpoints = launcher.ensure(self.devices, base_port=self.base_port)
            except ServerStartError as error:
                # the run's failure message is the one line that says why, not the stack below it
                raise Failure(description=f"GPU servers did not start: {error}", allow_retries=False) from None
            self._managed = (launcher, endpoints)
            for endpoint in endpoints:
                report.info(endpoint.describe())
            urls = [e.url for e in endpoints]
        if registry_url and self.use_registry:
            urls = self._with_registered(urls, registry_url, report)
        if not urls:
            raise ValueError(f"gpu_model mode {self.mode!r} found no GPU server: list endpoint URLs or start "
                             "servers that register in the project database (imgpipe gpu-server start)")  # fmt: skip
        return [openai_base_url(url) for url in urls] if self.api == "openai" else urls

    def _with_registered(self, urls: list[str], registry_url: str, report) -> list[str]:
        """``urls`` plus the registry's live and ready servers of the run's model (any model in external
        mode without a model path), each logged once."""
        model = None
        if self.mode == "managed" or self.model_path:
            model = model_name(self.resolved_model_path()[0])
        known = {url.rstrip("/") for url in urls}
        # ready ones only: a server still loading its model would only answer 503 to the run
        found = discover_endpoints(managed=False, registry_url=registry_url, model=model, ready_only=True)
        joined = [url for url in found if url not in known and openai_base_url(url) not in known]
        for url in joined:
            report.info(f"GPU server {url}: found in the registry (serves {model or 'any model'})")
        return [*urls, *joined]

    def client_factory(self, profile: GpuServerProfile, images_per_request: int = 1, tiny: bool = False):
        """A function (base URL, request timeout s, connections) -> the client of this tier's protocol.
        An OpenAI request carries one image, so its pool holds ``images_per_request`` connections per
        request slot."""
        if self.api == "native":
            token = self.bearer_token()
            return lambda url, timeout_s, connections: GpuClient(url, token=token, timeout_s=timeout_s,
                                                                 max_connections=connections)  # fmt: skip
        key = self.api_key or self.bearer_token()
        max_tokens = self.max_new_tokens or (min(profile.max_new_tokens, TINY_MODEL_MAX_NEW_TOKENS) if tiny
                                             else profile.max_new_tokens)  # fmt: skip
        return lambda url, timeout_s, connections: OpenAIClient(
            url, api_key=key, model=self.openai_model, max_tokens=max_tokens, timeout_s=timeout_s,
            max_connections=connections * images_per_request,
        )

    def keep_alive(self) -> contextlib.AbstractContextManager:
        """While the block runs, a managed server of this run that dies is restarted with the same
        settings (gpu_server/watchdog.py), each step in the run log. External servers: nothing."""
        if self.mode != "managed" or self._managed is None:
            return contextlib.nullcontext()
        launcher, endpoints = self._managed
        report = self._log or log
        return ServerWatchdog(launcher, endpoints, report.warning)


def _report_health(report, url: str, token: str | None) -> None:
    try:
        health = fetch_health(url, 5.0, token=token)
        report.info(f"GPU server {url}: {health.status}, queue {health.queue_size}, "
                    f"settings {health.settings_hash or 'not reported'} (external: not changed by runs)")  # fmt: skip
    except HealthUnavailable as exc:
        report.warning(f"GPU server {url} is not answering ({exc}); the run waits for it")


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
