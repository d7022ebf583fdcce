"""Train or evaluate GLNet on DeepGlobe: one entry point for the three modes.

    python train_deep_globe.py --mode 1 --task_name fpn_deepglobe_global --data_path data/deep_globe
    python train_deep_globe.py --mode 2 ... --path_g fpn_deepglobe_global.pth
    python train_deep_globe.py --mode 3 ... --path_g ... --path_g2l fpn_deepglobe_global2local.pth
    python train_deep_globe.py --mode local ...   (the local-only baseline; --mode takes numbers or names)
    add --evaluation (and --path_l2g for mode 3) to evaluate data_path/crossvali.

Checkpoint names (--path_*) are joined to --model_path, as in the original.
Every epoch writes <task_name>.pth, .best.pth and .resume.pth atomically; an interrupted run
(Ctrl-C, SIGTERM, a crash, kill -9) continues with the same command plus --resume.

This file is the command line only: flags, their checks and the wiring. What each mode does
is helper.STAGES; the runs are engine.py; models are built by models/build.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import random
import sys

from cli import HelpFormatter, ensure_writable_dir, get_device, mode_help, stage_mode
from utils.errors import UserError, run_command


def _stages() -> dict:
    from helper import STAGES

    return STAGES


def _per_mode(field: str) -> str:
    """A stage default for the help text: '120 for modes 1 and 3, 50 for mode 2'."""
    by_value: dict = {}
    for s in _stages().values():
        by_value.setdefault(getattr(s, field), []).append(str(s.mode))
    parts = []
    for value, modes in by_value.items():
        which = f"modes {', '.join(modes[:-1])} and {modes[-1]}" if len(modes) > 1 else f"mode {modes[0]}"
        parts.append(f"{value:g} for {which}" if isinstance(value, float) else f"{value} for {which}")
    return ", ".join(parts)


def get_parser() -> argparse.ArgumentParser:
    from dataset.presets import add_dataset_args, preset_help as ph

    p = argparse.ArgumentParser(
        description="GLNet on DeepGlobe (or --dataset inria, isic, urur, folder): --mode 1 global, 2 global2local, "
                    "3 local2global, 4 local (the local-only baseline).",
        formatter_class=HelpFormatter,
    )
    a = p.add_argument
    # The original's flags, same meaning; the defaults of those marked 'from --dataset' are the preset's.
    a("--n_class", type=int, default=None, help=f"number of classes {ph('n_class')}")
    a("--data_path", type=str, default=None, help=f"folder with train/, crossvali/ (and test/) {ph('data_path')}")
    a("--model_path", type=str, default="./saved_models/", help="folder for checkpoints; --path_* are relative to it")
    a("--log_path", type=str, default="./runs/", help="folder for TensorBoard logs, text logs and metrics")
    a("--task_name", type=str, default=None, help=f"run name: <model_path>/<task_name>.pth, <log_path>/<task_name>/ (default: {_per_mode('task_name')}; fpn_<dataset>_... for the other --dataset presets)")
    a("--mode", type=stage_mode, default=1, metavar="MODE", help=mode_help())
    a("--evaluation", action="store_true", help="evaluate on data_path/crossvali instead of training")
    a("--batch_size", type=int, default=None, help=f"images per optimizer step (per process under torchrun) {ph('batch_size')}")
    a("--sub_batch_size", type=int, default=None, help=f"patches per forward pass {ph('sub_batch_size')}")
    a("--size_g", type=int, default=None, help=f"side of the downsampled global image {ph('size_g')}")
    a("--size_p", type=int, default=None, help=f"side of the full-resolution patches {ph('size_p')}")
    a("--global_view", choices=("square", "aspect"), default="square", help="global view: square = squashed to size_g x size_g (the original); aspect = long side size_g, aspect ratio kept (needs --batch_size 1)")
    a("--crop_foreground", action="store_true", help="coarse-to-fine training (docs/MODEL.md section 9): each training and validation image and its label are cut to the box of the label's foreground (every class but 0; ignored pixels are not foreground), relaxed to about twice the foreground and at least one patch; an image without foreground is kept whole. With --evaluation: the split's images cut alike (scores on label boxes, not the paper's coarse-to-fine inference)")
    a("--path_g", type=str, default=None, help=f"global checkpoint (modes 2, 3; mode 1 evaluation) {ph('path_g')}")
    a("--path_g2l", type=str, default=None, help=f"global2local checkpoint (mode 3 training; mode 2 evaluation) {ph('path_g2l')}")
    a("--path_l2g", type=str, default=None, help=f"local2global checkpoint (mode 3 evaluation) {ph('path_l2g')}")
    a("--path_local", type=str, default=None, help=f"local-only checkpoint (--mode local evaluation) {ph('path_local')}")
    add_dataset_args(p)
    a("--lamb_fmreg", type=float, default=0.15, help="weight of the feature-map MSE regularisation (mode 2)")
    # New flags.
    a("--num_epochs", type=int, default=None, help=f"epochs (default: {_per_mode('epochs')})")
    a("--lr", type=float, default=None, help=f"base learning rate (default: {_per_mode('lr')})")
    a("--device", type=str, default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available)")
    a("--num_workers", type=int, default=2, help="data loading worker processes")
    a("--seed", type=int, default=0, help="seed for init, shuffling and augmentation")
    a("--predictions_dir", type=str, default=None, help="write <id>_mask.png colour predictions here (evaluation, --test)")
    a("--split", choices=("crossvali", "test", "train"), default="crossvali", help="the split --evaluation predicts, and scores when it has a Label/ folder (the paper's figures are on test)")
    a("--test", action="store_true", help="predict data_path/test into --predictions_dir without scoring it (as --evaluation --split test on unlabelled data)")
    a("--tta", action="store_true", help="test-time augmentation: sum scores over the 8 flips/rotations")
    a("--coarse_to_fine", action="store_true", help="evaluation: the coarse-to-fine GLNet (docs/MODEL.md section 9): "
      "the --path_coarse model's foreground box, the --mode's checkpoints on the box's crop, class 0 outside it; "
      "the boxes go to <log_path>/<task_name>.<split>.boxes.json")
    a("--path_coarse", type=str, default=None, help="with --coarse_to_fine: the mode-1 checkpoint (trained on whole "
      "images) that finds the foreground box")
    a("--backbone_weights", type=str, default="imagenet", help="ResNet-50 init for training: imagenet, none, or a state-dict file")
    a("--resume", action="store_true", help="continue an interrupted training run from <model_path>/<task_name>.resume.pth")
    a("--no_progress", action="store_true", help="no progress bars")
    a("--amp", choices=("bf16", "fp16"), default=None, help="mixed precision (autocast; fp16 training adds a GradScaler); default fp32, as the original")
    a("--compile", action="store_true", help="torch.compile the ResNets and the global FPN (slow first iterations; checkpoint keys unchanged)")
    a("--keep_patch_maps", type=int, default=1, help="mode-3 training: images of a batch whose per-patch local maps (ps3, 33 MB per 508 px patch) stay in memory; the local branch runs again for the others (--batch_size: keep all, as the original: faster, memory grows with the batch)")
    a("--sync_bn", action="store_true", help="under torchrun: BatchNorm statistics of the trained parts over all processes' batches (SyncBatchNorm; modes whose batch is one forward)")
    a("--dist_timeout", type=float, default=600, help="under torchrun: seconds a process waits for the others before it gives up (one of them died)")
    a("--debug", action="store_true", help="show tracebacks for errors")
    return p


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the per-mode defaults and check the flags (UserError on a bad value)."""
    from dataset.presets import apply_preset
    from helper import STAGES

    stage = STAGES[apply_preset(args).mode]
    args.num_epochs = stage.epochs if args.num_epochs is None else args.num_epochs
    args.lr = stage.lr if args.lr is None else args.lr
    args.task_name = args.task_name or stage.task_name
    if args.test:
        args.evaluation, args.split = True, "test"
        if not args.predictions_dir:
            raise UserError("--test needs --predictions_dir DIR to write the predictions to")
    if args.split != "crossvali" and not args.evaluation:
        raise UserError("--split chooses what --evaluation predicts; training reads train/ and validates on crossvali/")
    if args.crop_foreground and args.evaluation and (args.test or args.predictions_dir):
        raise UserError("--crop_foreground cuts images to their label's foreground box: it scores a labelled split "
                        "and writes no predictions (they would be of the boxes); leave out --crop_foreground or "
                        f"{'--test' if args.test else '--predictions_dir'}")
    if args.resume and args.evaluation:
        raise UserError("--resume continues a training run; leave it out with --evaluation/--test")
    if (args.coarse_to_fine or args.path_coarse) and not args.evaluation:
        flag = "--coarse_to_fine" if args.coarse_to_fine else "--path_coarse"
        raise UserError(f"{flag} predicts with --evaluation/--test (or predict.py); leave it out for training")
    if args.coarse_to_fine and args.crop_foreground:
        raise UserError("--crop_foreground (boxes of the labels) and --coarse_to_fine (boxes of the coarse model's "
                        "prediction) exclude each other; leave one out")
    for name in ("size_g", "size_p"):
        v = getattr(args, name)
        if v <= 0 or v % 4:
            raise UserError(f"--{name} must be a positive multiple of 4 (the FPN output is 1/4 of the input), got {v}")
    if not args.evaluation and getattr(args, stage.trained_input) <= 32:
        raise UserError(
            f"--{stage.trained_input} must be more than 32 to train mode {args.mode}: at 32 px the ResNet's last stage "
            f"is 1x1, and BatchNorm cannot train on a batch holding a single image or patch"
        )
    for name in ("batch_size", "sub_batch_size", "n_class", "num_epochs", "keep_patch_maps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.n_class > 255:
        raise UserError(f"--n_class must be at most 255 (labels are 8-bit, 255 = ignore), got {args.n_class}")
    if args.num_workers < 0:
        raise UserError(f"--num_workers must be >= 0, got {args.num_workers}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise UserError(f"--lr must be a positive number, got {args.lr}")
    if args.sync_bn and not stage.one_forward_per_batch:
        raise UserError(f"--sync_bn: mode {args.mode} runs a forward per sub-batch of patches, whose count differs "
                        "between processes (image sizes), so synchronised BatchNorm could wait forever; leave it out")
    return args


def load_datasets(args) -> dict:
    """The splits this run reads, checked (layout, pairs, headers) before any model is built."""
    from dataset.deep_globe import DeepGlobe
    from dataset.presets import dataset_kwargs

    if args.evaluation:
        labels = not args.test and DeepGlobe.has_labels(args.data_path, args.split)
        if not labels and not args.test:
            if not args.predictions_dir:
                raise UserError(
                    f"--split {args.split}: {args.data_path} has no {args.split}/Label/ folder, so there is nothing "
                    "to score; give --predictions_dir DIR to write predictions"
                )
            print(f"note: {args.split}/ has no Label/ folder: predictions only, nothing is scored", file=sys.stderr)
        splits = {args.split: dict(labels=labels)}
    else:
        splits = {"train": dict(train=True, seed=args.seed), "crossvali": {}}
    datasets = {}
    for split, kw in splits.items():
        ds = DeepGlobe.open(args.data_path, split, args.size_g, args.size_p, args.n_class, **dataset_kwargs(args), **kw)
        ds.check_files()
        datasets[split] = ds
    return datasets


def main(args: argparse.Namespace, explicit: set[str] | None = None, argv: list[str] | None = None) -> int:
    """Run what `args` asks for. `explicit`: the flags given on the command line (for --resume,
    the others come from the interrupted run; None: all count as given); `argv`: the
    arguments, for the resume hint. Under torchrun, this process joins the others first."""
    from utils import dist

    args = resolve_args(args)
    procs = dist.Processes.from_env()
    device = dist.start(procs, get_device(args.device), args.dist_timeout)
    try:
        return _run(args, explicit, argv, procs, device)
    finally:
        dist.stop(procs)


def _run(args, explicit, argv, procs, device) -> int:
    """main() once the process group (if any) is up."""
    import torch

    import engine
    import helper
    import inference
    from models import build
    from utils import run
    from utils.io import write_json

    files = run.RunFiles.of(args)
    state = None
    if args.resume:
        state = run.load_resume_state(files.resume)
        run.restore_args(args, state["args"], explicit, files.resume)
    stage = helper.STAGES[args.mode]
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    datasets = load_datasets(args)
    ensure_writable_dir(args.log_path, "--log_path")
    if not args.evaluation:
        ensure_writable_dir(args.model_path, "--model_path")
    if args.predictions_dir:
        ensure_writable_dir(args.predictions_dir, "--predictions_dir")
    build.check_checkpoints_exist(args, stage, resuming=state is not None, stages=helper.STAGES.values())
    if args.evaluation:
        build.check_coarse(args)
    if not args.evaluation and state is None and stage.backbones:
        build.check_backbone_weights(args.backbone_weights)
    settings = dict(vars(args), device=str(device), processes=procs.world, global_batch_size=args.batch_size * procs.world)
    if procs.main:
        print("arguments: " + " ".join(f"{k}={v}" for k, v in settings.items()))
        write_json(files.args_json(f"evaluation.{args.split}" if args.evaluation else "train"), settings)
    model, frozen = build.build_models(args, stage, device, init=state is None, stages=helper.STAGES.values())
    if args.sync_bn and procs.active:
        if device.type != "cuda":  # torch's SyncBatchNorm refuses CPU tensors in training
            raise UserError("--sync_bn needs CUDA devices (SyncBatchNorm does not run on the CPU); leave it out")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    coarse = build.build_coarse(args, device) if args.evaluation and args.coarse_to_fine else None
    build.tune_for_device((model, frozen, coarse), device, args.compile)
    cfg = config_from_args(args, device)
    if not procs.main:
        cfg = dataclasses.replace(cfg, progress=False)
    if args.evaluation:
        c2f = None if coarse is None else inference.CoarseToFine(coarse, args.size_g, args.global_view)
        return engine.run_evaluation(args, cfg, model, frozen, next(iter(datasets.values())), procs, c2f)
    command = run.resume_command(__file__, argv)
    return engine.Trainer(args, cfg, model, frozen, datasets, command, procs).run(state)


def config_from_args(args, device):
    """What training and evaluation need to know of the run (helper.Config), from its flags."""
    import helper
    from dataset.presets import classes_from_args

    return helper.Config(
        helper.STAGES[args.mode], device, args.n_class, args.size_p, args.sub_batch_size, args.lamb_fmreg,
        args.num_epochs, args.lr, args.amp, args.tta, not args.no_progress, args.keep_patch_maps,
        classes_from_args(args),
    )


def explicit_flags(argv: list[str] | None) -> set[str]:
    """Destinations of the flags given in `argv` (a parser without defaults leaves out the rest)."""
    parser = get_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def cli(argv=None) -> int:
    # get_parser needs torch (the stage table, helper.STAGES): run_command reports it missing
    return run_command(get_parser, lambda args: main(args, explicit_flags(argv), argv), argv)


if __name__ == "__main__":
    sys.exit(cli())
