#!/usr/bin/env bash
# The test suite from a fresh clone: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
python -m pytest tests "$@"
