#!/usr/bin/env bash
# The GPU benchmarks, on a lent H100/H200 after ../shared/gpu staging put vLLM 0.26 in /tmp/site
# (docs/benchmarks.md). `.whl` carries the few pure-Python wheels the GPU image lacks (redis, httpx).
#   bash bench/gpu_run.sh overhead            # plugin vs stock vLLM throughput
#   bash bench/gpu_run.sh bench ARGS...       # lamps bench --engine-only ARGS...
#   bash bench/gpu_run.sh fleet ARGS...       # lamps bench ARGS... under Ray Serve, one engine
#                                             # replica per GPU (--router, --replicas); Ray staged
#                                             # by bench/gpu_pack_ray.sh into /tmp/site-ray
set -euo pipefail
export PYTHONPATH=/tmp/site:/tmp/site-ray:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
export VLLM_LOGGING_LEVEL="${VLLM_LOGGING_LEVEL:-WARNING}"  # keep the log to the runs' own lines
OUT="${OUT:-/tmp/lamps-out}"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
fi
python3 -m bench.dummy_models /tmp/llama3-8b-dummy >/dev/null
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
what="$1"; shift
case "$what" in
  overhead)
    python3 -m bench.engine_overhead --model /tmp/llama3-8b-dummy --dtype bfloat16 \
      --requests 256 --prompt 512 --decode 256 --rounds 1 --max-num-seqs 256 \
      --kv-cache-bytes $((32 << 30)) --no-enforce-eager --async-scheduling \
      --skip-tokenizer-init --out "$OUT" "$@" ;;
  bench)
    python3 -m lamps.cli bench --engine-only --config cluster/serve-bench-gpu.yaml \
      --out "$OUT/bench" "$@" ;;
  fleet)
    python3 -m lamps.cli bench --config cluster/serve-bench-gpu.yaml --out "$OUT/bench" "$@" ;;
  *) echo "unknown: $what" >&2; exit 2 ;;
esac
