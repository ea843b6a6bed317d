#!/usr/bin/env bash
# The GPU check in one device call (see the docstring of scripts/gpu_check.py):
#   run(command="bash scripts/gpu_check.sh", timeout_s=540)
# Extra arguments go to gpu_check.py (e.g. --shapes 7b, --sections timing, --dry-run).
set -euo pipefail
cd "$(dirname "$0")/.."
# Wheels carried in .whl/ (optional: the device image already has torch, transformers, accelerate,
# safetensors; ctc_drafter imports nothing else, gguf included, at import time).
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# The package is not installed on the device: import it from the checkout.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.max.memory --format=csv,noheader 2>/dev/null || true
PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py --out "${OUT:-/tmp/gpu_out}" "$@"
