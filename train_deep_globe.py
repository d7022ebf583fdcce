"""Train or evaluate GLNet on DeepGlobe: one entry point for the three modes.

    python train_deep_globe.py --mode 1 --task_name fpn_deepglobe_global --data_path data/deep_globe
    python train_deep_globe.py --mode 2 ... --path_g fpn_deepglobe_global.pth
    python train_deep_globe.py --mode 3 ... --path_g ... --path_g2l fpn_deepglobe_global2local.pth
    add --evaluation (and --path_l2g for mode 3) to evaluate data_path/crossvali.

Checkpoint names (--path_*) are joined to --model_path, as in the original.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
import traceback
import warnings

# Defaults that differ per mode (GLNET_SPEC.md section 6): epochs, learning rate.
MODE_DEFAULTS = {1: (120, 5e-5), 2: (50, 2e-5), 3: (120, 5e-5)}


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="GLNet on DeepGlobe: --mode 1 global, 2 global2local, 3 local2global.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument
    # The original's flags, same meaning.
    a("--n_class", type=int, default=7, help="number of classes")
    a("--data_path", type=str, default="./data/deep_globe/", help="folder with train/, crossvali/ (and test/)")
    a("--model_path", type=str, default="./saved_models/", help="folder for checkpoints; --path_* are relative to it")
    a("--log_path", type=str, default="./runs/", help="folder for TensorBoard logs, text logs and metrics")
    a("--task_name", type=str, default=None, help="run name: <model_path>/<task_name>.pth, <log_path>/<task_name>/ (default: from the mode)")
    a("--mode", type=int, choices=(1, 2, 3), default=1, help="1: global, 2: global2local, 3: local2global")
    a("--evaluation", action="store_true", help="evaluate on data_path/crossvali instead of training")
    a("--batch_size", type=int, default=6, help="images per optimizer step")
    a("--sub_batch_size", type=int, default=6, help="patches per forward pass")
    a("--size_g", type=int, default=508, help="side of the downsampled global image")
    a("--size_p", type=int, default=508, help="side of the full-resolution patches")
    a("--path_g", type=str, default="fpn_deepglobe_global.pth", help="global checkpoint (modes 2, 3; mode 1 evaluation)")
    a("--path_g2l", type=str, default="fpn_deepglobe_global2local.pth", help="global2local checkpoint (mode 3 training; mode 2 evaluation)")
    a("--path_l2g", type=str, default="fpn_deepglobe_local2global.pth", help="local2global checkpoint (mode 3 evaluation)")
    a("--lamb_fmreg", type=float, default=0.15, help="weight of the feature-map MSE regularisation (mode 2)")
    # New flags.
    a("--num_epochs", type=int, default=None, help="epochs (default: 120 for modes 1 and 3, 50 for mode 2)")
    a("--lr", type=float, default=None, help="base learning rate (default: 5e-5 for modes 1 and 3, 2e-5 for mode 2)")
    a("--device", type=str, default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available)")
    a("--num_workers", type=int, default=2, help="data loading worker processes")
    a("--seed", type=int, default=0, help="seed for init, shuffling and augmentation")
    a("--predictions_dir", type=str, default=None, help="write <id>_mask.png colour predictions here (evaluation, --test)")
    a("--test", action="store_true", help="predict the unlabelled data_path/test split into --predictions_dir")
    a("--tta", action="store_true", help="test-time augmentation: sum scores over the 8 flips/rotations")
    a("--backbone_weights", type=str, default="imagenet", help="ResNet-50 init for training: imagenet, none, or a state-dict file")
    a("--resume", action="store_true", help="continue an interrupted training run from <model_path>/<task_name>.resume.pth")
    a("--no_progress", action="store_true", help="no progress bars")
    a("--debug", action="store_true", help="show tracebacks for errors")
    return p


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the per-mode defaults and check the flags (UserError on a bad value)."""
    from utils.errors import UserError

    epochs, lr = MODE_DEFAULTS[args.mode]
    args.num_epochs = epochs if args.num_epochs is None else args.num_epochs
    args.lr = lr if args.lr is None else args.lr
    if args.task_name is None:
        args.task_name = {1: "fpn_deepglobe_global", 2: "fpn_deepglobe_global2local", 3: "fpn_deepglobe_local2global"}[args.mode]
    if args.test:
        args.evaluation = True
        if not args.predictions_dir:
            raise UserError("--test needs --predictions_dir DIR to write the predictions to")
    for name in ("size_g", "size_p"):
        v = getattr(args, name)
        if v <= 0 or v % 4:
            raise UserError(f"--{name} must be a positive multiple of 4 (the FPN output is 1/4 of the input), got {v}")
    for name in ("batch_size", "sub_batch_size", "n_class", "num_epochs"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.num_workers < 0:
        raise UserError(f"--num_workers must be >= 0, got {args.num_workers}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise UserError(f"--lr must be a positive number, got {args.lr}")
    return args


def get_device(name: str | None):
    import torch

    from utils.errors import UserError

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"--device {name!r} is not a torch device ({e})") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but CUDA is not available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def checkpoint_path(args, name: str) -> str:
    return os.path.join(args.model_path, name)


def build_models(args, device):
    """The model (trained or evaluated) and, for mode 3, the frozen global model,
    loaded as GLNET_SPEC.md section 1 prescribes for each run."""
    import torch

    from models import GLNet
    from models.resnet import load_backbone_weights
    from utils.checkpoint import global_keys, load_checkpoint

    torch.manual_seed(args.seed)
    model = GLNet(args.n_class)
    mode, ev = args.mode, args.evaluation
    if mode == 1 and not ev:
        for backbone in (model.resnet_global, model.resnet_local):
            load_backbone_weights(backbone, args.backbone_weights)
    elif mode == 1:
        load_checkpoint(model, checkpoint_path(args, args.path_g), global_keys)
    elif mode == 2 and not ev:
        load_checkpoint(model, checkpoint_path(args, args.path_g), global_keys)
        load_backbone_weights(model.resnet_local, args.backbone_weights)
    elif mode == 2:
        load_checkpoint(model, checkpoint_path(args, args.path_g2l))
    else:
        load_checkpoint(model, checkpoint_path(args, args.path_l2g if ev else args.path_g2l))
    frozen = None
    if mode == 3:
        frozen = GLNet(args.n_class)
        load_checkpoint(frozen, checkpoint_path(args, args.path_g), global_keys)
        frozen.resnet_local = frozen.fpn_local = None  # only its global branch is used
        frozen.requires_grad_(False)
        frozen.to(device).eval()
    return model.to(device), frozen


def make_loader(dataset, args, device, shuffle: bool, batch_size: int, generator=None):
    from torch.utils.data import DataLoader

    from dataset.deep_globe import collate

    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=args.num_workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        generator=generator,
        drop_last=False,
    )


def format_table(results: dict) -> str:
    """Per-class IoU table with class names, one column per output."""
    from dataset.classes import CLASS_NAMES

    names = list(results)
    n = len(next(iter(results.values()))["iou"])
    class_names = list(CLASS_NAMES) if n == len(CLASS_NAMES) else [f"class {i}" for i in range(n)]
    lines = [f"{'class':<14}" + "".join(f"{k:>12}" for k in names)]
    for c in range(n):
        cells = "".join(
            f"{'n/a' if results[k]['iou'][c] is None else format(results[k]['iou'][c], '.4f'):>12}" for k in names
        )
        lines.append(f"{c} {class_names[c]:<12}" + cells)
    lines.append(f"{'mIoU (1..)':<14}" + "".join(f"{results[k]['miou']:>12.4f}" for k in names))
    return "\n".join(lines)


def metrics_dict(cms) -> dict:
    return {
        name: {"iou": [None if math.isnan(x) else x for x in cm.iou()], "miou": cm.miou()} for name, cm in cms.items()
    }


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def run_evaluation(args, device, model, frozen) -> int:
    import helper
    from dataset.deep_globe import DeepGlobe

    split = "test" if args.test else "crossvali"
    ds = DeepGlobe(args.data_path, split, args.size_g, args.size_p, args.n_class, labels=not args.test)
    loader = make_loader(ds, args, device, shuffle=False, batch_size=args.batch_size)
    t0 = time.time()
    cms, _ = helper.evaluate(
        model, loader, args.mode, device, args.n_class, args.size_p, args.sub_batch_size, frozen,
        tta=args.tta, predictions_dir=args.predictions_dir, with_labels=not args.test,
        progress=not args.no_progress, desc=f"{split} ({len(ds)} images)",
    )
    elapsed = time.time() - t0
    print(f"{split}: {len(ds)} images in {elapsed:.1f} s ({elapsed / len(ds):.2f} s/image)")
    if args.predictions_dir:
        print(f"predictions: {args.predictions_dir}")
    if args.test:
        return 0
    results = metrics_dict(cms)
    print(format_table(results))
    print("  ".join(f"mIoU {k}: {v['miou']:.4f}" for k, v in results.items()))
    os.makedirs(args.log_path, exist_ok=True)
    path = os.path.join(args.log_path, f"{args.task_name}.metrics.json")
    write_json(path, results)
    print(f"metrics: {path}")
    return 0


def run_training(args, device, model, frozen) -> int:
    import numpy as np
    import torch
    from tensorboardX import SummaryWriter

    import helper
    from dataset.deep_globe import DeepGlobe
    from utils.checkpoint import atomic_save, save_state_dict
    from utils.errors import UserError

    train_ds = DeepGlobe(args.data_path, "train", args.size_g, args.size_p, args.n_class, train=True, seed=args.seed)
    val_ds = DeepGlobe(args.data_path, "crossvali", args.size_g, args.size_p, args.n_class)
    gen = torch.Generator()
    train_loader = make_loader(train_ds, args, device, shuffle=True, batch_size=args.batch_size, generator=gen)
    val_loader = make_loader(val_ds, args, device, shuffle=False, batch_size=args.batch_size)

    params = helper.configure_stage(model, args.mode)
    optimizer = helper.make_optimizer(params, args.lr)
    last_path = checkpoint_path(args, f"{args.task_name}.pth")
    best_path = checkpoint_path(args, f"{args.task_name}.best.pth")
    resume_path = checkpoint_path(args, f"{args.task_name}.resume.pth")
    start_epoch, best = 0, -1.0
    if args.resume:
        if not os.path.isfile(resume_path):
            raise UserError(f"--resume: no resume file {resume_path}; start the run without --resume")
        state = torch.load(resume_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best = state["epoch"], state["best"]
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])
        print(f"resumed from {resume_path}: {start_epoch} of {args.num_epochs} epochs done, best mIoU {best:.4f}")

    main_output = helper.MAIN_OUTPUT[args.mode]
    writer = SummaryWriter(os.path.join(args.log_path, args.task_name))
    log_file = open(os.path.join(args.log_path, f"{args.task_name}.log"), "a")
    iters = len(train_loader)

    def on_iteration(i, lr, loss):
        step = epoch * iters + i
        writer.add_scalar("train/loss", loss, step)
        writer.add_scalar("train/lr", lr, step)

    try:
        for epoch in range(start_epoch, args.num_epochs):
            gen.manual_seed(args.seed * 1000003 + epoch)
            train_ds.set_epoch(epoch)
            t0 = time.time()
            stats = helper.train_one_epoch(
                model, train_loader, optimizer, args.mode, epoch, args.num_epochs, args.lr, device, args.n_class,
                args.size_p, args.sub_batch_size, args.lamb_fmreg, frozen, progress=not args.no_progress,
                on_iteration=on_iteration,
            )
            cms, example = helper.evaluate(
                model, val_loader, args.mode, device, args.n_class, args.size_p, args.sub_batch_size, frozen,
                progress=not args.no_progress, desc="validation",
            )
            val = {k: cm.miou() for k, cm in cms.items()}
            score = val[main_output]
            save_state_dict(model, last_path)
            if score > best:
                best = score
                save_state_dict(model, best_path)
            atomic_save(
                {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                    "best": best, "args": vars(args),
                    "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
                },
                resume_path,
            )
            for k, v in stats.items():
                if k.startswith("miou_"):
                    writer.add_scalar(f"train/mIoU_{k[5:]}", v, epoch + 1)
            for k, v in val.items():
                writer.add_scalar(f"val/mIoU_{k}", v, epoch + 1)
            if example is not None:
                writer.add_image("val/image_label_predictions", helper.example_grid(example), epoch + 1)
            line = (
                f"epoch {epoch + 1}/{args.num_epochs} loss {stats['loss']:.4f} "
                + " ".join(f"train_{k[5:]} {v:.4f}" for k, v in stats.items() if k.startswith("miou_"))
                + " " + " ".join(f"val_{k} {v:.4f}" for k, v in val.items())
                + f" best {best:.4f} time {time.time() - t0:.1f}s"
            )
            print(line, flush=True)
            log_file.write(line + "\n")
            log_file.flush()
            writer.flush()
    except helper.NonFiniteLoss as e:
        raise UserError(f"{e}; training stopped, the last good checkpoint is {last_path}") from e
    finally:
        log_file.close()
        writer.close()
    print(f"checkpoints: {last_path} (last), {best_path} (best val mIoU {best:.4f})")
    print(f"TensorBoard: tensorboard --logdir {args.log_path}")
    return 0


def main(args: argparse.Namespace) -> int:
    import torch

    from utils.errors import UserError

    args = resolve_args(args)
    device = get_device(args.device)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if not os.path.isdir(args.data_path):
        raise UserError(f"--data_path {args.data_path} does not exist (expected train/, crossvali/ inside)")
    for folder in (args.log_path,) + (() if args.evaluation else (args.model_path,)):
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create {folder}: {e.strerror}") from e
        if not os.access(folder, os.W_OK):
            raise UserError(f"{folder} is not writable; choose another --model_path/--log_path")
    settings = dict(vars(args), device=str(device))
    print("arguments: " + " ".join(f"{k}={v}" for k, v in settings.items()))
    kind = "evaluation" if args.evaluation else "train"
    write_json(os.path.join(args.log_path, f"{args.task_name}.{kind}.args.json"), settings)
    model, frozen = build_models(args, device)
    if args.evaluation:
        return run_evaluation(args, device, model, frozen)
    return run_training(args, device, model, frozen)


def cli(argv=None) -> int:
    args = get_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            return main(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from utils.errors import UserError

        if args.debug:
            traceback.print_exc()
        if isinstance(e, UserError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        if not args.debug:
            print(f"error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(cli())
