# Sourced by scripts/demo.sh and scripts/test.sh: everything a fresh machine needs.
#  * .venv with torch==2.14.1 torchvision==0.29.1 and this project (+ test extras);
#  * Debian's dataset-fashion-mnist (real 28x28 images, offline) when we are root with
#    apt-get; without it the demo and the tests fall back to scikit-learn's digits.
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    echo "setup: $PYTHON is older than 3.10; set PYTHON=/path/to/python3.10+" >&2
    exit 1
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
PIP="python -m pip install --quiet --disable-pip-version-check"
$PIP torch==2.14.1 torchvision==0.29.1
$PIP -e ".[test]"

FASHION_MNIST=/usr/share/datasets/fashion-mnist
if [ ! -f "$FASHION_MNIST/train-images-idx3-ubyte.gz" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing Debian's dataset-fashion-mnist"
    apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; } \
        || echo "setup: could not install dataset-fashion-mnist; falling back to scikit-learn's digits" >&2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread per process when several share the CPU
