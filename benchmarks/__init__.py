"""Shared pieces of the benchmark scripts: machine description, memory readings, result files.

Memory figures are in MiB. On Linux `ru_maxrss` is in KiB and is the peak of the whole process
life (model build and warm-up included); `VmHWM` is the same peak, but it can be reset
(`/proc/self/clear_refs`), which gives the peak of the timed part alone.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import threading
import time
from typing import Any, Iterable, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, "benchmarks", "results")
PRECISIONS = ("fp32", "bf16", "fp16")


# ----------------------------------------------------------------------------- arguments

def parse_size(text: str) -> tuple[int, int]:
    """'2448' -> (2448, 2448); '1224x2448' -> (1224, 2448) as (H, W)."""
    import argparse

    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"bad image size {text!r}: use N (square) or HxW, e.g. 2448 or 1224x2448")
    return parts[0], parts[1]


def check_sizes(p, args, at_least_one: Sequence[str]) -> None:
    """The checks both scripts share: size_g/size_p positive multiples of 4, counts >= 1."""
    for name in ("size_g", "size_p"):
        v = getattr(args, name)
        if v <= 0 or v % 4:
            p.error(f"--{name} must be a positive multiple of 4, got {v}")
    for name in at_least_one:
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")


def command_line() -> str:
    return shlex.join([os.path.basename(sys.executable)] + sys.argv)


# ----------------------------------------------------------------------------- machine

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_revision() -> str | None:
    """Short commit of the repository, with '+dirty' when tracked files differ from it."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=REPO, capture_output=True, timeout=10)
        return rev.stdout.strip() + ("+dirty" if dirty.returncode == 1 else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device) -> dict[str, Any]:
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": cpu_model(),
        "git": git_revision(),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- memory

def _kib_to_mib(kib: float) -> float:
    return round(kib / 1024, 1)


def peak_rss_mib(who: int = resource.RUSAGE_SELF) -> float:
    """ru_maxrss (KiB on Linux) in MiB: the lifetime peak of this process (or, for
    RUSAGE_CHILDREN, of the largest waited-for child)."""
    return _kib_to_mib(resource.getrusage(who).ru_maxrss)


def _status_kib(field: str, pid: int | str = "self") -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def current_rss_mib() -> float | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else _kib_to_mib(kib)


def hwm_mib() -> float | None:
    """Peak RSS since the process start or the last `reset_peak_rss()` (VmHWM)."""
    kib = _status_kib("VmHWM")
    return None if kib is None else _kib_to_mib(kib)


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _pss_bytes(pid: int) -> int | None:
    """Proportional set size (shared pages split between their users), or None."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return None


def process_tree_memory_mib(root: int) -> float:
    """Memory of `root` and all its descendants (e.g. DataLoader workers): the sum of their
    proportional set sizes, so that pages a forked worker shares with its parent count once.
    Where smaps_rollup cannot be read, the RSS is summed instead (an upper bound)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(name))
    page = os.sysconf("SC_PAGE_SIZE")
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        pss = _pss_bytes(pid)
        if pss is not None:
            total += pss
            continue
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
    return round(total / 2**20, 1)


def cuda_memory(device) -> dict[str, float | None]:
    """Peak CUDA memory since the last reset_peak_memory_stats, in MiB (None on the CPU)."""
    if device.type != "cuda":
        return {"cuda_max_allocated_mib": None, "cuda_max_reserved_mib": None}
    import torch

    return {
        "cuda_max_allocated_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
        "cuda_max_reserved_mib": round(torch.cuda.max_memory_reserved(device) / 2**20, 1),
    }


# ----------------------------------------------------------------------------- running

def setup_torch(device_name: str | None, threads: int | None):
    """The torch device (cuda when available by default) with `threads` intra-op threads."""
    import torch

    if threads is not None:
        if threads < 1:
            sys.exit(f"error: --threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        device = torch.device(device_name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        sys.exit(f"error: --device {device_name!r} is not a torch device ({e})")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit(f"error: --device {device_name} asked for, but CUDA is not available here; use --device cpu")
        if device.index is not None:
            if device.index >= torch.cuda.device_count():
                sys.exit(f"error: --device {device_name}: only {torch.cuda.device_count()} CUDA device(s) here")
            torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # as train_deep_globe.main
    return device


def autocast(device, precision: str):
    """The runs' own autocast (utils.amp.autocast, as --amp) for a benchmark's --precision."""
    from utils.amp import autocast as amp_autocast

    return amp_autocast(device, None if precision == "fp32" else precision)


def synchronize(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def build_glnet(n_class: int, mode: int, device, channels_last: bool = False, training: bool = False):
    """Deterministic random-init models of a stage, built by the project's builder
    (models.build.random_models, seed 0): (model, frozen), frozen None but in mode 3. For
    evaluation (training=False) a stage evaluated with the plain global network gets just that."""
    import torch

    from helper import STAGES
    from models.build import random_models

    model, frozen = random_models(n_class, STAGES[mode], torch.device(device), evaluation=not training)
    if channels_last:
        for m in (model, frozen):
            if m is not None:
                m.to(memory_format=torch.channels_last)
    return model, frozen


# ----------------------------------------------------------------------------- output

def append_jsonl(path: str, record: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=False) + "\n")


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def format_table(rows: Sequence[dict[str, Any]], columns: Iterable[tuple[str, str]]) -> str:
    """Plain-text table: `columns` = (header, key) pairs."""
    columns = list(columns)
    cells = [[h for h, _ in columns]] + [[_cell(r.get(k)) for _, k in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def stats(values: Sequence[float]) -> dict[str, float | None]:
    """mean / median / min / max of per-item seconds (None when empty)."""
    if not values:
        return {"mean": None, "median": None, "min": None, "max": None}
    s = sorted(values)
    n = len(s)
    median = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    return {"mean": sum(s) / n, "median": median, "min": s[0], "max": s[-1]}


# ----------------------------------------------------------------------------- timing a child process

def save_checkpoints(args, model_path: str) -> list[str]:
    """Save the random models as the evaluation's checkpoints; returns their command-line
    arguments."""
    import torch

    from helper import STAGES
    from utils.checkpoint import save_state_dict

    stage = STAGES[args.mode]
    model, frozen = build_glnet(args.n_class, args.mode, torch.device("cpu"))
    save_state_dict(model, os.path.join(model_path, f"{stage.eval_from}.pth"))
    ckpt = [f"--{stage.eval_from}", f"{stage.eval_from}.pth"]
    if stage.frozen_from:
        save_state_dict(frozen, os.path.join(model_path, f"{stage.frozen_from}.pth"))
        ckpt += [f"--{stage.frozen_from}", f"{stage.frozen_from}.pth"]
    return ckpt


def child_env(threads: int | None) -> dict[str, str]:
    """This process's environment, with --threads as the child's OpenMP / MKL thread count."""
    env = dict(os.environ)
    if threads is not None:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
    return env


class TreeMemorySampler(threading.Thread):
    """Background thread: the peak of process_tree_memory_mib(pid), sampled every second
    (reading smaps_rollup often slows the measured process) until stop()."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak = pid, 0.0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, process_tree_memory_mib(self.pid))
            self._stop_event.wait(1.0)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def time_child(cmd: list[str], env: dict[str, str]):
    """Run cmd, passing its output through; returns (wall seconds, its output lines, its
    resource usage, the peak memory of its process tree). Exits if it fails."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = TreeMemorySampler(proc.pid)
    sampler.start()
    lines = []
    for line in proc.stdout:
        lines.append(line)
        print("  | " + line.rstrip(), flush=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    sampler.stop()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"error: the evaluation exited with {proc.returncode}")
    return wall, lines, usage, sampler.peak
