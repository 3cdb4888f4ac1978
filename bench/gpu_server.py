"""Images/s through the GPU server's HTTP API, with concurrent clients.

Starts ``python -m imgpipe_dagster.gpu_server`` on a random-weights architecture (or the tiny model
on a CPU) and loads it continuously from --clients concurrent clients (requests of --request-images
images of --side x --side pixels). img_per_s is the steady state: images answered between the end
of --warmup-batches batches (the first compiles and captures) and --measure-batches batches later,
while the queue stays full (a tail of two more batches is sent after the window); all_in_img_per_s
counts everything from the first request, compilation included. One JSON line per batch size. Exactly --new-tokens tokens are generated per image
(min_new_tokens = max_new_tokens), as in the reference baseline (shared/bench).

    python bench/gpu_server.py --arch qwen2-vl-2b --device cuda:0 --batch-sizes 512 \\
        --baseline results.jsonl            # ratio against vlm_static.py figures of the same run
    python bench/gpu_server.py --arch tiny   # CPU check of the whole path in seconds
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from imgpipe_dagster.gpu_server import wire  # noqa: E402
from imgpipe_dagster.gpu_server.tiny_model import build_tiny_model, write_random_weights_dir  # noqa: E402
from imgpipe_dagster.processes import stop_process_group  # noqa: E402

BASELINE_ARCH = {"qwen2-vl-2b": "qwen2-vl-2b", "qwen2-vl-7b": "qwen2-vl-7b", "tiny": "tiny"}


def emit(out_path: Path | None, **fields) -> None:
    line = json.dumps(fields)
    print(line, flush=True)
    if out_path:
        with out_path.open("a") as f:
            f.write(line + "\n")


def synthetic_images(count: int, side: int, seed: int = 0) -> list[bytes]:
    """JPEGs of smooth gradients with blocks: realistic sizes (tens of KB) and decode cost."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    images = []
    for _ in range(count):
        a, b, c = rng.uniform(0, 255, 3)
        rgb = np.stack([a * xx + (255 - a) * yy, b * (1 - xx) + c * yy, c * xx * yy + b * (1 - yy)], axis=-1)
        for _ in range(6):
            x0, y0 = rng.integers(0, side - side // 4, 2)
            rgb[y0 : y0 + side // 5, x0 : x0 + side // 5] = rng.uniform(0, 255, 3)
        rgb += rng.normal(0, 6, rgb.shape)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_dir(arch: str, work: Path) -> tuple[Path, bool]:
    if arch == "tiny":
        return build_tiny_model(work / "tiny"), False
    return write_random_weights_dir(work / arch, arch), True


def start_server(args, model: Path, random_weights: bool, batch: int, port: int, log_path: Path):
    from imgpipe_dagster.settings_map import medium_server_settings

    # --engine-option KEY=VALUE sets a ModelSettings field (value parsed as JSON when it is JSON).
    options = {}
    for option in args.engine_option:
        key, _, value = option.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    settings = medium_server_settings(
        str(model), device=args.device, port=port, max_inference_batch_size=batch, max_batch_images=batch,
        max_inference_queue_size=max(4 * batch, 2 * args.clients * args.request_images),
        max_request_images=max(args.request_images, 1), batch_wait_timeout=args.batch_wait,
        max_concurrent_generations=3, max_new_tokens=args.new_tokens, clear_cache_every_n_requests=0,
        enable_memory_defrag=False, min_new_tokens=args.new_tokens, max_pixels=args.side * args.side,
        random_weights=random_weights, **options,
    )
    settings_file = log_path.with_suffix(".settings.json")
    settings_file.write_text(settings.to_json())
    cmd = [sys.executable, "-m", "imgpipe_dagster.gpu_server", "--settings-file", str(settings_file)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    log_file = log_path.open("w")
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    _SERVERS.append(proc)
    return proc, log_file


_SERVERS: list[subprocess.Popen] = []


def _stop_servers_and_exit(signum, frame) -> None:
    """`timeout` sends SIGTERM: take our servers (own process groups) down with us."""
    for proc in _SERVERS:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    os._exit(128 + signum)


async def wait_ready(base: str, proc: subprocess.Popen, limit_s: float) -> dict:
    deadline = time.monotonic() + limit_s
    async with httpx.AsyncClient(timeout=5) as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode} while loading")
            try:
                health = (await http.get(f"{base}/health")).json()
                if health.get("status") == "ready":
                    return health
                if health.get("status") == "failed":
                    raise RuntimeError(f"server failed to load: {health}")
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError("server not ready in time")


async def drive(base: str, images: list[bytes], total: int, clients: int, per_request: int, prompt: str):
    """Send `total` images from `clients` concurrent loops without pause.

    Returns (wall seconds, ok, failed, rejected, generated tokens, completions) where completions
    lists (seconds since start, images answered) per response, for steady-state windows."""
    sent = 0
    ok = failed = rejected = 0
    generated = 0
    completions: list[tuple[float, int]] = []
    lock = asyncio.Lock()
    started = time.perf_counter()

    async def client_loop(http: httpx.AsyncClient) -> None:
        nonlocal sent, ok, failed, rejected, generated
        while True:
            async with lock:
                if sent >= total:
                    return
                n = min(per_request, total - sent)
                start = sent
                sent += n
            batch = [images[(start + i) % len(images)] for i in range(n)]
            body = wire.encode_request(batch, prompt)
            while True:
                response = await http.post(f"{base}/v1/analyze", content=body,
                                           headers={"Content-Type": wire.CONTENT_TYPE})
                if response.status_code == 429:
                    rejected += 1
                    await asyncio.sleep(float(response.headers.get("retry-after", "1")))
                    continue
                break
            if response.status_code != 200:
                failed += n
                continue
            answered = 0
            for item in response.json()["results"]:
                if item.get("error"):
                    failed += 1
                else:
                    ok += 1
                    answered += 1
                    generated += item.get("generated_tokens", 0)
            completions.append((time.perf_counter() - started, answered))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900, connect=10), limits=limits) as http:
        await asyncio.gather(*(client_loop(http) for _ in range(clients)))
    return time.perf_counter() - started, ok, failed, rejected, generated, completions


def steady_window(completions: list[tuple[float, int]], skip: int, measure: int) -> tuple[float, int]:
    """(seconds, images) between the response that completed the first `skip` images and the one
    that completed `skip + measure`: the server is loaded throughout, with no fill or drain."""
    done = 0
    t_start = t_end = None
    counted = 0
    for t, n in sorted(completions):
        done += n
        if t_start is None:
            if done >= skip:
                t_start = t
            continue
        counted += n
        t_end = t
        if done >= skip + measure:
            break
    if t_start is None or t_end is None or t_end <= t_start:
        return 0.0, 0
    return t_end - t_start, counted


def baseline_figure(path: Path | None, arch: str) -> float | None:
    """Best img/s of the reference scripts (vlm_static 'static', vlm_baseline 'gen') for this arch."""
    if not path or not path.exists():
        return None
    best = None
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("arch") == BASELINE_ARCH.get(arch) and row.get("event") in ("static", "gen"):
            value = row.get("img_per_s")
            if value and (best is None or value > best):
                best = value
    return best


async def bench_one(args, model: Path, random_weights: bool, batch: int, images: list[bytes], work: Path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = (args.log_dir or work) / f"server_{args.arch}_b{batch}.log"
    proc, log_file = start_server(args, model, random_weights, batch, port, log_path)
    started = time.perf_counter()
    try:
        health = await wait_ready(base, proc, args.load_timeout)
        load_s = time.perf_counter() - started
        emit(args.out, event="server_ready", arch=args.arch, batch=batch, load_s=round(load_s, 1))
        # One continuous load: warm-up batches (compile, graph capture), measured batches, and a tail
        # that keeps the queue full until the measured window has closed.
        warm = batch * args.warmup_batches
        measure = max(args.images, batch * args.measure_batches)
        total = warm + measure + 2 * batch
        wall, ok, failed, rejected, generated, completions = await drive(
            base, images, total, args.clients, args.request_images, args.prompt
        )
        window_s, window_images = steady_window(completions, warm, measure)
        async with httpx.AsyncClient(timeout=10) as http:
            health = (await http.get(f"{base}/health")).json()
        img_s = window_images / window_s if window_s > 0 else 0.0
        baseline = baseline_figure(args.baseline, args.arch)
        emit(
            args.out, event="server_bench", arch=args.arch, device=args.device, gpu=gpu_name(args.device),
            batch=batch, images=window_images, sent=total, ok=ok, failed=failed, rejected_429=rejected,
            new_tokens_per_image=round(generated / max(ok, 1), 2), side=args.side,
            clients=args.clients, request_images=args.request_images,
            wall_s=round(window_s, 3), img_per_s=round(img_s, 2),
            all_in_img_per_s=round(ok / wall, 2) if wall > 0 else None, all_in_wall_s=round(wall, 1),
            baseline_img_per_s=baseline, ratio=round(img_s / baseline, 2) if baseline else None,
            load_s=round(load_s, 1),
            server_mean_batch=health.get("mean_batch_size"), server_gen_ms=health.get("mean_generation_ms"),
            engine=health.get("gpu_memory") or health.get("memory"),
        )
    finally:
        if proc.poll() is None:
            stop_process_group(proc, grace_s=20)
        log_file.close()


def gpu_name(device: str) -> str | None:
    if not device.startswith("cuda"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="tiny", choices=["tiny", "qwen2-vl-2b", "qwen2-vl-7b",
                                                           "qwen2.5-vl-3b", "qwen2.5-vl-7b"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", default=None, help="comma list (default: 8 on cpu, 512 on cuda)")
    parser.add_argument("--side", type=int, default=None, help="image side in px (448; tiny on cpu: 112)")
    parser.add_argument("--new-tokens", type=int, default=None, help="exact new tokens (128; cpu: 16)")
    parser.add_argument("--images", type=int, default=0, help="images measured (default: measure-batches x batch)")
    parser.add_argument("--measure-batches", type=int, default=4)
    parser.add_argument("--warmup-batches", type=int, default=2)
    parser.add_argument("--clients", type=int, default=48)
    parser.add_argument("--request-images", type=int, default=32)
    parser.add_argument("--batch-wait", type=float, default=0.05)
    parser.add_argument("--prompt", default="caption_short_v1")
    parser.add_argument("--load-timeout", type=float, default=600)
    parser.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--baseline", type=Path, default=None, help="results.jsonl of the reference run")
    parser.add_argument("--out", type=Path, default=None, help="append JSON lines here too")
    parser.add_argument("--log-dir", type=Path, default=None, help="server logs (default: temp dir)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_servers_and_exit)
    on_gpu = args.device.startswith("cuda")
    args.side = args.side or (448 if on_gpu else 112)
    args.new_tokens = args.new_tokens or (128 if on_gpu else 16)
    sizes = [int(b) for b in (args.batch_sizes or ("512" if on_gpu else "8")).split(",")]
    if args.log_dir:
        args.log_dir.mkdir(parents=True, exist_ok=True)
    images = synthetic_images(64, args.side)
    with tempfile.TemporaryDirectory(prefix="imgpipe_bench_") as tmp:
        work = Path(tmp)
        model, random_weights = model_dir(args.arch, work)
        for batch in sizes:
            try:
                asyncio.run(bench_one(args, model, random_weights, batch, images, work))
            except Exception as exc:  # one failed size must not hide the others' figures
                emit(args.out, event="server_bench_failed", arch=args.arch, batch=batch,
                     error=f"{type(exc).__name__}: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
