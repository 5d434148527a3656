#!/usr/bin/env bash
# The wheels a GPU machine without internet needs to run dcgan (bench/gpu.sh installs
# them): webdataset, wandb and submitit with what they need, for Python 3.12 on
# x86_64 manylinux, into .whl/ (git-ignored). Packages the GPU image already holds
# (torch, numpy, pyyaml, requests, protobuf, ...; the device tool's KINDS.md lists them)
# are left out: a second copy would shadow the image's own.
#   bash scripts/gpu_wheels.sh [PYTHON_VERSION]     (default 3.12)
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-3.12}
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
rm -rf .whl && mkdir -p .whl/all
python3 -m pip download --quiet --disable-pip-version-check --only-binary=:all: --python-version "$version" \
    --implementation cp "${platforms[@]}" -d .whl/all webdataset==1.0.2 wandb==0.31.0 submitit==1.5.3
# What pip pulls in that the GPU image already holds (the device tool's KINDS.md lists
# its packages), in wheel-file spelling.
have="anyio certifi charset_normalizer click cloudpickle h11 httpcore httpx idna numpy packaging protobuf
pyyaml requests typing_extensions urllib3 xxhash"
for wheel in .whl/all/*.whl; do
    name=$(basename "$wheel" | cut -d- -f1 | tr 'A-Z' 'a-z')
    if ! grep -qw -- "$name" <<<"$have"; then
        mv "$wheel" .whl/
    fi
done
rm -rf .whl/all
ls .whl
du -sh .whl
