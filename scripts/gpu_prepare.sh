#!/usr/bin/env bash
# Here, before a device run: put what the bare GPU machine lacks into .gpu/ (ignored by git),
# to be named in the run's carry: the CIFAR-10 JPEG copy and Python 3.12 wheels of the pure
# dependencies of training (the machine has only torch, torchvision, numpy and pillow).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu/whl
cp -n ../shared/data/cifar10-jpeg.tgz .gpu/ 2>/dev/null || true
for p in pyyaml matplotlib contourpy cycler fonttools kiwisolver pyparsing python-dateutil six \
         packaging tqdm pytest iniconfig pluggy pygments; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .gpu/whl "$p"
done
# the commit the device runs (no .git travels there) and the sums that tell whether the tree
# there still is that commit; commit before preparing
. scripts/gpu_commit.sh
gpu_commit_write
du -sh .gpu
