"""`python -m imgpipe_dagster.gpu_server --device cuda:0 --port 8000 --model PATH [...]`: one server."""

from __future__ import annotations

import logging
import os
import sys

from imgpipe_dagster.gpu_server.settings import settings_from_args


def main(argv: list[str] | None = None) -> int:
    settings = settings_from_args(argv)
    if settings.enable_memory_defrag and settings.device.startswith("cuda"):
        # Must be set before CUDA initialises; expandable segments curb fragmentation from varying batches.
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s gpu_server[{settings.port}] %(message)s",
        stream=sys.stderr,
    )

    import uvicorn

    from imgpipe_dagster.gpu_server.app import create_app

    server: uvicorn.Server | None = None

    def request_exit() -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_exit=request_exit)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        workers=1,
        log_level="info",
        access_log=False,
        timeout_graceful_shutdown=60,
    )
    server = uvicorn.Server(config)
    server.run()
    state = app.state.server
    if state.status == "failed":
        return 1
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
