#!/usr/bin/env bash
# Retrain the shipped model from the shared photo pool (`make model`): prepare, fit, export, evaluate.
# usage: train/make_model.sh SHARED WORK MODEL
#   SHARED  the shared folder (holds data/mushrooms and weights/), e.g. ../shared
#   WORK    a scratch dir for the manifest, the Keras model and reports (recreated)
#   MODEL   the bundle to write, e.g. models/mushcam-mnv2-7sp (replaced only if the new one passes export)
# About 6-7 minutes on a 2-core x86-64 workstation (see docs/training.md for the measured times).
set -euo pipefail

if [ $# -ne 3 ]; then
  echo "usage: $0 SHARED WORK MODEL" >&2
  exit 2
fi
SHARED=$1
WORK=$2
MODEL=$3
WEIGHTS="$SHARED/weights/mobilenet_v2_1.0_224_no_top.weights.h5"

if [ -x .venv/bin/mushcam-train ]; then
  TRAIN=(.venv/bin/mushcam-train)
else
  TRAIN=("${PYTHON:-python3}" -m train)
fi

for need in "$SHARED/data/mushrooms/edibility.csv" "$WEIGHTS"; do
  if [ ! -e "$need" ]; then
    echo "error: $need not found; pass the shared folder as SHARED" >&2
    exit 1
  fi
done

"${TRAIN[@]}" prepare "$SHARED/data/mushrooms" --out "$WORK" --seed 0
"${TRAIN[@]}" fit "$WORK" --weights "$WEIGHTS" --backbone mobilenet_v2 --alpha 1.0 --size 224 \
  --epochs 30 --fine-tune-epochs 12 --feature-copies 8 --seed 0
"${TRAIN[@]}" export "$WORK" --out "$MODEL" --name "$(basename "$MODEL")" --calibration 1000 --samples 2 \
  --ood-method knn --min-edible-coverage 0.75
"${TRAIN[@]}" evaluate "$MODEL" "$WORK" --split test --report "$WORK/report" --record
