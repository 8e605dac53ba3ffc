#!/usr/bin/env bash
# Wheels for a GPU machine without network whose image has torch, transformers and accelerate
# but not diffusers, omegaconf or bitsandbytes (Python 3.12, x86-64). Run where pip works;
# the folder .whl/ then travels with the repository to that machine (tools/gpu_check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat -d .whl \
  diffusers==0.42.1 omegaconf==2.4.0 bitsandbytes  # diffusers wants importlib_metadata only before Python 3.8
ls -la .whl
