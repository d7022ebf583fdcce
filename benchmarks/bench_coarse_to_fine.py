"""Plain GLNet against the coarse-to-fine GLNet on small lesions in large images, on the CPU.

    python benchmarks/bench_coarse_to_fine.py --threads 2

A synthetic imbalanced binary set is written (skin-coloured images with one small dark lesion
each, 1-3 % of the pixels, in the GLNet layout with 0/255 masks); then, through
`train_deep_globe.py --dataset isic` in child processes, the README's recipes for two rows of
the paper's table 4, at one training budget (the same epochs per stage):

- G->L: mode 1 on whole images (`--epochs_global` epochs; it is also the coarse model of the
  other row), then mode 2 on whole images from it (`--epochs_fine` epochs);
- G->L + box: mode 1 with `--crop_foreground` (as many epochs; on the crops' global views),
  then mode 2 with `--crop_foreground` from it, evaluated with `--coarse_to_fine
  --path_coarse` the first row's mode-1 model.

Both are evaluated on the test split: lesion IoU, mIoU and the challenge score (per image the
lesion IoU where it is at least 0.65, else 0), the evaluation's wall time per image (the whole
process over the split, start-up included) and its peak RSS; and the training seconds of each
row (the shared mode-1 model counted in both). Weights start from random init
(`--backbone_weights none`, nothing downloaded). One JSON line goes to
benchmarks/results/coarse_to_fine.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import benchmarks as B  # noqa: E402

SPLITS = (("train", "n_train"), ("crossvali", "n_val"), ("test", "n_test"))


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--size", type=int, default=512, help="side of the square synthetic images")
    a("--n_train", type=int, default=32)
    a("--n_val", type=int, default=4)
    a("--n_test", type=int, default=8)
    a("--size_g", type=int, default=128, help="global view side")
    a("--size_p", type=int, default=128, help="patch side")
    a("--batch_size", type=int, default=4)
    a("--sub_batch_size", type=int, default=6)
    a("--epochs_global", type=int, default=15, help="epochs of the coarse (mode 1) model")
    a("--epochs_fine", type=int, default=4, help="epochs of each mode-2 model")
    a("--lr", type=float, default=1e-4, help="learning rate of every stage (1e-3 left the random-init global model predicting only background here)")
    a("--threads", type=int, default=None, help="OMP/MKL threads of the children")
    a("--seed", type=int, default=0)
    a("--keep", default=None, help="keep the data, checkpoints and logs in this folder")
    a("--results", default=os.path.join(REPO, "benchmarks", "results", "coarse_to_fine.jsonl"))
    return p


def lesion_sample(rng, size: int):
    """One (image HxWx3 uint8, mask HxW uint8 0/255): smooth skin tones with pores and a few
    hairs, one irregular dark lesion of 1-3 % of the image at a random place."""
    import numpy as np

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    shade = 0.5 + 0.5 * np.sin(2 * np.pi * (rng.uniform(0.5, 1.5) * xx + rng.uniform(0.5, 1.5) * yy + rng.uniform()))
    skin = np.array([224, 178, 150], np.float32) + rng.normal(0, 8, 3)
    image = skin[None, None, :] * (0.85 + 0.15 * shade[..., None])
    image += rng.normal(0, 6, (size, size, 1))  # pores, grey
    for _ in range(rng.integers(2, 6)):  # hairs: dark thin lines across the image
        a, b = rng.uniform(-1, 1), rng.uniform(0, 1)
        line = np.abs((yy - b) - a * (xx - rng.uniform())) < 1.2 / size
        image[line] *= 0.45
    share = rng.uniform(0.01, 0.03)
    radius = np.sqrt(share / np.pi)
    cy, cx = rng.uniform(radius + 0.02, 1 - radius - 0.02, 2)
    angle = np.arctan2(yy - cy, xx - cx)
    wobble = 1 + 0.18 * np.sin(3 * angle + rng.uniform(0, 6.3)) + 0.1 * np.sin(5 * angle + rng.uniform(0, 6.3))
    mask = np.hypot(yy - cy, xx - cx) < radius * wobble
    lesion = np.array([120, 72, 55], np.float32) + rng.normal(0, 10, 3)
    image[mask] = lesion * (0.8 + 0.4 * rng.random((int(mask.sum()), 1)))
    return np.clip(image, 0, 255).astype(np.uint8), mask.astype(np.uint8) * 255


def write_lesion_set(out: str, args) -> None:
    """The GLNet layout: <split>/Sat/<id>_sat.jpg and <split>/Label/<id>_mask.png."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(args.seed)
    for split, count in SPLITS:
        os.makedirs(os.path.join(out, split, "Sat"), exist_ok=True)
        os.makedirs(os.path.join(out, split, "Label"), exist_ok=True)
        for i in range(getattr(args, count)):
            image, mask = lesion_sample(rng, args.size)
            Image.fromarray(image).save(os.path.join(out, split, "Sat", f"{split}{i:03d}_sat.jpg"), quality=95)
            Image.fromarray(mask).save(os.path.join(out, split, "Label", f"{split}{i:03d}_mask.png"))


def run_cli(args, root: str, extra: list[str]):
    """train_deep_globe.py with the benchmark's common flags; (wall s, output lines, usage, peak)."""
    common = ["--dataset", "isic", "--data_path", os.path.join(root, "data"),
              "--model_path", os.path.join(root, "models"), "--log_path", os.path.join(root, "runs"),
              "--size_g", str(args.size_g), "--size_p", str(args.size_p), "--batch_size", str(args.batch_size),
              "--sub_batch_size", str(args.sub_batch_size), "--device", "cpu", "--num_workers", "0",
              "--seed", str(args.seed), "--no_progress"]
    cmd = [sys.executable, os.path.join(REPO, "train_deep_globe.py"), *common, *extra]
    print("running: " + " ".join(extra), flush=True)
    return B.time_child(cmd, B.child_env(args.threads))


def train(args, root: str) -> dict[str, float]:
    """The four training runs; the training seconds of each row."""
    def run(task: str, mode: str, epochs: int, extra: list[str]) -> float:
        wall, *_ = run_cli(args, root, ["--mode", mode, "--task_name", task, "--num_epochs", str(epochs),
                                        "--lr", str(args.lr), "--backbone_weights", "none", *extra])
        return wall

    coarse = run("coarse", "1", args.epochs_global, [])
    plain = run("plain_g2l", "2", args.epochs_fine, ["--path_g", "coarse.pth"])
    box_g = run("box_g", "1", args.epochs_global, ["--crop_foreground"])
    box = run("box_g2l", "2", args.epochs_fine, ["--path_g", "box_g.pth", "--crop_foreground"])
    return {"plain": coarse + plain, "box": coarse + box_g + box}


def evaluate(args, root: str, task: str, extra: list[str]) -> dict:
    """Evaluate a mode-2 checkpoint on the test split: its metrics' aggregated entry, seconds per
    image (the whole process) and peak RSS."""
    wall, _, usage, peak = run_cli(args, root, ["--mode", "2", "--evaluation", "--split", "test", "--task_name", task,
                                                "--path_g2l", f"{task}.pth", *extra])
    with open(os.path.join(root, "runs", f"{task}.test.metrics.json")) as f:
        metrics = json.load(f)
    entry = metrics.get("aggregated", metrics)
    return {"lesion_iou": entry["iou"][1], "miou": entry["miou"], "challenge_score": entry.get("challenge_score"),
            "s_per_image": wall / args.n_test, "peak_rss_mib": usage.ru_maxrss / 1024, "tree_peak_mib": peak}


def main(argv=None) -> int:
    import torch

    args = get_parser().parse_args(argv)
    root = args.keep or tempfile.mkdtemp(prefix="bench_c2f_")
    try:
        write_lesion_set(os.path.join(root, "data"), args)
        seconds = train(args, root)
        plain = {**evaluate(args, root, "plain_g2l", []), "train_s": seconds["plain"]}
        box = {**evaluate(args, root, "box_g2l", ["--coarse_to_fine", "--path_coarse", "coarse.pth"]),
               "train_s": seconds["box"]}
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    rows = [{"model": "G->L (plain)", **plain}, {"model": "G->L + box", **box}]
    columns = [("model", "model"), ("lesion IoU", "lesion_iou"), ("mIoU", "miou"), ("challenge", "challenge_score"),
               ("eval s/image", "s_per_image"), ("eval peak RSS MiB", "peak_rss_mib"), ("training s", "train_s")]
    print(B.format_table(rows, columns))
    B.append_jsonl(args.results, {
        "benchmark": "coarse_to_fine", "date": B.now(), "command": B.command_line(),
        "machine": B.machine_info(torch.device("cpu")), "config": vars(args), "results": rows,
    })
    print(f"appended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
