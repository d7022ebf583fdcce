#!/usr/bin/env bash
# Stage 1 of GLNet: train the global branch alone (mode 1) on downsampled images.
# Paper defaults; override with environment variables, e.g.
#   DATA_PATH=data/deep_globe NUM_EPOCHS=10 ./train_deep_globe_global.sh --num_workers 4
# Extra arguments are passed on to train_deep_globe.py (see python train_deep_globe.py --help).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
# shellcheck source=env.sh
source ./env.sh  # glnet_flags_from_env, glnet_run

args=(
    --mode 1
    --model_path "${MODEL_PATH:-./saved_models/}"
    --log_path "${LOG_PATH:-./runs/}"
)
# Dataset preset (train_deep_globe.py --dataset: deepglobe, the default, inria, isic, urur, folder with
# CLASSES=table.json): the flags below are left out unless set, and then take the preset's values.
glnet_flags_from_env DATASET=--dataset CLASSES=--classes N_CLASS=--n_class DATA_PATH=--data_path \
    BATCH_SIZE=--batch_size SUB_BATCH_SIZE=--sub_batch_size SIZE_G=--size_g SIZE_P=--size_p
# Left out unless set: train_deep_globe.py then uses its per-mode defaults (helper.STAGES).
glnet_flags_from_env TASK_NAME=--task_name NUM_EPOCHS=--num_epochs LR=--lr \
    NUM_WORKERS=--num_workers BACKBONE_WEIGHTS=--backbone_weights DEVICE=--device SEED=--seed

# NPROC=N: N processes on this machine under torchrun
glnet_run train_deep_globe.py "${args[@]}" "$@"
