#!/usr/bin/env bash
# Stage 3 of GLNet: retrain the global branch with the frozen local branch of
# stage 2 (PATH_G2L) as context; the stage-1 model (PATH_G) gives the local
# branch its global context (mode 3).
# Paper defaults; override with environment variables, e.g.
#   DATA_PATH=data/deep_globe NUM_EPOCHS=10 ./train_deep_globe_local2global.sh --num_workers 4
# Extra arguments are passed on to train_deep_globe.py (see python train_deep_globe.py --help).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

read -r -a python <<< "${PYTHON:-python}"
args=(
    --mode 3
    --model_path "${MODEL_PATH:-./saved_models/}"
    --log_path "${LOG_PATH:-./runs/}"
)
# Dataset preset (train_deep_globe.py --dataset: deepglobe, the default, inria, isic, folder with
# CLASSES=table.json): the flags below are left out unless set, and then take the preset's values.
if [[ -n "${DATASET:-}" ]]; then args+=(--dataset "$DATASET"); fi
if [[ -n "${CLASSES:-}" ]]; then args+=(--classes "$CLASSES"); fi
if [[ -n "${N_CLASS:-}" ]]; then args+=(--n_class "$N_CLASS"); fi
if [[ -n "${DATA_PATH:-}" ]]; then args+=(--data_path "$DATA_PATH"); fi
if [[ -n "${BATCH_SIZE:-}" ]]; then args+=(--batch_size "$BATCH_SIZE"); fi
if [[ -n "${SUB_BATCH_SIZE:-}" ]]; then args+=(--sub_batch_size "$SUB_BATCH_SIZE"); fi
if [[ -n "${SIZE_G:-}" ]]; then args+=(--size_g "$SIZE_G"); fi
if [[ -n "${SIZE_P:-}" ]]; then args+=(--size_p "$SIZE_P"); fi
if [[ -n "${PATH_G:-}" ]]; then args+=(--path_g "$PATH_G"); fi
if [[ -n "${PATH_G2L:-}" ]]; then args+=(--path_g2l "$PATH_G2L"); fi
# Left out unless set: train_deep_globe.py then uses its per-mode defaults (helper.STAGES).
if [[ -n "${TASK_NAME:-}" ]]; then args+=(--task_name "$TASK_NAME"); fi
if [[ -n "${NUM_EPOCHS:-}" ]]; then args+=(--num_epochs "$NUM_EPOCHS"); fi
if [[ -n "${LR:-}" ]]; then args+=(--lr "$LR"); fi
if [[ -n "${NUM_WORKERS:-}" ]]; then args+=(--num_workers "$NUM_WORKERS"); fi
if [[ -n "${DEVICE:-}" ]]; then args+=(--device "$DEVICE"); fi
if [[ -n "${SEED:-}" ]]; then args+=(--seed "$SEED"); fi

# NPROC=N: N processes on this machine under torchrun (one per GPU; gloo processes on a CPU)
if [[ -n "${NPROC:-}" ]]; then
    exec "${python[@]}" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
        train_deep_globe.py "${args[@]}" "$@"
fi
exec "${python[@]}" train_deep_globe.py "${args[@]}" "$@"
