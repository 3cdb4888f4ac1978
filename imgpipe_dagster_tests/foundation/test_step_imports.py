"""A Dagster step that analyses shards only drives the GPU servers: it never loads torch (about
200 MB of its memory), in a fresh process, through what a managed run does before its first URL."""

from __future__ import annotations

import subprocess
import sys
import textwrap

STEP = textwrap.dedent("""
    import sys
    import imgpipe_dagster.definitions
    from imgpipe_dagster.engine.runner import ShardRunner
    from imgpipe_dagster.gpu_server.launcher import detect_devices
    from imgpipe_dagster.resources import GpuModelResource
    from imgpipe_dagster.settings_map import engine_settings

    path, tiny = GpuModelResource(model_path=sys.argv[1]).resolved_model_path()
    assert tiny, path
    assert detect_devices()
    loaded = sorted(m for m in ("torch", "transformers", "torchvision") if m in sys.modules)
    print("loaded:", ",".join(loaded) or "none")
""")


def test_the_step_process_never_imports_torch(tiny_model_dir):
    result = subprocess.run([sys.executable, "-c", STEP, str(tiny_model_dir)], capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "loaded: none"
