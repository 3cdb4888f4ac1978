#!/usr/bin/env bash
# The one device run for the GPU server (issue 5): the reference baseline (shared/bench copied to
# ./shared_bench) and our server through its HTTP API, in the same call, on the same GPU.
#
#   bash bench/gpu_device_run.sh          # on the GPU machine: needs .whl/ and shared_bench/ carried
#   bash bench/gpu_device_run.sh --cpu    # the same steps with the tiny architecture on a CPU
#
# Every step is bounded by `timeout` so the whole run stays inside one device call (~8 min).
# Results: $OUT/results.jsonl (one JSON line per figure), server logs under $OUT/logs/.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/.bench_out}
mkdir -p "$OUT/logs"
export OUT PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
RESULTS=$OUT/results.jsonl
PY=${PYTHON:-python3}

if [[ "${1:-}" == "--cpu" ]]; then
  PY=${PYTHON:-.venv/bin/python}
  ARCHS=(tiny); DEVICE=cpu
  baseline() { timeout 300 "$PY" shared_bench/vlm_baseline.py tiny > "$OUT/logs/baseline_tiny.log" 2>&1; }
  ours() { timeout 300 "$PY" bench/gpu_server.py --arch tiny --device cpu --batch-sizes 8 --clients 4 \
      --request-images 4 --engine-option 'backend="fast"' --engine-option compile_vision=true \
      --engine-option compile_language=true --baseline "$RESULTS" --out "$RESULTS" --log-dir "$OUT/logs"; }
else
  if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  ARCHS=(qwen2-vl-2b qwen2-vl-7b); DEVICE=cuda:0
  declare -A BASE_BATCH=([qwen2-vl-2b]=512 [qwen2-vl-7b]=192)
  declare -A OUR_BATCH=([qwen2-vl-2b]=512,1024 [qwen2-vl-7b]=384)
  declare -A OUR_LIMIT=([qwen2-vl-2b]=190 [qwen2-vl-7b]=110)
  declare -A BASE_LIMIT=([qwen2-vl-2b]=100 [qwen2-vl-7b]=95)
  baseline() {
    (cd shared_bench && timeout "${BASE_LIMIT[$ARCH]}" $PY vlm_static.py "${BASE_BATCH[$ARCH]}" "$ARCH") \
      > "$OUT/logs/baseline_$ARCH.log" 2>&1
    echo "baseline $ARCH exit $?"
  }
  ours() {
    timeout "${OUR_LIMIT[$ARCH]}" $PY bench/gpu_server.py --arch "$ARCH" --device "$DEVICE" \
      --batch-sizes "${OUR_BATCH[$ARCH]}" --measure-batches 3 --warmup-batches 2 --clients 96 --request-images 32 \
      --engine-option compile_vision=true --engine-option compile_language=true --engine-option chunk_size=128 \
      --baseline "$RESULTS" --out "$RESULTS" --log-dir "$OUT/logs" > "$OUT/logs/ours_$ARCH.log" 2>&1
    echo "ours $ARCH exit $?"
  }
fi

START=$(date +%s)
for ARCH in "${ARCHS[@]}"; do
  # Baseline first, so our line can quote the ratio against a figure from this very run.
  baseline
  ours
  echo "[$(( $(date +%s) - START )) s] $ARCH done"
done
# Correctness at the real architecture, if time is left: fast backend vs transformers (bf16).
LEFT=$(( ${TOTAL_LIMIT:-480} - ($(date +%s) - START) ))
if (( LEFT > 25 )); then
  CHECK_DEVICE=${DEVICE}; CHECK_ARCH=${ARCHS[0]}
  timeout $(( LEFT < 45 ? LEFT : 45 )) $PY bench/gpu_check.py --arch "$CHECK_ARCH" --device "$CHECK_DEVICE" \
    2> "$OUT/logs/gpu_check.log" | tee -a "$RESULTS"
fi
$PY - "$RESULTS" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
for r in rows:
    if r.get("event") in ("static", "gen", "server_bench", "server_bench_failed", "env", "oom", "server_ready", "server_warm", "built", "gpu_check"):
        keep = {k: r.get(k) for k in ("event", "arch", "batch", "run", "img_per_s", "baseline_img_per_s",
                                      "ratio", "total_s", "wall_s", "gpu", "error", "load_s", "all_in_img_per_s", "images",
                                      "prefill_logits_rel_err", "tokens_equal_share", "first_token_equal")}
        print(json.dumps({k: v for k, v in keep.items() if v is not None}))
EOF
