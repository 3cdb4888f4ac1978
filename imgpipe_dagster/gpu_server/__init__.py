"""GPU inference server: batched Qwen-VL behind HTTP, one process per GPU (no Dagster here).

Parts: settings.py (ServerSettings), app.py (Starlette endpoints), batcher.py (admission queue and
pipelined dynamic batching), inference.py (the model), launcher.py (start/stop/status of one server
per GPU), client.py (async client), wire.py (request framing), metrics.py (Prometheus).
"""
