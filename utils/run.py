"""The life of a training run: its files, the resume file (model, optimizer, epoch, best
score, RNG and fp16 GradScaler states, arguments), graceful stops on SIGINT/SIGTERM, the
checkpoints written after every epoch, and the logs (TensorBoard, text, JSON arguments).

Every file is written atomically (utils.io): a crash at any moment leaves the previous
version readable, and the resume file is written last, so that once it is there the epoch
is done.
"""
from __future__ import annotations

import os
import random
import shlex
import signal
import sys
import threading

import numpy as np
import torch

from utils import checkpoint
from utils.checkpoint import atomic_save
from utils.dist import SINGLE, Processes, any_true
from utils.errors import UserError
from utils.io import atomic_copy, remove_stale_temps

# --resume takes these from the interrupted run unless given again; ESSENTIAL_ARGS shape the
# model, the data or the batches, so a different value cannot continue that run.
ESSENTIAL_ARGS = ("mode", "size_p", "size_g", "n_class", "batch_size", "dataset", "global_view", "crop_foreground")
RESUMED_ARGS = ESSENTIAL_ARGS + (
    "sub_batch_size", "lamb_fmreg", "num_epochs", "lr", "seed", "data_path", "path_g", "path_g2l", "path_l2g",
    "path_local", "backbone_weights", "classes",
)
RESUME_KEYS = {"model", "optimizer", "epoch", "best", "args"}


class RunFiles:
    """Where a run's files go: <model_path>/<task>.pth (last epoch), .best.pth, .resume.pth,
    and <log_path>/<task>/ (TensorBoard), <task>.log, <task>.<kind>.args.json, per scored
    split <task>.<split>.metrics.json and, coarse-to-fine, <task>.<split>.boxes.json."""

    def __init__(self, model_path: str, log_path: str, task_name: str) -> None:
        self.model_path, self.log_path, self.task = model_path, log_path, task_name
        self.last = os.path.join(model_path, f"{task_name}.pth")
        self.best = os.path.join(model_path, f"{task_name}.best.pth")
        self.resume = os.path.join(model_path, f"{task_name}.resume.pth")
        self.tensorboard = os.path.join(log_path, task_name)
        self.log = os.path.join(log_path, f"{task_name}.log")

    @classmethod
    def of(cls, args) -> "RunFiles":
        return cls(args.model_path, args.log_path, args.task_name)

    def metrics(self, split: str) -> str:
        return os.path.join(self.log_path, f"{self.task}.{split}.metrics.json")

    def boxes(self, split: str) -> str:
        """Coarse-to-fine evaluation: the box of each image of the split."""
        return os.path.join(self.log_path, f"{self.task}.{split}.boxes.json")

    def args_json(self, kind: str) -> str:
        return os.path.join(self.log_path, f"{self.task}.{kind}.args.json")

    def remove_stale_temps(self) -> list[str]:
        """Temporary files that an interrupted write of a checkpoint left behind."""
        return [name for path in (self.last, self.best, self.resume) for name in remove_stale_temps(path)]


# ----------------------------------------------------------------------------- RNG state

def rng_state() -> dict:
    """Python, numpy and torch generator states, as tensors and plain values so that the
    resume file loads with weights_only=True."""
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
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in internal.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- resume file

def load_resume_state(path: str) -> dict:
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
    if not isinstance(state, dict) or not RESUME_KEYS <= state.keys():
        raise UserError(f"--resume: {path} is not a resume file of train_deep_globe.py; start the run without --resume")
    return state


def restore_args(args, saved: dict, explicit: set[str] | None, path: str) -> None:
    """Take the interrupted run's settings for the flags not given again; a given flag that
    changes an essential setting is an error, another changed one a note."""
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


def resume_command(script: str, argv: list[str] | None) -> str:
    """The command that continues this run: the same arguments plus --resume."""
    argv = list(sys.argv[1:] if argv is None else argv)
    script = os.path.abspath(script)
    rel = os.path.relpath(script)
    script = script if rel.startswith("..") else rel
    return shlex.join(["python", script, *[a for a in argv if a != "--resume"], "--resume"])


def save_epoch(files: RunFiles, args, model, optimizer, epoch: int, score: float, best: float, scaler=None,
               processes: int = 1) -> float:
    """<task>.pth, .best.pth when `score` beats `best`, then .resume.pth, each atomically.
    The resume file goes last: once it is written, the epoch is done. Returns the new best.
    `processes`: how many trained the run (torchrun), kept in the resume file. (Nine
    parameters: the resume file holds all of them; a dataclass would only rename them.)"""
    checkpoint.save_state_dict(model, files.last)
    if score > best:
        best = score
        atomic_copy(files.last, files.best)
    state = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1, "best": best,
        "args": vars(args), "rng": rng_state(), "scaler": scaler.state_dict() if scaler is not None else None,
        "processes": processes,
    }
    atomic_save(state, files.resume)
    return best


def restore_training(model, optimizer, state: dict, path: str, scaler=None) -> tuple[int, float]:
    """Model, optimizer, RNG (and fp16 GradScaler) states from a resume file; returns
    (epochs done, best score)."""
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


def first_nonfinite(model) -> str | None:
    """Name of the first parameter or buffer of `model` with a NaN or infinite value."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            return name
    return None


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


def worker_init(_worker_id: int) -> None:
    """Loader workers leave Ctrl-C (sent to the whole process group) to the main process,
    which finishes the iteration with their batches. SIGTERM keeps its default: torch and
    multiprocessing use it to end workers that do not stop by themselves."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ----------------------------------------------------------------------------- logs

class RunLog:
    """TensorBoard scalars and images and one text line per epoch (written by the main
    process only); where the run is, for the message of an interruption (`position`); and
    the stop check at iteration and epoch boundaries, which is collective under torchrun
    (every process stops at the same boundary when any of them got the signal)."""

    def __init__(self, files: RunFiles, num_epochs: int, iters: int, stop: GracefulStop | None = None,
                 procs: Processes = SINGLE, device: torch.device | None = None) -> None:
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(files.tensorboard) if procs.main else None
        self.text = open(files.log, "a") if procs.main else None
        self.num_epochs, self.iters, self.stop = num_epochs, iters, stop
        self.procs, self.device = procs, device or torch.device("cpu")
        self.epoch, self.position = 0, "before training"

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, f"in iteration 1 of {self.iters}"

    def iteration(self, i: int, lr: float, loss: float) -> None:
        """train_one_epoch's on_iteration: loss and lr per iteration, then stop if asked."""
        t = self.epoch * self.iters + i
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, t)
            self.writer.add_scalar("train/lr", lr, t)
        self.position = f"after iteration {i + 1} of {self.iters}"
        self.check()

    def check(self) -> None:
        """Raise Interrupted if this process (or, under torchrun, any process) got SIGINT/SIGTERM."""
        if self.stop is None:
            return
        if any_true(self.procs, self.stop.signum is not None, self.device):
            raise Interrupted(self.stop.signum or signal.SIGTERM)

    def note(self, line: str) -> None:
        if self.text is not None:
            self.text.write(line + "\n")
            self.text.flush()

    def epoch_end(self, stats: dict, val: dict, best: float, image, seconds: float) -> None:
        """The epoch's line (text log and stdout), its train/val mIoUs and an example image."""
        epoch = self.epoch + 1
        if self.writer is None:
            return
        line = (
            f"epoch {epoch}/{self.num_epochs} loss {stats['loss']:.4f} "
            + " ".join(f"train_{k[5:]} {v:.4f}" for k, v in stats.items() if k.startswith("miou_"))
            + " " + " ".join(f"val_{k} {v:.4f}" for k, v in val.items())
            + f" best {best:.4f} time {seconds:.1f}s"
        )
        self.note(line)
        print(line, flush=True)
        for k, v in stats.items():
            if k.startswith("miou_"):
                self.writer.add_scalar(f"train/mIoU_{k[5:]}", v, epoch)
        for k, v in val.items():
            self.writer.add_scalar(f"val/mIoU_{k}", v, epoch)
        if image is not None:
            self.writer.add_image("val/image_label_predictions", image, epoch)
        self.writer.flush()

    def close(self) -> None:
        if self.text is not None:
            self.text.close()
            self.writer.close()
