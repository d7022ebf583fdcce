"""Train or evaluate GLNet on DeepGlobe: one entry point for the three modes.

    python train_deep_globe.py --mode 1 --task_name fpn_deepglobe_global --data_path data/deep_globe
    python train_deep_globe.py --mode 2 ... --path_g fpn_deepglobe_global.pth
    python train_deep_globe.py --mode 3 ... --path_g ... --path_g2l fpn_deepglobe_global2local.pth
    add --evaluation (and --path_l2g for mode 3) to evaluate data_path/crossvali.

Checkpoint names (--path_*) are joined to --model_path, as in the original.
Every epoch writes <task_name>.pth, .best.pth and .resume.pth atomically; an interrupted run
(Ctrl-C, SIGTERM, a crash, kill -9) continues with the same command plus --resume.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import signal
import sys
import tempfile
import threading
import time
import traceback
import warnings

# Defaults that differ per mode (GLNET_SPEC.md section 6): epochs, learning rate.
MODE_DEFAULTS = {1: (120, 5e-5), 2: (50, 2e-5), 3: (120, 5e-5)}
# --resume takes these from the interrupted run unless given again; the first five shape the
# model, the data or the batches, so a different value cannot continue that run.
ESSENTIAL_ARGS = ("mode", "size_p", "size_g", "n_class", "batch_size")
RESUMED_ARGS = ESSENTIAL_ARGS + (
    "sub_batch_size", "lamb_fmreg", "num_epochs", "lr", "seed", "data_path", "path_g", "path_g2l", "path_l2g",
    "backbone_weights",
)
# The run that writes what each checkpoint flag should point to (GLNET_SPEC.md section 1).
CHECKPOINT_SOURCE = {"path_g": "--mode 1", "path_g2l": "--mode 2", "path_l2g": "--mode 3"}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default, except where the help already says what it is (defaults that
    depend on the mode) or there is none to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default:" in text or action.default is None:
            return text
        return super()._get_help_string(action)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="GLNet on DeepGlobe: --mode 1 global, 2 global2local, 3 local2global.",
        formatter_class=_HelpFormatter,
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
    a("--amp", choices=("bf16", "fp16"), default=None, help="mixed precision (autocast; fp16 training adds a GradScaler); default fp32, as the original")
    a("--compile", action="store_true", help="torch.compile the ResNets and the global FPN (slow first iterations; checkpoint keys unchanged)")
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
    if args.resume and args.evaluation:
        raise UserError("--resume continues a training run; leave it out with --evaluation/--test")
    for name in ("size_g", "size_p"):
        v = getattr(args, name)
        if v <= 0 or v % 4:
            raise UserError(f"--{name} must be a positive multiple of 4 (the FPN output is 1/4 of the input), got {v}")
    trained = "size_p" if args.mode == 2 else "size_g"
    if not args.evaluation and getattr(args, trained) <= 32:
        raise UserError(
            f"--{trained} must be more than 32 to train mode {args.mode}: at 32 px the ResNet's last stage "
            f"is 1x1, and BatchNorm cannot train on a batch holding a single image or patch"
        )
    for name in ("batch_size", "sub_batch_size", "n_class", "num_epochs"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.n_class > 255:
        raise UserError(f"--n_class must be at most 255 (labels are 8-bit, 255 = ignore), got {args.n_class}")
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


def resume_path(args) -> str:
    return checkpoint_path(args, f"{args.task_name}.resume.pth")


# ----------------------------------------------------------------------------- checks before the run

def checkpoints_needed(args, resuming: bool = False) -> list[str]:
    """The --path_* flags whose checkpoints this run loads (GLNET_SPEC.md section 1). A resumed
    run takes the trained model from its resume file and only needs mode 3's frozen global model."""
    mode, ev = args.mode, args.evaluation
    if resuming:
        return ["path_g"] if mode == 3 else []
    if mode == 1:
        return ["path_g"] if ev else []
    if mode == 2:
        return ["path_g2l"] if ev else ["path_g"]
    return ["path_l2g" if ev else "path_g2l", "path_g"]


def _checkpoint_hint(args, flag: str) -> str:
    return (
        f"--{flag} should name the checkpoint written by {CHECKPOINT_SOURCE[flag]} training "
        f"(--path_* are relative to --model_path {args.model_path})"
    )


def check_checkpoints_exist(args, resuming: bool) -> None:
    from utils.errors import UserError

    for flag in checkpoints_needed(args, resuming):
        path = checkpoint_path(args, getattr(args, flag))
        if not os.path.isfile(path):
            raise UserError(f"--{flag}: checkpoint not found: {path}; {_checkpoint_hint(args, flag)}")


def load_for_flag(model, args, flag: str, select, assign: bool = False) -> None:
    """load_checkpoint, with the flag and where the file should come from in the message."""
    from utils.checkpoint import load_checkpoint
    from utils.errors import UserError

    try:
        load_checkpoint(model, checkpoint_path(args, getattr(args, flag)), select, assign)
    except UserError as e:
        raise UserError(f"--{flag}: {e}; {_checkpoint_hint(args, flag)}") from e


def check_backbone_weights(args) -> None:
    from utils.errors import UserError

    source = args.backbone_weights
    if source and source.lower() == "imagenet":
        import importlib.util

        from models.resnet import NO_TORCHVISION

        if importlib.util.find_spec("torchvision") is None:
            raise UserError(NO_TORCHVISION)
    if source and source.lower() not in ("imagenet", "none", "random") and not os.path.isfile(source):
        raise UserError(f"--backbone_weights {source}: no such file; use imagenet, none, or a ResNet-50 state-dict file")


def ensure_writable_dir(folder: str, flag: str) -> None:
    """Create `folder` and write a probe file into it (os.access says yes to root even on a
    read-only file system)."""
    from utils.errors import UserError

    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"{flag} {folder} is not a writable folder ({e.strerror or e}); choose another {flag}") from e


def _header(path: str) -> tuple[tuple[int, int], int]:
    """(size, number of bands) from the file header, without decoding the pixels."""
    from PIL import Image, UnidentifiedImageError

    from utils.errors import UserError

    try:
        with Image.open(path) as im:
            return im.size, len(im.getbands())
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise UserError(f"cannot read {path}: corrupt or truncated image ({e}); re-download or remove it") from e


def check_split_files(ds) -> None:
    """Header-only look at every image and label of a split, so that a foreign file, a colour
    mask or a size mismatch stops the run at once rather than when the loader reaches it (for
    the validation split: after a whole training epoch). Truncated data and bad label values
    need a full decode; the loader reports those."""
    from dataset.deep_globe import MASK_SUFFIX, PREPARE_HINT, SAT_SUFFIX
    from utils.errors import UserError

    for id_ in ds.ids:
        size, _ = _header(os.path.join(ds.root, "Sat", id_ + SAT_SUFFIX))
        if not ds.labels:
            continue
        path = os.path.join(ds.root, "Label", id_ + MASK_SUFFIX)
        label_size, bands = _header(path)
        if bands >= 3:
            raise UserError(f"{path} is a {bands}-channel colour mask, not a class-index mask; {PREPARE_HINT}")
        if label_size != size:
            raise UserError(
                f"size mismatch: image {size[0]}x{size[1]} but label {label_size[0]}x{label_size[1]} in {path}"
            )


def load_datasets(args) -> dict:
    """The splits this run reads, checked (layout, pairs, headers) before any model is built."""
    from dataset.deep_globe import PREPARE_HINT, DeepGlobe, split_dir
    from utils.errors import UserError

    if not os.path.isdir(args.data_path):
        raise UserError(f"--data_path {args.data_path} does not exist (expected train/, crossvali/ inside); {PREPARE_HINT}")
    if args.test:
        splits = {"test": dict(labels=False)}
    elif args.evaluation:
        splits = {"crossvali": {}}
    else:
        splits = {"train": dict(train=True, seed=args.seed), "crossvali": {}}
    datasets = {}
    for split, kw in splits.items():
        if not os.path.isdir(split_dir(args.data_path, split)):
            label = "" if split == "test" else f" and {split}/Label/<id>_mask.png"
            raise UserError(
                f"--data_path {args.data_path} has no {split}/ folder (expected {split}/Sat/<id>_sat.jpg{label}); "
                + PREPARE_HINT
            )
        ds = DeepGlobe(args.data_path, split, args.size_g, args.size_p, args.n_class, **kw)
        check_split_files(ds)
        datasets[split] = ds
    return datasets


# ----------------------------------------------------------------------------- resume state

def rng_state() -> dict:
    """Python, numpy and torch generator states, as tensors and plain values so that the
    resume file loads with weights_only=True."""
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": (version, torch.tensor(internal, dtype=torch.int64), gauss),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in internal.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_resume_state(path: str) -> dict:
    import torch

    from utils.errors import UserError

    if not os.path.isfile(path):
        raise UserError(
            f"--resume: no resume file {path} (one is written after every completed epoch); "
            "check --model_path and --task_name, or start the run without --resume"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(
            f"--resume: cannot read {path} ({type(e).__name__}): it is damaged or not a resume file; "
            "start the run without --resume"
        ) from e
    if not isinstance(state, dict) or not {"model", "optimizer", "epoch", "best", "args"} <= state.keys():
        raise UserError(f"--resume: {path} is not a resume file of train_deep_globe.py; start the run without --resume")
    return state


def restore_args(args, saved: dict, explicit: set[str] | None, path: str) -> None:
    """Take the interrupted run's settings for the flags not given again; a given flag that
    changes an essential setting is an error, another changed one a note."""
    from utils.errors import UserError

    for name in RESUMED_ARGS:
        if name not in saved:
            continue
        old, new = saved[name], getattr(args, name)
        if explicit is not None and name not in explicit:
            setattr(args, name, old)
        elif new != old:
            if name in ESSENTIAL_ARGS:
                raise UserError(
                    f"--resume: --{name} {new} differs from the interrupted run ({name}={old}, saved in {path}); "
                    f"leave --{name} out to continue that run, or start a new one under another --task_name"
                )
            print(f"note: --{name} {new} replaces {old} of the interrupted run", file=sys.stderr)


def resume_command(argv: list[str] | None) -> str:
    """The command that continues this run: the same arguments plus --resume."""
    argv = list(sys.argv[1:] if argv is None else argv)
    script = os.path.abspath(__file__)
    rel = os.path.relpath(script)
    script = script if rel.startswith("..") else rel
    return shlex.join(["python", script, *[a for a in argv if a != "--resume"], "--resume"])


# ----------------------------------------------------------------------------- signals

class Interrupted(Exception):
    """SIGINT/SIGTERM during training; `code` is the exit code (128 + signal)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.name = signal.Signals(signum).name
        self.code = 128 + signum
        super().__init__(self.name)


class GracefulStop:
    """While active, SIGINT/SIGTERM only set a flag: training stops at the next iteration or
    epoch boundary, so nothing half-done is saved. A second signal stops at once (the
    checkpoint writes are atomic, so that is safe too)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict = {}

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():  # handlers only work there
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in reversed(self._old.items()):
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            self.signum = signum
            raise Interrupted(signum)
        self.signum = signum
        # A SIGTERM sent to the whole process group also kills the loader workers; torch's
        # SIGCHLD handler would then raise at whatever line runs. The loader still notices
        # dead workers when asked for the next batch, which only happens before the stop.
        self._old.setdefault(signal.SIGCHLD, signal.signal(signal.SIGCHLD, signal.SIG_DFL))
        # os.write, not print: the handler may run in the middle of a print (a progress bar)
        # to the same stream, and buffered streams refuse reentrant writes.
        msg = f"\n{signal.Signals(signum).name}: stopping after the current iteration (send it again to stop at once)\n"
        try:
            os.write(2, msg.encode())
        except OSError:
            pass

    def check(self) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)


def _worker_init(_worker_id: int) -> None:
    """Loader workers leave Ctrl-C (sent to the whole process group) to the main process,
    which finishes the iteration with their batches. SIGTERM keeps its default: torch and
    multiprocessing use it to end workers that do not stop by themselves."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ----------------------------------------------------------------------------- models and data

def build_models(args, device, init: bool = True):
    """The model (trained or evaluated) and, for mode 3, the frozen global model,
    loaded as GLNET_SPEC.md section 1 prescribes for each run. init=False skips the
    model's initial weights (a resumed run loads them from its resume file)."""
    import torch

    from models import GLNet
    from models.resnet import load_backbone_weights
    from utils.checkpoint import all_keys, global_keys
    from utils.errors import UserError

    def backbone(module) -> None:
        try:
            load_backbone_weights(module, args.backbone_weights)
        except UserError:
            raise
        except Exception as e:
            raise UserError(
                f"--backbone_weights {args.backbone_weights} is not a torchvision ResNet-50 state dict "
                f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:150]})"
            ) from e

    torch.manual_seed(args.seed)
    mode, ev = args.mode, args.evaluation
    if ev and init:
        # Evaluation: every weight comes from a checkpoint, so the models are built on
        # the meta device (no initialisation, no memory) and take the file's tensors
        # (memory-mapped from zip files) instead of copies. Mode 1 needs only the
        # plain global network.
        with torch.device("meta"):
            model = GLNet(args.n_class) if mode != 1 else GLNet(args.n_class, local=False, context=False)
        load_for_flag(model, args, {1: "path_g", 2: "path_g2l", 3: "path_l2g"}[mode], all_keys, assign=True)
    else:
        model = GLNet(args.n_class)
    if not init or ev:
        pass
    elif mode == 1:
        backbone(model.resnet_global)
        backbone(model.resnet_local)
    elif mode == 2:
        load_for_flag(model, args, "path_g", global_keys)
        backbone(model.resnet_local)
    else:
        load_for_flag(model, args, "path_g2l", all_keys)
    frozen = None
    if mode == 3:
        # only its plain global network is used (GLNET_SPEC.md section 5). Evaluation maps
        # it from the file; a training run (hours, days) holds its own copy, safe from
        # anything that rewrites the file in place meanwhile.
        if ev:
            with torch.device("meta"):
                frozen = GLNet(args.n_class, local=False, context=False)
        else:
            frozen = GLNet(args.n_class, local=False, context=False)
        load_for_flag(frozen, args, "path_g", global_keys, assign=ev)
        frozen.requires_grad_(False)
        frozen.to(device).eval()
    return model.to(device), frozen


def tune_for_device(models, device, compile_: bool = False, compile_backend: str = "inductor") -> None:
    """On CUDA, weights in channels_last (NHWC), the layout in which cuDNN's convolutions
    are fastest; with --compile, torch.compile the ResNets and the global FPN in place
    (`nn.Module.compile`, so state-dict keys and checkpoints stay as they are)."""
    import torch

    for m in models:
        if m is None:
            continue
        if device.type == "cuda":
            m.to(memory_format=torch.channels_last)
        if compile_:
            # Not fpn_local: its inputs carry the patch index (global crops, merge sinks),
            # which the compiler would specialise on, recompiling for every patch.
            for part in (m.resnet_global, m.resnet_local, m.fpn_global):
                if part is not None:
                    part.compile(backend=compile_backend)


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
        worker_init_fn=_worker_init if args.num_workers > 0 else None,
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


# ----------------------------------------------------------------------------- runs

def run_evaluation(args, device, model, frozen, ds) -> int:
    import helper

    split = "test" if args.test else "crossvali"
    loader = make_loader(ds, args, device, shuffle=False, batch_size=args.batch_size)
    t0 = time.time()
    cms, _ = helper.evaluate(
        model, loader, args.mode, device, args.n_class, args.size_p, args.sub_batch_size, frozen,
        tta=args.tta, predictions_dir=args.predictions_dir, with_labels=not args.test,
        progress=not args.no_progress, desc=f"{split} ({len(ds)} images)", amp=args.amp,
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
    path = os.path.join(args.log_path, f"{args.task_name}.metrics.json")
    write_json(path, results)
    print(f"metrics: {path}")
    return 0


def first_nonfinite(model) -> str | None:
    """Name of the first parameter or buffer of `model` with a NaN or infinite value."""
    import torch

    for name, t in model.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            return name
    return None


def restore_training(model, optimizer, state: dict, path: str, scaler=None) -> tuple[int, float]:
    """Model, optimizer, RNG (and fp16 GradScaler) states from a resume file; returns
    (epochs done, best score)."""
    from utils.errors import UserError

    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(
            f"--resume: {path} does not fit this model ({str(e).splitlines()[0][:150]}); start the run without --resume"
        ) from e
    if "rng" in state:
        set_rng_state(state["rng"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return int(state["epoch"]), float(state["best"])


def save_epoch(args, model, optimizer, epoch: int, score: float, best: float, scaler=None) -> float:
    """<task>.pth, .best.pth when `score` beats `best`, then .resume.pth, each atomically.
    The resume file goes last: once it is written, the epoch is done. Returns the new best."""
    from utils.checkpoint import atomic_copy, atomic_save, save_state_dict

    last_path = checkpoint_path(args, f"{args.task_name}.pth")
    save_state_dict(model, last_path)
    if score > best:
        best = score
        atomic_copy(last_path, checkpoint_path(args, f"{args.task_name}.best.pth"))
    state = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1, "best": best,
        "args": vars(args), "rng": rng_state(), "scaler": scaler.state_dict() if scaler is not None else None,
    }
    atomic_save(state, resume_path(args))
    return best


def log_epoch(writer, log_file, args, epoch: int, stats: dict, val: dict, best: float, example, seconds: float) -> None:
    line = (
        f"epoch {epoch + 1}/{args.num_epochs} loss {stats['loss']:.4f} "
        + " ".join(f"train_{k[5:]} {v:.4f}" for k, v in stats.items() if k.startswith("miou_"))
        + " " + " ".join(f"val_{k} {v:.4f}" for k, v in val.items())
        + f" best {best:.4f} time {seconds:.1f}s"
    )
    log_file.write(line + "\n")
    log_file.flush()
    print(line, flush=True)
    for k, v in stats.items():
        if k.startswith("miou_"):
            writer.add_scalar(f"train/mIoU_{k[5:]}", v, epoch + 1)
    for k, v in val.items():
        writer.add_scalar(f"val/mIoU_{k}", v, epoch + 1)
    if example is not None:
        import helper

        writer.add_image("val/image_label_predictions", helper.example_grid(example), epoch + 1)
    writer.flush()


def run_training(args, device, model, frozen, datasets, state: dict | None = None, command: str | None = None) -> int:
    """Train the remaining epochs; after each: validation, checkpoints (save_epoch), log line.
    SIGINT/SIGTERM stop at the next iteration or epoch boundary. Returns the exit code."""
    import torch
    from tensorboardX import SummaryWriter

    import helper
    from utils.checkpoint import remove_stale_temps
    from utils.errors import UserError

    train_ds, val_ds = datasets["train"], datasets["crossvali"]
    gen = torch.Generator()
    train_loader = make_loader(train_ds, args, device, shuffle=True, batch_size=args.batch_size, generator=gen)
    val_loader = make_loader(val_ds, args, device, shuffle=False, batch_size=args.batch_size)
    optimizer = helper.make_optimizer(helper.configure_stage(model, args.mode), args.lr)
    last_path, res_path = checkpoint_path(args, f"{args.task_name}.pth"), resume_path(args)
    for path in (last_path, checkpoint_path(args, f"{args.task_name}.best.pth"), res_path):
        for name in remove_stale_temps(path):
            print(f"removed {name}, left by an interrupted write")
    command = command or resume_command(None)
    # fp16 gradients can underflow: scale the loss (bf16 has float32's range and needs none)
    scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None
    start_epoch, best = 0, -1.0
    if state is not None:
        start_epoch, best = restore_training(model, optimizer, state, res_path, scaler)
        print(f"resumed from {res_path}: {start_epoch} of {args.num_epochs} epochs done, best mIoU {best:.4f}")
        if start_epoch >= args.num_epochs:
            print(f"nothing to do: all {args.num_epochs} epochs are done (a larger --num_epochs trains on)")
            return 0

    writer = SummaryWriter(os.path.join(args.log_path, args.task_name))
    log_file = open(os.path.join(args.log_path, f"{args.task_name}.log"), "a")
    if state is not None:
        log_file.write(f"resumed after epoch {start_epoch} from {res_path}\n")
    iters = len(train_loader)
    done = epoch = start_epoch  # done: epochs in the resume file
    position = f"in iteration 1 of {iters}"
    stop = GracefulStop()

    def on_iteration(i, lr, loss):
        nonlocal position
        writer.add_scalar("train/loss", loss, epoch * iters + i)
        writer.add_scalar("train/lr", lr, epoch * iters + i)
        position = f"after iteration {i + 1} of {iters}"
        stop.check()

    try:
        with stop:
            for epoch in range(start_epoch, args.num_epochs):
                position = f"in iteration 1 of {iters}"
                gen.manual_seed(args.seed * 1000003 + epoch)  # shuffling and augmentation depend on (seed, epoch) only
                train_ds.set_epoch(epoch)
                t0 = time.time()
                stats = helper.train_one_epoch(
                    model, train_loader, optimizer, args.mode, epoch, args.num_epochs, args.lr, device, args.n_class,
                    args.size_p, args.sub_batch_size, args.lamb_fmreg, frozen, progress=not args.no_progress,
                    on_iteration=on_iteration, amp=args.amp, scaler=scaler,
                )
                bad = first_nonfinite(model)
                if bad is not None:
                    raise helper.NonFiniteLoss(f"non-finite weights after epoch {epoch + 1} (first: {bad})")
                position = "during validation"
                cms, example = helper.evaluate(
                    model, val_loader, args.mode, device, args.n_class, args.size_p, args.sub_batch_size, frozen,
                    progress=not args.no_progress, desc="validation", amp=args.amp,
                )
                val = {k: cm.miou() for k, cm in cms.items()}
                position = "while saving"
                best = save_epoch(args, model, optimizer, epoch, val[helper.MAIN_OUTPUT[args.mode]], best, scaler)
                done = epoch + 1
                log_epoch(writer, log_file, args, epoch, stats, val, best, example, time.time() - t0)
                stop.check()  # a signal during validation or saving stops here, with this epoch saved
    except helper.NonFiniteLoss as e:
        if done:
            kept = f"the weights of the last good epoch ({done}) are in {last_path}; lower --lr and continue with: {command} --lr LR"
        else:
            kept = f"no epoch was saved; lower --lr (now {args.lr:g}) and start again"
        raise UserError(f"{e}: training stopped; {kept}") from e
    except Exception as e:
        if not isinstance(e, Interrupted):
            if stop.signum is None or isinstance(e, UserError):
                raise
            # e.g. a loader worker killed by the same SIGTERM (sent to the whole process group)
            e = Interrupted(stop.signum)
        where = f"epoch {epoch + 1}/{args.num_epochs}, {position}" if done <= epoch else f"after epoch {done}"
        if done:
            saved = f"epochs 1..{done} are saved in {res_path}; continue with:\n  {command}"
        else:
            saved = "no epoch was completed, so nothing was saved: run the same command again (without --resume)"
        print(f"interrupted by {e.name} ({where}); {saved}", file=sys.stderr, flush=True)
        return e.code
    finally:
        log_file.close()
        writer.close()
    print(f"checkpoints: {last_path} (last), {checkpoint_path(args, f'{args.task_name}.best.pth')} (best val mIoU {best:.4f})")
    print(f"TensorBoard: tensorboard --logdir {args.log_path}")
    return 0


def main(args: argparse.Namespace, explicit: set[str] | None = None, argv: list[str] | None = None) -> int:
    """Run what `args` asks for. `explicit`: the flags given on the command line (for --resume,
    the others come from the interrupted run; None: all count as given); `argv`: the
    arguments, for the resume hint."""
    import torch

    args = resolve_args(args)
    device = get_device(args.device)
    state = None
    if args.resume:
        state = load_resume_state(resume_path(args))
        restore_args(args, state["args"], explicit, resume_path(args))
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
    check_checkpoints_exist(args, resuming=state is not None)
    if not args.evaluation and state is None and args.mode in (1, 2):
        check_backbone_weights(args)
    settings = dict(vars(args), device=str(device))
    print("arguments: " + " ".join(f"{k}={v}" for k, v in settings.items()))
    kind = "evaluation" if args.evaluation else "train"
    write_json(os.path.join(args.log_path, f"{args.task_name}.{kind}.args.json"), settings)
    model, frozen = build_models(args, device, init=state is None)
    tune_for_device((model, frozen), device, args.compile)
    if args.evaluation:
        return run_evaluation(args, device, model, frozen, next(iter(datasets.values())))
    return run_training(args, device, model, frozen, datasets, state, resume_command(argv))


def explicit_flags(argv: list[str] | None) -> set[str]:
    """Destinations of the flags given in `argv` (a parser without defaults leaves out the rest)."""
    parser = get_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def error_message(e: BaseException) -> str:
    """The message of `e`; for an error re-raised from a DataLoader worker, the original
    message without the worker's traceback that torch puts in front of it."""
    msg = str(e)
    if "Original Traceback" in msg:
        marker = f"{type(e).__name__}: "
        tail = msg.rsplit(marker, 1)[-1] if marker in msg else msg.strip().splitlines()[-1]
        msg = tail.strip()
    return msg


def release_frames(e: BaseException) -> None:
    """Clear the locals of the finished frames an exception (and its causes) went through.
    An error re-raised from a DataLoader worker is in a reference cycle with those frames,
    which would keep the loader and its worker processes alive until a later garbage
    collection, which cannot shut them down cleanly (in-process callers, such as tests)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)
        e = e.__cause__ or e.__context__


def cli(argv=None) -> int:
    args = get_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            return main(args, explicit_flags(argv), argv)
    except KeyboardInterrupt as e:
        release_frames(e)
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from utils.errors import UserError

        if args.debug:
            traceback.print_exc()
        release_frames(e)
        if isinstance(e, UserError):
            print(f"error: {error_message(e)}", file=sys.stderr)
            return 2
        if not args.debug:
            print(f"error: {type(e).__name__}: {error_message(e)} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(cli())
