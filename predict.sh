#!/usr/bin/env bash
# Predict class masks of your own images (any size; JPEG, PNG, TIFF, GeoTIFF) with trained
# checkpoints. Defaults: mode 3, the --dataset preset's sizes; override with environment variables:
#   ./predict.sh scene.tif photos/ --out predictions
#   MODE=1 MODEL_PATH=saved_models ./predict.sh 'tiles/*.jpg' --out out --format index color overlay
#   DATASET=inria ./predict.sh austin1.tif --out out --format geotiff
# Arguments are passed on to predict.py (see python predict.py --help); NPROC=N shares the
# inputs out among N processes under torchrun.
# Relative paths are the caller's (this script does not change folder).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

read -r -a python <<< "${PYTHON:-python}"
args=(
    --mode "${MODE:-3}"
    --model_path "${MODEL_PATH:-$here/saved_models/}"
)
# Left out unless set: predict.py then takes them from --dataset (DeepGlobe's by default).
if [[ -n "${DATASET:-}" ]]; then args+=(--dataset "$DATASET"); fi
if [[ -n "${CLASSES:-}" ]]; then args+=(--classes "$CLASSES"); fi
if [[ -n "${SIZE_G:-}" ]]; then args+=(--size_g "$SIZE_G"); fi
if [[ -n "${SIZE_P:-}" ]]; then args+=(--size_p "$SIZE_P"); fi
if [[ -n "${SUB_BATCH_SIZE:-}" ]]; then args+=(--sub_batch_size "$SUB_BATCH_SIZE"); fi
if [[ -n "${DEVICE:-}" ]]; then args+=(--device "$DEVICE"); fi

if [[ -n "${NPROC:-}" ]]; then
    exec "${python[@]}" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" "$here/predict.py" "${args[@]}" "$@"
fi
exec "${python[@]}" "$here/predict.py" "${args[@]}" "$@"
