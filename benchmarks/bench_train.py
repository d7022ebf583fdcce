"""Training benchmark: seconds per iteration and peak memory of each GLNet stage.

Each iteration is one optimizer step on one batch, through the project's own training code
(helper.configure_stage, helper.make_optimizer, engine.train_one_epoch with the stage's TrainStep),
on synthetic batches built directly as tensors in the format of dataset.deep_globe.collate
(random uint8 images and labels; the global image and label are their resized versions).
Weights are random (GLNet after torch.manual_seed(0); mode 3 gets a second GLNet as the frozen
global model). Defaults are the paper's: batch 6, sub-batch 6, size_g 508, size_p 508,
2448x2448 images. The first --warmup iterations (optimizer state allocation, cudnn autotuning)
are run but not timed.

    python benchmarks/bench_train.py --device cpu --threads 2                 # modes 1, 2, 3
    python benchmarks/bench_train.py --mode 1 3 --batch_size 1 --image_size 1224 --iters 2

With several modes, each one runs in its own subprocess, so that the peak memory of one
stage does not carry over to the next. A table is printed and one JSON line per stage is
appended to --results.

Under torchrun (one mode), every process trains on its own synthetic batch (seed + rank)
through the DistributedDataParallel wrapper that training uses (engine.wrap_distributed);
the main process reports its s/iter, the images/s of all processes together and its memory:

    torchrun --standalone --nproc_per_node 2 benchmarks/bench_train.py --mode 1 --device cpu --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import benchmarks as B  # noqa: E402



def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python benchmarks/bench_train.py",
        description=__doc__.split("\n\n")[0],
        epilog=(
            "Memory: peak_rss_mib = ru_maxrss of the process over its whole life (model build, batch "
            "and warm-up included); timed_peak_rss_mib = peak RSS over the timed iterations alone (VmHWM "
            "reset after the warm-up: it starts from the RSS of that moment); rss_after_build_mib = RSS once the models and the batch exist; on "
            "CUDA, torch.cuda.max_memory_allocated/reserved over the timed iterations."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument
    a("--mode", type=int, nargs="+", choices=(1, 2, 3), default=[1, 2, 3], help="stages to time: 1 global, 2 global2local, 3 local2global")
    a("--batch_size", type=int, default=6, help="images per iteration (optimizer step)")
    a("--sub_batch_size", type=int, default=6, help="patches per forward pass")
    a("--image_size", type=B.parse_size, default="2448", metavar="N|HxW", help="size of the full-resolution images: N (square) or HxW")
    a("--size_g", type=int, default=508, help="side of the global image")
    a("--size_p", type=int, default=508, help="side of the patches")
    a("--iters", type=int, default=3, help="timed iterations")
    a("--warmup", type=int, default=1, help="iterations run before the timed ones")
    a("--n_class", type=int, default=7, help="number of classes")
    a("--lamb_fmreg", type=float, default=0.15, help="weight of the feature-map MSE (mode 2)")
    a("--device", type=str, default=None, help="torch device, e.g. cpu, cuda, cuda:1; None: cuda when available")
    a("--threads", type=int, default=None, help="torch.set_num_threads; None: torch's default")
    a("--precision", choices=("fp32", "bf16"), default="fp32",
      help="fp32: no autocast; bf16: torch.autocast around the training step (fp16 would need a GradScaler, which the training code has not)")
    a("--channels_last", action="store_true", help="models in channels_last memory format")
    a("--no_isolate", action="store_true", help="run all modes in this process (the peak RSS then carries over between modes)")
    a("--results", type=str, default=os.path.join(B.RESULTS_DIR, "train.jsonl"), help="JSON-lines file each stage's figures are appended to")
    a("--seed", type=int, default=0, help="seed of the synthetic batch")
    a("--keep_patch_maps", type=int, default=1, help="mode 3: images of a batch whose per-patch ps3 stay in memory (as train_deep_globe.py)")
    a("--_record", type=str, default=None, help=argparse.SUPPRESS)  # internal: where a child writes its record
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    B.check_sizes(p, args, ("batch_size", "sub_batch_size", "iters", "n_class"))
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    h, w = args.image_size
    if min(h, w) < args.size_p:
        p.error(f"--image_size {h}x{w} is smaller than --size_p {args.size_p} (the data set would pad it; use a larger image)")


def make_batch(batch_size: int, size: tuple[int, int], size_g: int, n_class: int, seed: int) -> dict:
    """A batch as dataset.deep_globe.collate makes it: image (list of uint8 (3, H, W)), label
    (list of uint8 (H, W)), image_global (B, 3, g, g) float in [0, 1], label_global
    (B, g/4, g/4) int64, size, id. Random content (the timing does not depend on it)."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    h, w = size
    images, labels, globals_, label_globals = [], [], [], []
    for _ in range(batch_size):
        image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        label = torch.randint(0, n_class, (h, w), dtype=torch.uint8, generator=g)
        globals_.append(F.interpolate(image[None].float().div_(255), size=(size_g, size_g), mode="bilinear", antialias=True)[0])
        label_globals.append(F.interpolate(label[None, None].float(), size=(size_g // 4, size_g // 4), mode="nearest-exact")[0, 0].long())
        images.append(image)
        labels.append(label)
    return {
        "id": [f"synthetic{i}" for i in range(batch_size)],
        "size": [(h, w)] * batch_size,
        "image": images,
        "label": labels,
        "image_global": torch.stack(globals_),
        "label_global": torch.stack(label_globals),
    }


def setup_stage(args, mode: int, device) -> tuple:
    """The stage's models, trainable parameters, optimizer, TrainStep and synthetic batch, made
    with the project's training code (helper): (step, params, optimizer, batch). The step holds
    the models."""
    import helper

    model, frozen = B.build_glnet(args.n_class, mode, device, args.channels_last, training=True)
    stage = helper.STAGES[mode]
    params = helper.configure_stage(model, stage)
    optimizer = helper.make_optimizer(params, stage.lr)
    cfg = helper.Config(stage, device, args.n_class, args.size_p, args.sub_batch_size, args.lamb_fmreg,
                        num_epochs=1, lr=stage.lr, progress=False, keep_patch_maps=args.keep_patch_maps)
    step = helper.TrainStep(model, cfg, frozen)
    batch = make_batch(args.batch_size, args.image_size, args.size_g, args.n_class, args.seed)
    return step, params, optimizer, batch


class IterationTimer:
    """Times each optimizer step of engine.train_one_epoch through its on_iteration callback:
    the time from the previous step's end (or the epoch's start) to this one's, the device
    synchronised at both ends."""

    def __init__(self, mode: int, device, step, optimizer, batch, precision: str, forward=None) -> None:
        self.mode, self.device, self.precision = mode, device, precision
        self.step, self.optimizer, self.batch, self.forward = step, optimizer, batch, forward
        self.phase = "warm-up"  # printed with each iteration
        self.times: list[float] = []
        self.last = 0.0

    def on_iteration(self, i, lr, loss) -> None:
        B.synchronize(self.device)
        t = time.perf_counter()
        self.times.append(t - self.last)
        print(f"  mode {self.mode} {self.phase} {i + 1}: {t - self.last:.3f} s (loss {loss:.4f})", flush=True)
        self.last = t

    def epoch(self, n: int) -> None:
        """n iterations on the same batch, in one train_one_epoch call."""
        import engine

        B.synchronize(self.device)
        self.last = time.perf_counter()
        with B.autocast(self.device, self.precision):
            engine.train_one_epoch(self.step, [self.batch] * n, self.optimizer, 0, on_iteration=self.on_iteration,
                                   forward=self.forward)


def stage_results(args, times: list[float], params, build_s: float, rss_after_build, hwm_reset: bool,
                  device) -> dict:
    """The figures of one stage from its timed iterations; memory is read now, after them."""
    st = B.stats(times)
    return {
        "seconds_per_iter": st["mean"],
        "seconds_per_iter_median": st["median"],
        "seconds_per_iter_min": st["min"],
        "seconds_per_iter_max": st["max"],
        "images_per_second": args.batch_size * len(times) / sum(times),
        "per_iter_seconds": [round(x, 4) for x in times],
        "trainable_params": sum(p.numel() for p in params),
        "setup_seconds": round(build_s, 3),
        "peak_rss_mib": B.peak_rss_mib(),
        "timed_peak_rss_mib": B.hwm_mib() if hwm_reset else None,
        "rss_after_build_mib": rss_after_build,
        "rss_end_mib": B.current_rss_mib(),
        **B.cuda_memory(device),
    }


def run_stage(args, mode: int, device, procs=None) -> dict:
    """Warm-up, then the timed iterations of one stage; returns the figures. Under torchrun
    (`procs` active) the step runs through the DistributedDataParallel wrapper."""
    import torch

    import engine
    import helper  # noqa: F401  (imported before the setup is timed, as the setup uses it)

    t0 = time.perf_counter()
    step, params, optimizer, batch = setup_stage(args, mode, device)
    forward = engine.wrap_distributed(step) if procs is not None and procs.active else None
    build_s = time.perf_counter() - t0
    rss_after_build = B.current_rss_mib()
    timer = IterationTimer(mode, device, step, optimizer, batch, args.precision, forward)
    h, w = args.image_size
    print(f"mode {mode}: batch {args.batch_size} of {h}x{w}, size_g {args.size_g}, size_p {args.size_p}, "
          f"sub-batch {args.sub_batch_size}, on {device} ({args.precision}, {torch.get_num_threads()} threads)", flush=True)
    if args.warmup:
        timer.epoch(args.warmup)
    timer.times.clear()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    hwm_reset = B.reset_peak_rss()
    timer.phase = "iteration"
    timer.epoch(args.iters)
    return stage_results(args, timer.times, params, build_s, rss_after_build, hwm_reset, device)


COLUMNS = [
    ("mode", "mode"), ("batch", "batch_size"), ("image", "image"), ("g/p", "gp"), ("sub", "sub_batch_size"),
    ("device", "device"), ("prec", "precision"), ("thr", "threads"), ("procs", "processes"), ("iters", "iters"),
    ("s/iter", "seconds_per_iter"), ("median", "seconds_per_iter_median"), ("img/s", "images_per_second"),
    ("img/s all", "images_per_second_all_processes"),
    ("peak RSS MiB", "peak_rss_mib"), ("timed peak MiB", "timed_peak_rss_mib"), ("CUDA max MiB", "cuda_max_allocated_mib"),
]


def table_row(record: dict) -> dict:
    c = record["config"]
    h, w = c["image_size"]
    return {**c, **record["results"], "image": f"{h}x{w}", "gp": f"{c['size_g']}/{c['size_p']}"}


def run_isolated(args, argv: list[str]) -> int:
    """Each mode in its own subprocess (fresh peak RSS); then one table for all."""
    rows, failed = [], []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        for mode in args.mode:
            record_path = os.path.join(tmp, f"mode{mode}.json")
            cmd = [sys.executable, os.path.abspath(__file__), *argv, "--mode", str(mode), "--no_isolate", "--_record", record_path]
            rc = subprocess.run(cmd, cwd=REPO).returncode
            if rc != 0 or not os.path.isfile(record_path):
                print(f"mode {mode}: failed (exit code {rc})", flush=True)
                failed.append(mode)
                continue
            with open(record_path) as f:
                rows.append(table_row(json.load(f)))
    print()
    print(B.format_table(rows, COLUMNS))
    if failed:
        print(f"failed modes: {' '.join(map(str, failed))}")
    return 1 if failed else 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = get_parser()
    args = p.parse_args(argv)
    check_args(p, args)
    modes = list(dict.fromkeys(args.mode))
    if len(modes) > 1 and not args.no_isolate:
        args.mode = modes
        return run_isolated(args, argv)
    device = B.setup_torch(args.device, args.threads)
    import torch

    from utils import dist

    procs = dist.Processes.from_env()
    if procs.active:
        if len(modes) > 1:
            p.error("under torchrun, give one --mode")
        device = dist.start(procs, device, 600)
        args.seed += procs.rank  # each process its own images
    try:
        return report(args, modes, device, procs, torch.get_num_threads())
    finally:
        dist.stop(procs)


def report(args, modes, device, procs, threads: int) -> int:
    """Run the stages in this process; the main process prints the table and appends the records."""
    h, w = args.image_size
    rows = []
    for mode in modes:
        results = run_stage(args, mode, device, procs)
        results["processes"] = procs.world
        results["images_per_second_all_processes"] = results["images_per_second"] * procs.world
        if not procs.main:
            continue
        record = {
            "benchmark": "train",
            "date": B.now(),
            "command": B.command_line(),
            "machine": B.machine_info(device),
            "config": {
                "mode": mode, "batch_size": args.batch_size, "sub_batch_size": args.sub_batch_size,
                "image_size": [h, w], "size_g": args.size_g, "size_p": args.size_p, "n_class": args.n_class,
                "device": str(device), "precision": args.precision, "threads": threads, "processes": procs.world,
                "channels_last": args.channels_last, "iters": args.iters, "warmup": args.warmup,
                "isolated": args._record is not None or len(modes) == 1,
            },
            "results": results,
        }
        B.append_jsonl(args.results, record)
        if args._record:
            with open(args._record, "w") as f:
                json.dump(record, f)
        rows.append(table_row(record))
    if procs.main:
        print()
        print(B.format_table(rows, COLUMNS))
        print(f"appended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
