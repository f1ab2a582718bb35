#!/usr/bin/env bash
# Retrain the shipped model from the shared photo pool (`make model`): prepare, fit, export, evaluate.
# usage: train/make_model.sh SHARED WORK MODEL
#   SHARED  the shared folder (holds data/mushrooms, data/fungi-other and weights/), e.g. ../shared
#   WORK    a scratch dir for the manifest, the Keras model and reports (recreated)
#   MODEL   the bundle to write, e.g. models/mushcam-mnv2-7sp (replaced only if the new one passes export,
#           and only with folds, from LOSO or FOLDS: without them the bundle goes to WORK/bundle)
#   DOCS    (environment, default docs) where the risk-coverage curve and the score comparison are copied
#   LOSO    (environment, default WORK-loso) leave-one-species-out folds of this split (`make loso`): when
#           they are there, export calibrates on their held-out species too; LOSO= (empty) leaves them out
#   FOLDS   (environment, default train/shared-pool-folds.json) the folds' evidence as one file: used when
#           LOSO has no folds, rewritten when it has; FOLDS= (empty) leaves it out
#   FROM    (environment) `export` skips prepare and fit (WORK already holds the fit: `make loso` re-exports)
# The other pool (fungi-other) is the `other` class and the unseen species the thresholds are calibrated on.
# See docs/training.md for the measured times.
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

OTHER="$SHARED/data/fungi-other"
# The cross-architecture margins, measured with `mushcam-train evaluate --arch aarch64` (733 test photos,
# emulated Cortex-A72). First open-world fit: |d score| max 0.0175, |d mass| p99 0.076; the suggested ood
# 0.018 and mass 0.006 remove every one-sided EDIBLE; confidence 0.02 kept from the first recipe. Later
# fits: |d score| max 0.0213 (224 px), 0.018 (the shipped 288 px fit, 730 photos; the tool suggests ood
# 0.019); at these margins no photo is EDIBLE on one CPU and not EDIBLE at the raw thresholds on the other
# (the EDIBLE/UNSURE flips all are), so they are kept (README, aarch64).
MARGINS_WHY="measured x86-64 vs emulated aarch64 (Cortex-A72) on the test photos: |d ood| max 0.0175 (733 photos; later fits 0.0213 at 224 px, 0.018 at 288 px), suggested ood 0.018, mass 0.006; confidence 0.02 kept; at these margins every one-CPU EDIBLE is EDIBLE at the raw thresholds on the other"
DOCS=${DOCS:-docs}

for need in "$SHARED/data/mushrooms/edibility.csv" "$OTHER/species.csv" "$WEIGHTS"; do
  if [ ! -e "$need" ]; then
    echo "error: $need not found; pass the shared folder as SHARED" >&2
    exit 1
  fi
done

# Every pored bolete of the other pool is `other` TRAINING data (none in val/test): two of the three edible
# species are boletes, and with boletes on the val/test side no fit learnt "red-stemmed bolete, not a penny
# bun" (the scarletina fold). The cost: the unseen val/test species hold no bolete, so only the scarletina
# fold measures a bolete look-alike (docs/training.md).
BOLETES=(boletus caloboletus chalciporus gyroporus hortiboletus imperator leccinum rubroboletus strobilomyces
         suillellus suillus tylopilus xerocomellus xerocomus)
GENUS_ARGS=()
for g in "${BOLETES[@]}"; do GENUS_ARGS+=(--other-train-genus "$g"); done
# 288 px, fit seed 2: at 224 px the fits that met every per-species leave-one-species-out target covered
# 22/107 and 14/107 of the val edible photos, and the one shipped (34/107) let 7.2 % of the scarletina fold
# through; at 288 px the folds (refitted at 288) gave 11/1,193 held-out photos EDIBLE (every species <= 5 %)
# at 25/107, and a second fit (seed 3) against the same folds 3/1,193 at 27/107. The fit takes about 1.4x as
# long (docs/training.md).
if [ "${FROM:-prepare}" != export ]; then
  "${TRAIN[@]}" prepare "$SHARED/data/mushrooms" --out "$WORK" --seed 0 --other "$OTHER" --other-val 0.25 --other-test 0.25 \
    "${GENUS_ARGS[@]}"
  "${TRAIN[@]}" fit "$WORK" --weights "$WEIGHTS" --backbone mobilenet_v2 --alpha 1.0 --size 288 \
    --epochs 30 --fine-tune-epochs 6 --feature-copies 4 --seed 2
fi
# The val other species alone under-predict a look-alike the model never saw (the scarletina fold: 50/264
# EDIBLE at its own val-calibrated point), so the folds' held-out species are calibration evidence too: all
# of them <= 1 % EDIBLE and each species <= 5 % (issue 9's targets). From the folds `make loso` left in
# LOSO, else from FOLDS, the file those folds' evidence was last written to (no refit: the folds take an hour).
LOSO=${LOSO-$WORK-loso}
FOLDS=${FOLDS-train/shared-pool-folds.json}
LOSO_ARGS=()
FOLDS_FROM=
OUT=$MODEL
if [ -n "$LOSO" ] && compgen -G "$LOSO/without-*/loso.json" > /dev/null; then
  FOLDS_FROM=$LOSO
elif [ -n "$FOLDS" ] && [ -f "$FOLDS" ]; then
  FOLDS_FROM=$FOLDS
  echo "note: calibrating on the fold evidence in $FOLDS (make loso measures the folds again)" >&2
else
  # Without folds the val species alone set the thresholds: on this pool that point answered 1/179 known
  # poisonous test photos EDIBLE (the shipped, fold-calibrated one 0/179), so it never replaces MODEL
  # (export would refuse to anyway) nor the figures in DOCS.
  OUT=$WORK/bundle
  echo "note: no leave-one-species-out folds in ${LOSO:-(LOSO empty)} nor ${FOLDS:-(FOLDS empty)}: thresholds from the val species only, so the bundle goes to $OUT and $MODEL is left as it is (make loso adds the folds and writes $MODEL)" >&2
fi
if [ -n "$FOLDS_FROM" ]; then
  LOSO_ARGS=(--loso "$FOLDS_FROM" --max-held-edible 0.01 --max-held-fold-edible 0.05)
fi
"${TRAIN[@]}" export "$WORK" --out "$OUT" --name "$(basename "$MODEL")" --calibration 1000 --samples 2 \
  --ood-method knn --max-unseen-edible 0.01 --max-poison-edible 0.005 --confidence-margin 0.02 --ood-margin 0.018 \
  --mass-margin 0.006 --margins-why "$MARGINS_WHY" \
  --other-samples 0 "${LOSO_ARGS[@]}"
"${TRAIN[@]}" evaluate "$OUT" "$WORK" --split test --report "$WORK/report" --record
if [ -n "$FOLDS_FROM" ] && [ "$FOLDS_FROM" = "$LOSO" ] && [ -n "$FOLDS" ]; then
  # The folds just used, as one file, so that the next `make model` (another machine) calibrates the same way.
  "${TRAIN[@]}" folds "$LOSO" "$WORK" --out "$FOLDS"
fi
if [ "$OUT" != "$MODEL" ]; then
  echo "val-only bundle: $OUT (test figures in $WORK/report); $MODEL and $DOCS unchanged" >&2
  exit 0
fi
mkdir -p "$DOCS/figures"
cp "$WORK/report/risk_coverage.png" "$WORK/report/risk_coverage.csv" "$DOCS/figures/"
cp "$WORK/openworld/compare.png" "$DOCS/figures/score-comparison.png"
cp "$WORK/openworld/compare.csv" "$DOCS/figures/score-comparison.csv"
cp "$WORK/openworld/compare.md" "$DOCS/figures/score-comparison.md"
# The folds' frontier (the README shows it) is this export's only when it had folds: a file left by an
# earlier export with folds would be stale.
if [ ${#LOSO_ARGS[@]} -gt 0 ]; then
  cp "$WORK/openworld/loso_risk_coverage.png" "$WORK/openworld/loso_risk_coverage.csv" "$DOCS/figures/"
fi
