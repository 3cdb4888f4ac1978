"""Typed settings of one GPU inference server process, and their JSON form.

``ServerSettings`` is everything a server runs with: the profile's GPU-server fields
(``profiles/<name>.yaml`` under ``gpu_server:``), the model part ``ModelSettings`` that the inference
engine reads, and the deployment fields (address, token, idle timeout, request caps).
``imgpipe_dagster.settings_map`` builds it from a validated profile. The launcher hands it to the
server process as one JSON file (``to_json`` / ``from_json``, which validates every field), never
on the command line, so a bearer token never shows in ``ps``.

Fields that hold a legacy ``llm_model/.env`` value (legacy names in snake case) have no default: a
complete object comes from a profile. Fields marked "new" are ours and may default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgpipe_dagster.fetch.settings import FetchSettings


class SettingsError(ValueError):
    """A settings document is malformed; the message names the field."""


@dataclass(frozen=True, kw_only=True)
class ModelSettings:
    """What the inference engine (inference.py) needs to load and run one model."""

    # Local model directory (or a model id in the local HF cache; loading is offline).
    model_path: str
    # new: torch device, "cuda:0" (the launcher narrows CUDA_VISIBLE_DEVICES to one GPU) or "cpu".
    device: str = "cpu"
    # Legacy USE_FP16: half precision (bf16 where the GPU supports it, fp16 otherwise); fp32 when off or on CPU.
    use_fp16: bool
    # Legacy ENABLE_TF32: allow TF32 matmuls for any fp32 work (Ampere and newer).
    enable_tf32: bool
    # Legacy USE_FLASH_ATTENTION: flash-attention 2 when importable, SDPA otherwise.
    use_flash_attention: bool
    # Legacy MAX_NEW_TOKENS: most tokens generated per image (greedy decoding).
    max_new_tokens: int
    # Legacy CLEAR_CACHE_EVERY_N_REQUESTS: every N generate() calls (0 = never) release the CUDA
    # caching allocator's free blocks and free host heap pages (malloc_trim).
    clear_cache_every_n_requests: int
    # Legacy ENABLE_MEMORY_DEFRAG: expandable CUDA allocator segments (set before CUDA starts).
    enable_memory_defrag: bool
    # new: fewest pixels of an image after sizing to the 28-px grid (visual token floor).
    min_pixels: int = 28 * 28 * 4
    # new: most pixels of an image after sizing (visual token cap: 448*448 = 256 image tokens).
    max_pixels: int = 448 * 448
    # new: HF backend only: static KV cache with a compiled decode step (the fast backend always uses one).
    static_cache: bool = False
    # new: torch.compile the vision tower's blocks (fast backend; costs compile time at the first batch).
    compile_vision: bool = False
    # new: torch.compile the language model's per-layer step functions (fast backend).
    compile_language: bool = False
    # new: force at least this many new tokens (benchmarks force exactly max_new_tokens).
    min_new_tokens: int = 0
    # new: build the model from config.json with random weights (architecture benchmarks).
    random_weights: bool = False
    # new: "auto" (fast on CUDA, hf on CPU), "fast" or "hf".
    backend: str = "auto"
    # new: fast backend: rows processed together in the vision tower and in prefill (activation memory).
    chunk_size: int = 128
    # new: fast backend: capture the decode step as a CUDA graph (CUDA only).
    cuda_graphs: bool = True
    # new: seed for random weights, so two servers of one architecture hold the same model.
    seed: int = 0
    # new: CPU only: torch threads of this process. CPU inference serves tests and demos where several
    # servers and the pipeline share a few cores; one thread each avoids OpenMP spin-waits that made
    # a tiny model 4-5x slower on a loaded 2-core machine. Raise it for a real model on a large CPU.
    cpu_threads: int = 1
    # new: most pixels of an image the server decodes, read from its header first (an image above it
    # fails alone). The fetcher's cap: a client that skips the fetch stage meets the same limit.
    max_source_pixels: int = FetchSettings.max_image_pixels


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    # Legacy MAX_CONCURRENT_GENERATIONS: batches allowed in the pipeline at once (being prepared on the
    # CPU, prepared and waiting, or generating). generate() always runs one batch at a time per model,
    # so values > 1 buy overlap of CPU preparation with the GPU. Prepare threads = max(1, value - 1).
    max_concurrent_generations: int
    # Legacy MAX_INFERENCE_QUEUE_SIZE: images allowed to wait for a batch; more gets 429 + Retry-After.
    max_inference_queue_size: int
    # Legacy MAX_INFERENCE_BATCH_SIZE: most requests merged into one generate() call. A legacy request
    # carried one image; ours carry a client-side mini-batch, so images per generate() are capped by
    # max_batch_images instead.
    max_inference_batch_size: int
    # Legacy BATCH_WAIT_TIMEOUT: seconds a batch waits for more images after its first one arrived.
    batch_wait_timeout: float
    # Legacy GEN_TIME_DEFAULT_EST: seconds one batch is assumed to take until one was measured (Retry-After).
    gen_time_default_est: float
    # new (profile): most images in one generate() call (GPU memory bound; a CUDA OOM still splits a batch).
    max_batch_images: int
    # The model part: legacy model flags and how the model is loaded.
    model: ModelSettings
    # new: address to bind; loopback unless the server must be reached from other hosts.
    host: str = "127.0.0.1"
    # new: TCP port to listen on (GPU 0 -> 8000, GPU 1 -> 8001, ...); 0 = any free port, reported back.
    port: int = 8000
    # new: when set, /v1/analyze, /v1/settings and /metrics require `Authorization: Bearer <token>`.
    bearer_token: str | None = None
    # new: exit after this many seconds without analyze requests and with nothing queued (0 = never).
    idle_timeout_s: float = 0.0
    # new: most images in one request (413 above it); also capped by max_inference_queue_size.
    max_request_images: int = 256
    # new: most bytes in one request body (413 above it).
    max_request_bytes: int = 64 * 1024 * 1024
    # new: the project database the server registers in and beats to (store/gpu_registry.py), so runs,
    # the throttle and `imgpipe status` find it; None: IMGPIPE_DATABASE_URL, else no registration.
    # May carry a password: left out of /health like the token.
    registry_url: str | None = None
    # new: host name or address other machines reach this server at (registered as http://<it>:<port>);
    # None: the bound address, or the machine's host name when it binds a wildcard address (0.0.0.0, ::).
    advertise_host: str | None = None
    # new: seconds between two heartbeats in the registry.
    registry_heartbeat_s: float = 5.0
    # new: seconds a client may take to send a request's headers, then its body; a slower one is
    # disconnected (half-open and slowloris connections must not pile up).
    header_timeout_s: float = 10.0
    body_timeout_s: float = 120.0
    # new: most open client connections; one more is closed at once. The server lowers it below its
    # open-file limit so that the model's files, logs and /health always find a descriptor.
    max_connections: int = 1000
    # new: allow a non-loopback host without bearer_token (a trusted private network only).
    insecure_no_token: bool = False

    def __post_init__(self) -> None:
        for name in ("max_inference_batch_size", "max_batch_images", "max_inference_queue_size",
                     "max_concurrent_generations", "max_request_images", "max_request_bytes",
                     "max_connections"):  # fmt: skip
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_wait_timeout < 0:
            raise SettingsError("batch_wait_timeout must be >= 0")
        if self.model.max_new_tokens < 1:
            raise SettingsError("model.max_new_tokens must be >= 1")
        if self.registry_heartbeat_s <= 0:
            raise SettingsError(f"registry_heartbeat_s must be > 0, got {self.registry_heartbeat_s}")
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"port must be in 0..65535, got {self.port}")
        if min(self.header_timeout_s, self.body_timeout_s) <= 0:
            raise SettingsError("header_timeout_s and body_timeout_s must be > 0")
        if self.model.max_source_pixels < 1:
            raise SettingsError("model.max_source_pixels must be >= 1")

    def exposure_problem(self) -> str | None:
        """Why these settings must not start a server (reachable from other hosts with no token), or None."""
        if self.bearer_token or self.insecure_no_token or _is_loopback(self.host):
            return None
        return (f"refusing to listen on {self.host} without a bearer token: anyone who reaches it could use "
                f"the GPU and read its settings; set IMGPIPE_GPU_TOKEN, or pass --insecure-no-token "
                f"on a trusted private network")  # fmt: skip

    @property
    def request_image_cap(self) -> int:
        """Most images one request may carry: a request larger than the queue could never fit."""
        return min(self.max_request_images, self.max_inference_queue_size)

    @property
    def prepare_workers(self) -> int:
        return max(1, self.max_concurrent_generations - 1)

    def replace(self, **changes: Any) -> ServerSettings:
        return dataclasses.replace(self, **changes)

    def replace_model(self, **changes: Any) -> ServerSettings:
        return dataclasses.replace(self, model=dataclasses.replace(self.model, **changes))

    # ----- JSON: the one form that crosses the process boundary -----

    def to_dict(self, *, include_token: bool = True) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        if not include_token:
            values.pop("bearer_token")
            values.pop("registry_url")
        return values

    def to_json(self, *, include_token: bool = True) -> str:
        return json.dumps(self.to_dict(include_token=include_token), sort_keys=True)

    @classmethod
    def from_dict(cls, values: Any) -> ServerSettings:
        return _build(cls, values, "settings")

    @classmethod
    def from_json(cls, text: str) -> ServerSettings:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise SettingsError(f"server settings are not JSON: {error}") from None
        return cls.from_dict(values)


# Fields that describe where a server listens, who may call it or where it announces itself, not what
# it runs: left out of the settings hash and of the comparison between a running server and a run's
# wanted settings.
PLACEMENT_FIELDS = frozenset({"host", "port", "bearer_token", "insecure_no_token", "registry_url",
                              "advertise_host", "registry_heartbeat_s"})
# Fields a running server takes over without a restart (POST /v1/settings): batching, queue sizes
# and generation length. Everything else (model, device, dtype flags, compile switches) needs a new process.
LIVE_FIELDS = frozenset({
    "max_concurrent_generations", "max_inference_queue_size", "max_inference_batch_size",
    "batch_wait_timeout", "gen_time_default_est", "max_batch_images", "max_request_images",
    "max_request_bytes", "model.max_new_tokens", "model.clear_cache_every_n_requests",
})  # fmt: skip


def model_path_problem(model_path: str) -> str | None:
    """Why ``model_path`` cannot be a model (missing, or a folder without config.json), or None. A
    name like ``Qwen/Qwen2-VL-2B-Instruct`` may be a model in the local Hugging Face cache: left to the loader."""
    path = Path(model_path).expanduser()
    if path.is_dir():
        return None if (path / "config.json").is_file() else f"model path {model_path} is not a model folder (no config.json)"
    if path.exists():
        return f"model path {model_path} is a file, not a model folder"
    if path.is_absolute() or model_path.startswith((".", "~")) or model_path.count("/") != 1:
        return f"model path {model_path} does not exist"
    return None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name may resolve anywhere


def _flat(settings: ServerSettings) -> dict[str, Any]:
    values = settings.to_dict(include_token=False)
    model = values.pop("model")
    flat = {name: value for name, value in values.items() if name not in PLACEMENT_FIELDS}
    flat.update({f"model.{name}": value for name, value in model.items()})
    return flat


def settings_hash(settings: ServerSettings) -> str:
    """Hash of what a server runs (placement and token excluded): equal hashes, same behaviour. Taken
    from the settings as a server loads them from its file, so 900 and 900.0 hash alike."""
    loaded = ServerSettings.from_dict(json.loads(settings.to_json(include_token=False)))
    canonical = json.dumps(_flat(loaded), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def differences(running: ServerSettings, wanted: ServerSettings) -> list[str]:
    """Names of the fields (``model.`` prefixed for the model part) whose values differ."""
    old, new = _flat(running), _flat(wanted)
    return sorted(name for name in new if old.get(name) != new[name])


def needs_restart(changed: list[str]) -> list[str]:
    """The changed fields a running server cannot take over live."""
    return [name for name in changed if name not in LIVE_FIELDS]


def apply_live(running: ServerSettings, wanted: ServerSettings) -> ServerSettings:
    """``running`` with the live fields of ``wanted``; SettingsError when anything else differs."""
    changed = differences(running, wanted)
    blocked = needs_restart(changed)
    if blocked:
        raise SettingsError(f"these settings need a server restart: {', '.join(blocked)}")
    model_changes = {n.partition(".")[2]: getattr(wanted.model, n.partition(".")[2]) for n in changed
                     if n.startswith("model.")}  # fmt: skip
    top_changes = {name: getattr(wanted, name) for name in changed if not name.startswith("model.")}
    return running.replace(**top_changes).replace_model(**model_changes)


# ----- strict loading of a settings document -----


def _build(cls: type, values: Any, where: str) -> Any:
    if not isinstance(values, dict):
        raise SettingsError(f"{where}: expected an object, got {type(values).__name__}")
    declared = {item.name: item for item in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(declared))
    if unknown:
        raise SettingsError(f"{where}: unknown field(s) {', '.join(unknown)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, item in declared.items():
        if name not in values:
            if item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING:
                raise SettingsError(f"{where}.{name}: missing")
            continue
        kwargs[name] = _typed(hints[name], values[name], f"{where}.{name}")
    try:
        return cls(**kwargs)
    except SettingsError:
        raise
    except (TypeError, ValueError) as error:
        raise SettingsError(f"{where}: {error}") from None


def _typed(annotation: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, where)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        (inner,) = [option for option in options if option is not type(None)]
        return _typed(inner, value, where)
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    else:
        raise SettingsError(f"{where}: unsupported field type {annotation!r}")
    raise SettingsError(f"{where}: expected {annotation.__name__}, got {value!r}")
