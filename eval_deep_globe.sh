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

read -r -a python <<< "${PYTHON:-python}"
args=(
    --mode "${MODE:-3}"
    --evaluation
    --split "${SPLIT:-crossvali}"
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
if [[ -n "${PATH_L2G:-}" ]]; then args+=(--path_l2g "$PATH_L2G"); fi
# Left out unless set: the per-mode default task name (helper.STAGES).
if [[ -n "${TASK_NAME:-}" ]]; then args+=(--task_name "$TASK_NAME"); fi
if [[ -n "${NUM_WORKERS:-}" ]]; then args+=(--num_workers "$NUM_WORKERS"); fi
if [[ -n "${DEVICE:-}" ]]; then args+=(--device "$DEVICE"); fi

# NPROC=N: N processes on this machine under torchrun (one per GPU; gloo processes on a CPU)
if [[ -n "${NPROC:-}" ]]; then
    exec "${python[@]}" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
        train_deep_globe.py "${args[@]}" "$@"
fi
exec "${python[@]}" train_deep_globe.py "${args[@]}" "$@"
