#!/usr/bin/env bash
# Evaluate a trained GLNet stage on data_path/$SPLIT (--evaluation; SPLIT=crossvali by default,
# SPLIT=test for the paper's figures):
#   MODE=1 global (PATH_G), MODE=2 global2local (PATH_G2L), MODE=3 full GLNet
#   (PATH_L2G with the frozen global model PATH_G; the default).
# Per-class IoU and mIoU are printed and written to <LOG_PATH>/<TASK_NAME>.<SPLIT>.metrics.json.
# Extra arguments are passed on, e.g. --predictions_dir DIR, --test, --tta:
#   MODE=3 ./eval_deep_globe.sh --predictions_dir predictions --tta
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
# shellcheck source=env.sh
source ./env.sh  # glnet_flags_from_env, glnet_run

args=(
    --mode "${MODE:-3}"
    --evaluation
    --split "${SPLIT:-crossvali}"
    --model_path "${MODEL_PATH:-./saved_models/}"
    --log_path "${LOG_PATH:-./runs/}"
)
# Dataset preset (train_deep_globe.py --dataset: deepglobe, the default, inria, isic, urur, folder with
# CLASSES=table.json): the flags below are left out unless set, and then take the preset's values.
glnet_flags_from_env DATASET=--dataset CLASSES=--classes N_CLASS=--n_class DATA_PATH=--data_path \
    BATCH_SIZE=--batch_size SUB_BATCH_SIZE=--sub_batch_size SIZE_G=--size_g SIZE_P=--size_p \
    PATH_G=--path_g PATH_G2L=--path_g2l PATH_L2G=--path_l2g
# Left out unless set: the per-mode default task name (helper.STAGES).
glnet_flags_from_env TASK_NAME=--task_name NUM_WORKERS=--num_workers DEVICE=--device

# NPROC=N: N processes on this machine under torchrun
glnet_run train_deep_globe.py "${args[@]}" "$@"
