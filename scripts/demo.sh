#!/usr/bin/env bash
# From a fresh clone to a trained Fashion-MNIST DCGAN: shards and the FID features, then
# 2 processes under torchrun on the CPU, evaluated (FID, KID, precision/recall) at steps 500
# and 1000: about 8 minutes on a busy 2-core machine (bench/README.md). Leaves runs/demo/samples/*.png.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh

if [ -f "$FASHION_MNIST/train-images-idx3-ubyte.gz" ]; then
    source=$FASHION_MNIST
    shards=data/fashion-mnist
else
    echo "demo: Fashion-MNIST is not installed (it needs root and apt-get);" \
         "using scikit-learn's bundled 8x8 digits, scaled to 28x28, instead"
    mkdir -p data
    python -c 'import numpy as np, sklearn.datasets as d; x = d.load_digits()
np.savez("data/digits.npz", x=(x.images * 255 / 16).astype(np.uint8), y=x.target)'
    source=data/digits.npz
    shards=data/digits
fi
[ -f "$shards/manifest.json" ] || python -m dcgan.shards "$source" "$shards" --size 28
# The offline FID features (a small classifier on the labelled images), evaluated against
# at steps 500 and 1000 (eval.every). One epoch: on a busy 2-core machine more costs minutes
# and adds little (held-out accuracy 0.82 on Fashion-MNIST, where chance is 0.10).
[ -f "$shards/features.pt" ] || python -m dcgan.eval train-features --shards "$shards" --epochs 1

# A rerun carries on where the last one stopped (or, finished, ends at once): `rm -rf runs/demo`
# starts it again.
torchrun --standalone --nproc_per_node=2 -m dcgan.train --config configs/fashion-mnist.yaml \
    data.shards="$shards" data.workers=1 train.name=demo train.steps=1000 train.batch_size=64 log.every=100 \
    eval.every=500 checkpoint.every=500
python -m dcgan.generate --checkpoint runs/demo/checkpoints/best.pt -n 64 --grid --interpolate 10 --out runs/demo/generated
echo "demo: done; the last grid is runs/demo/samples/step_00001000.png, and runs/demo/generated/ holds"
echo "      a grid and latent walks from the best-FID checkpoint (scores: grep eval runs/demo/train.log)"
