#!/usr/bin/env bash
# On a CUDA machine with its own Python (torch, transformers, accelerate, peft) and no network: installs the wheels
# that benchmarks/gpu_wheels.sh put in .whl/ into /tmp/gpu-site, then runs benchmarks/gpu_check.py with its arguments.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  wheels=(.whl/*.whl)
  # datasets 5 needs pyarrow >= 24; with an older pyarrow take the datasets of .whl/alt
  if ! "$PY" -c 'import sys, pyarrow; sys.exit(int(pyarrow.__version__.split(".")[0]) < 24)' 2>/dev/null; then
    wheels=($(ls .whl/*.whl | grep -v '/datasets-') .whl/alt/*.whl)
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-site "${wheels[@]}" \
    || { echo "gpu_check.sh: installing the carried wheels failed" >&2; exit 2; }
  export PYTHONPATH=/tmp/gpu-site${PYTHONPATH:+:$PYTHONPATH}
fi
exec "$PY" benchmarks/gpu_check.py "$@"
