#!/usr/bin/env bash
# The reference comparison in one command: resnet50, resnext50_32x4d and resnext50_flat128, same recipe
# and seed, 10 epochs each, then the summary. Every argument is passed to `python -m cardinal.study`
# (arguments after `--` go to each training run):
#   launch/study.sh --data-dir /data/cifar --launcher "accelerate launch --config_file launch/gpu-bf16.yaml"
#   launch/study.sh --data-dir ../shared/data/cifar10-sample --epochs 3 -- --mixed-precision bf16 --channels-last
set -euo pipefail
exec python -m cardinal.study "$@"
