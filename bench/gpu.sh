#!/usr/bin/env bash
# Every GPU check and figure, in one call of at most 8 minutes on one GPU:
#
#   bash bench/gpu.sh [--out DIR] [--only env,packages,e2e,tests,throughput] [--cpu-smoke]
#
# Each stage prints PASS or FAIL with its time; a summary of at most 60 lines ends the
# output. The log (gpu.log), each run's log and report.json go to DIR (default: $OUT, else
# bench/gpu-out). Stages and figures: bench/gpu.py. --cpu-smoke runs every stage at tiny
# sizes on the CPU in under two minutes (tests/e2e/test_performance.py runs it, so this
# script works the day a GPU comes).
#
# A GPU machine without internet lacks webdataset, wandb and submitit: scripts/gpu_wheels.sh,
# run beforehand where pip can download, puts their wheels in .whl/, which this installs
# (into /tmp/dcgan-site, not over the machine's own packages).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/dcgan-site .whl/*.whl || echo "gpu.sh: installing .whl/ failed (the packages stage will say what is missing)" >&2
    export PYTHONPATH="/tmp/dcgan-site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PYTHON" -m bench.gpu "$@"
