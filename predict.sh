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

# shellcheck source=env.sh
source "$here/env.sh"  # glnet_flags_from_env, glnet_run
args=(
    --mode "${MODE:-3}"
    --model_path "${MODEL_PATH:-$here/saved_models/}"
)
# Left out unless set: predict.py then takes them from --dataset (DeepGlobe's by default).
glnet_flags_from_env DATASET=--dataset CLASSES=--classes SIZE_G=--size_g SIZE_P=--size_p \
    SUB_BATCH_SIZE=--sub_batch_size DEVICE=--device
glnet_run "$here/predict.py" "${args[@]}" "$@"
