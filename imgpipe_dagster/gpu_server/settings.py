"""Settings of one GPU inference server process.

Field names follow the legacy ``llm_model/.env`` names in snake case; defaults are the legacy
MEDIUM profile. New fields (host, port, device, ...) are documented where they are declared.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

# Environment variable the launcher uses to hand the bearer token to a server: a token on the
# command line would be visible to every user through `ps`.
TOKEN_ENV_VAR = "IMGPIPE_GPU_SERVER_TOKEN"


@dataclass(frozen=True)
class ServerSettings:
    # --- legacy GPU worker settings (MEDIUM profile defaults) ---
    # Batches allowed in the pipeline at once (being prepared on the CPU, prepared and waiting,
    # or generating). generate() itself always runs one batch at a time per model, so values > 1
    # buy overlap of CPU preparation with the GPU, not parallel generations. Prepare threads =
    # max(1, max_concurrent_generations - 1).
    max_concurrent_generations: int = 6
    # Images allowed to wait for a batch; a request that would exceed it gets 429 + Retry-After.
    max_inference_queue_size: int = 1000
    # Most requests merged into one generate() call. A legacy request carried one image; ours carry
    # a client-side mini-batch (images_per_request), so the GPU batch grows with the request size
    # while this stays the legacy number. Images per generate() are capped by max_batch_images.
    max_inference_batch_size: int = 4
    # Seconds a batch waits for more images after its first image arrived, before it goes anyway.
    batch_wait_timeout: float = 0.08
    # Seconds one batch is assumed to take until the first batch has been measured (Retry-After).
    gen_time_default_est: float = 3.5
    # Every N generate() calls (0 = never): release the CUDA caching allocator's free blocks, and free
    # host heap pages (malloc_trim).
    clear_cache_every_n_requests: int = 30
    # Set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True before CUDA starts (less fragmentation).
    enable_memory_defrag: bool = True
    # Use fp16 where the GPU lacks bf16 (bf16 is preferred where supported).
    use_fp16: bool = True
    # Allow TF32 matmuls on Ampere and newer.
    enable_tf32: bool = True
    # Use flash-attention 2 when importable, SDPA otherwise.
    use_flash_attention: bool = True
    # Most tokens generated per image (greedy decoding).
    max_new_tokens: int = 128

    # --- new fields ---
    # Address to bind; loopback unless the server must be reached from other hosts.
    host: str = "127.0.0.1"
    # TCP port to listen on (GPU 0 -> 8000, GPU 1 -> 8001, ...).
    port: int = 8000
    # Torch device the model runs on: "cuda:0" (the launcher narrows CUDA_VISIBLE_DEVICES) or "cpu".
    device: str = "cpu"
    # Local model directory (or a model id resolvable from the local HF cache, offline).
    model_path: str = ""
    # When set, /v1/analyze and /metrics require `Authorization: Bearer <token>`; /health stays open.
    bearer_token: str | None = None
    # Exit after this many seconds without analyze requests and with nothing queued (0 = never).
    idle_timeout_s: float = 0.0
    # Build the model from its config with random weights (benchmarks of an architecture).
    random_weights: bool = False
    # Most images in one generate() call (GPU memory bound; a CUDA OOM still splits a batch).
    max_batch_images: int = 256
    # Most images in one request (413 above it); also capped by max_inference_queue_size.
    max_request_images: int = 256
    # Most bytes in one request body (413 above it).
    max_request_bytes: int = 64 * 1024 * 1024
    # Extra keyword settings handed to the inference engine's ModelSettings unchanged.
    engine_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_inference_batch_size < 1:
            raise ValueError("max_inference_batch_size must be >= 1")
        if self.max_batch_images < 1:
            raise ValueError("max_batch_images must be >= 1")
        if self.max_inference_queue_size < 1:
            raise ValueError("max_inference_queue_size must be >= 1")
        if self.max_concurrent_generations < 1:
            raise ValueError("max_concurrent_generations must be >= 1")
        if self.batch_wait_timeout < 0:
            raise ValueError("batch_wait_timeout must be >= 0")

    @property
    def request_image_cap(self) -> int:
        """Most images one request may carry: a request larger than the queue could never fit."""
        return min(self.max_request_images, self.max_inference_queue_size)

    @property
    def prepare_workers(self) -> int:
        return max(1, self.max_concurrent_generations - 1)

    def replace(self, **changes: Any) -> ServerSettings:
        return dataclasses.replace(self, **changes)


def _bool_arg(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


# Fields the command line does not expose (structured values).
_NOT_ON_COMMAND_LINE = {"engine_options", "bearer_token", "model_path", "random_weights"}


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m imgpipe_dagster.gpu_server",
        description="Batched Qwen-VL inference server (one process per GPU).",
    )
    parser.add_argument("--model", dest="model_path", required=True, help="local model directory")
    parser.add_argument(
        "--token",
        dest="bearer_token",
        default=None,
        help=f"bearer token required by /v1/analyze and /metrics (or env {TOKEN_ENV_VAR})",
    )
    parser.add_argument(
        "--random-weights", dest="random_weights", action="store_true", help="random weights (benchmarks)"
    )
    parser.add_argument(
        "--engine-option",
        dest="engine_options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra ModelSettings field for the inference engine (value parsed as JSON when possible)",
    )
    defaults = ServerSettings()
    for settings_field in dataclasses.fields(ServerSettings):
        if settings_field.name in _NOT_ON_COMMAND_LINE:
            continue
        default = getattr(defaults, settings_field.name)
        flag = "--" + settings_field.name.replace("_", "-")
        if settings_field.name == "idle_timeout_s":
            flag = "--idle-timeout"
        arg_type: Any = {bool: _bool_arg, int: int, float: float}.get(type(default), str)
        parser.add_argument(flag, dest=settings_field.name, type=arg_type, default=default)
    return parser


def _parse_engine_option(item: str) -> tuple[str, Any]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"--engine-option expects KEY=VALUE, got {item!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def settings_from_args(argv: list[str] | None = None) -> ServerSettings:
    namespace = build_arg_parser().parse_args(argv)
    values = vars(namespace)
    values["engine_options"] = dict(_parse_engine_option(item) for item in values["engine_options"])
    if not values.get("bearer_token"):
        values["bearer_token"] = os.environ.get(TOKEN_ENV_VAR) or None
    return ServerSettings(**values)


def settings_to_args(settings: ServerSettings) -> list[str]:
    """Command-line arguments that rebuild ``settings`` in a child process (token excluded)."""
    args = ["--model", settings.model_path]
    if settings.random_weights:
        args.append("--random-weights")
    for key, value in settings.engine_options.items():
        args += ["--engine-option", f"{key}={json.dumps(value)}"]
    for settings_field in dataclasses.fields(ServerSettings):
        if settings_field.name in _NOT_ON_COMMAND_LINE:
            continue
        flag = "--" + settings_field.name.replace("_", "-")
        if settings_field.name == "idle_timeout_s":
            flag = "--idle-timeout"
        args += [flag, str(getattr(settings, settings_field.name))]
    return args
