"""GPU inference server: batched Qwen-VL behind HTTP, one process per GPU (no Dagster here).

Parts: settings.py (ServerSettings with its ModelSettings part, and their JSON form), health.py (the
typed /health document), app.py (Starlette endpoints), guard.py (deadlines for slow clients and a cap
on connections, in uvicorn's protocol), batcher.py (admission queue and pipelined dynamic
batching), inference.py (the model), launcher.py (start/reuse/reconfigure/stop of one server per GPU),
discovery.py (which servers there are: local records, the database registry, listed endpoints),
registration.py (a server's heartbeat in the registry), client.py (async client), wire.py (request
framing), openai_api.py and openai_client.py (the OpenAI-compatible face and client), metrics.py
(Prometheus).
"""
