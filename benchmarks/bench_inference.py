"""Inference benchmark: seconds per image and peak memory of GLNet evaluation, end to end.

Synthetic DeepGlobe-layout images are written to a folder first (in a subprocess, so that
their generation does not count in this process's peak memory). Then, per image, the timed
path is: JPEG/PNG decode -> DeepGlobe dataset item (global image resize, label) -> collate ->
engine.evaluate (host->device copy, inference.predict_strips, confusion matrix update) -> predictions.
The first --warmup images are run but not timed. Weights are random (GLNet after
torch.manual_seed(0); for mode 3 a second GLNet as the frozen global model), so no checkpoint
is needed and the figures do not depend on the weights.

With --eval_cli, the whole `python train_deep_globe.py --evaluation` command is timed instead
(checkpoints saved first from the random models), with the child's peak RSS.

    python benchmarks/bench_inference.py --mode 3 --image_size 2448 --threads 2 --device cpu
    python benchmarks/bench_inference.py --mode 3 --image_size 1224 --eval_cli --threads 2

A table is printed and one JSON line per run is appended to --results.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import benchmarks as B  # noqa: E402

CHECKPOINTS = {1: "fpn_deepglobe_global", 2: "fpn_deepglobe_global2local", 3: "fpn_deepglobe_local2global"}


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python benchmarks/bench_inference.py",
        description=__doc__.split("\n\n")[0] + " Figures are for one image at a time (batch 1).",
        epilog=(
            "Memory: peak_rss_mib = ru_maxrss of this process over its whole life (model build and "
            "warm-up included); timed_peak_rss_mib = peak RSS of the timed images alone (VmHWM reset "
            "before them: it starts from the RSS of that moment); rss_after_build_mib / rss_end_mib = RSS after the models were built / at "
            "the end; on CUDA, torch.cuda.max_memory_allocated/reserved over the timed images. With "
            "--eval_cli: child_peak_rss_mib = the evaluation process's own ru_maxrss (os.wait4, so the "
            "data-generation subprocess does not count), tree_peak_pss_mib = peak, sampled every 0.2 s, of "
            "the proportional set sizes summed over the evaluation process and its DataLoader workers "
            "(shared pages counted once)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument
    a("--mode", type=int, choices=(1, 2, 3), default=3, help="1: global, 2: global2local, 3: local2global")
    a("--image_size", type=B.parse_size, default="2448", metavar="N|HxW", help="size of the synthetic images: N (square) or HxW")
    a("--size_g", type=int, default=508, help="side of the global image")
    a("--size_p", type=int, default=508, help="side of the patches")
    a("--sub_batch_size", type=int, default=6, help="patches per forward pass")
    a("--n_class", type=int, default=7, help="number of classes")
    a("--device", type=str, default=None, help="torch device, e.g. cpu, cuda, cuda:1; None: cuda when available")
    a("--precision", choices=B.PRECISIONS, default="fp32", help="fp32: no autocast; bf16/fp16: torch.autocast around the prediction")
    a("--threads", type=int, default=None, help="torch.set_num_threads (with --eval_cli: OMP_NUM_THREADS and MKL_NUM_THREADS of the child); None: torch's default")
    a("--channels_last", action="store_true", help="models in channels_last memory format")
    a("--compile", action="store_true", help="as train_deep_globe.py --compile (torch.compile of the ResNets and the global FPN; compilation happens in the warm-up)")
    a("--n_images", type=int, default=3, help="timed images (all distinct; the warm-up reuses them)")
    a("--warmup", type=int, default=1, help="images run before the timed ones (not timed)")
    a("--tta", action="store_true", help="test-time augmentation (8 flips/rotations)")
    a("--no_labels", action="store_true", help="no label decoding and no confusion matrix (prediction only, as --test)")
    a("--save_predictions", action="store_true", help="also write the colour PNG predictions (timed)")
    a("--data", choices=("synthetic", "random"), default="synthetic",
      help="synthetic: dataset.synthetic images (realistic JPEG sizes); random: uniform-noise JPEGs and labels")
    a("--image_format", choices=("jpg", "tif"), default="jpg",
      help="--data random: file of the images (tif: uncompressed RGB TIFF, as Inria Aerial's tiles)")
    a("--data_dir", type=str, default=None,
      help="keep the generated images here and reuse them on the next run with the same settings; None: a temporary folder, removed afterwards")
    a("--eval_cli", action="store_true", help="time a whole `train_deep_globe.py --evaluation` subprocess on the images instead")
    a("--num_workers", type=int, default=2, help="--eval_cli: DataLoader workers of the evaluation (the CLI's default)")
    a("--batch_size", type=int, default=1, help="--eval_cli: images per DataLoader batch (the CLI default is 6)")
    a("--results", type=str, default=os.path.join(B.RESULTS_DIR, "inference.jsonl"), help="JSON-lines file the run is appended to")
    a("--seed", type=int, default=0, help="seed of the synthetic images")
    a("--_write_data", type=str, default=None, help=argparse.SUPPRESS)  # internal: the generation subprocess
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    B.check_sizes(p, args, ("sub_batch_size", "n_class", "n_images", "batch_size"))
    if args.warmup < 0 or args.num_workers < 0:
        p.error("--warmup and --num_workers must be >= 0")
    if args.eval_cli and (args.precision != "fp32" or args.channels_last or args.compile):
        p.error("--eval_cli times train_deep_globe.py as it is: fp32 only, no --channels_last, no --compile")
    if args.image_format != "jpg" and args.data != "random":
        p.error("--image_format tif needs --data random")
    if args.eval_cli and args.warmup:
        print("note: --warmup is ignored with --eval_cli (the whole process is timed)")


# ----------------------------------------------------------------------------- data

def write_random(out: str, n: int, size: tuple[int, int], seed: int, labels: bool, n_class: int = 7,
                 image_format: str = "jpg") -> None:
    """Uniform-noise images (JPEG quality 90, or uncompressed TIFF) and random class-index labels
    (0..n_class-1) in the GLNet layout."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size
    for sub in ("Sat", "Label"):
        os.makedirs(os.path.join(out, "crossvali", sub), exist_ok=True)
    for i in range(n):
        id_ = str(100000 + i)
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        name = os.path.join(out, "crossvali", "Sat", f"{id_}_sat.{image_format}")
        if image_format == "jpg":
            image.save(name, format="JPEG", quality=90)
        else:
            image.save(name, format="TIFF")
        if labels:
            Image.fromarray(rng.integers(0, n_class, (h, w), dtype=np.uint8)).save(
                os.path.join(out, "crossvali", "Label", f"{id_}_mask.png")
            )


RANDOM_MANIFEST = "bench_random.json"


def write_data(args: argparse.Namespace, out: str) -> None:
    import json

    from dataset.synthetic import MANIFEST, generate

    if os.path.isdir(out) and os.listdir(out) and not any(
        os.path.isfile(os.path.join(out, m)) for m in (MANIFEST, RANDOM_MANIFEST)
    ):
        sys.exit(f"error: --data_dir {out} holds files this benchmark did not write; give a new or empty folder")
    if args.data == "synthetic":
        if os.path.isfile(os.path.join(out, RANDOM_MANIFEST)):
            shutil.rmtree(out)
        s = generate(out, n_train=0, n_val=args.n_images, n_test=0, sizes=[args.image_size], seed=args.seed)
        if s["skipped"]:
            print(f"reusing the {args.n_images} synthetic images in {out}", flush=True)
        return
    params = {"n": args.n_images, "size": list(args.image_size), "seed": args.seed}
    if args.image_format != "jpg" or args.n_class != 7:  # keeps the markers of earlier runs valid
        params.update(format=args.image_format, n_class=args.n_class)
    marker = os.path.join(out, RANDOM_MANIFEST)
    try:
        with open(marker) as f:
            if json.load(f) == params:
                print(f"reusing the {args.n_images} random images in {out}", flush=True)
                return
    except (OSError, ValueError):
        pass
    if os.path.isdir(out):  # ours (checked above): a previous run with other settings
        shutil.rmtree(out)
    write_random(out, args.n_images, args.image_size, args.seed, labels=True, n_class=args.n_class,
                 image_format=args.image_format)
    with open(marker, "w") as f:
        json.dump(params, f)


def prepare_data(args: argparse.Namespace, out: str) -> float:
    """Write the images in a subprocess (its memory stays out of this process's peak)."""
    t0 = time.perf_counter()
    h, w = args.image_size
    print(f"writing {args.n_images} {args.data} images of {h}x{w} to {out} ...", flush=True)
    cmd = [sys.executable, os.path.abspath(__file__), "--_write_data", out, "--data", args.data,
           "--n_images", str(args.n_images), "--image_size", f"{h}x{w}", "--seed", str(args.seed),
           "--n_class", str(args.n_class), "--image_format", args.image_format]
    rc = subprocess.run(cmd, cwd=REPO).returncode
    if rc != 0:
        sys.exit(f"error: writing the images failed (exit code {rc})")
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- in-process timing

class TimedImages:
    """The evaluation's loader, timing each image: `batches()` yields the images one by one
    (each a collated batch of one). engine.evaluate evaluates one image between two resumptions
    of that generator, so an image's time runs from the start of its loading to the start of
    the next one's (for the last image: to the end of the loop), the device synchronised at
    both ends. The first `warmup` images (the data set's, in turn) are run but not timed."""

    def __init__(self, ds, device, warmup: int, n_images: int) -> None:
        self.ds, self.device, self.warmup, self.n_images = ds, device, warmup, n_images
        self.load_s: list[float] = []  # decode + dataset item + collate, per timed image
        self.image_s: list[float] = []  # whole image, load included
        self.marks: list[tuple[float, float]] = []  # (start, end of loading) per image
        self.hwm_reset = False  # whether the peak RSS was reset when the timed part started

    def batches(self):
        from dataset.deep_globe import collate

        for i in range(self.warmup + self.n_images):
            B.synchronize(self.device)
            start = time.perf_counter()
            if i > 0:
                self._finish(i, start)
            if i == self.warmup:  # the timed part starts here
                start = self._start_timed_part()
            index = i % len(self.ds) if i < self.warmup else i - self.warmup
            batch = collate([self.ds[index]])
            self.marks.append((start, time.perf_counter()))
            yield batch
        B.synchronize(self.device)
        self._finish(self.warmup + self.n_images, time.perf_counter())

    def _finish(self, i: int, end: float) -> None:
        """Image i - 1 ended at `end`: print its times and keep them if it was a timed one."""
        prev_start, load_end = self.marks[i - 1]
        elapsed = end - prev_start
        tag = f"warm-up {i}/{self.warmup}" if i <= self.warmup else f"image {i - self.warmup}/{self.n_images}"
        print(f"  {tag}: {elapsed:.3f} s (load {load_end - prev_start:.3f} s)", flush=True)
        if i > self.warmup:
            self.image_s.append(elapsed)
            self.load_s.append(load_end - prev_start)

    def _start_timed_part(self) -> float:
        """Reset the peak-memory counters (CUDA, VmHWM); returns the timed part's start time."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.hwm_reset = B.reset_peak_rss()
        return time.perf_counter()


def build_models(args, device):
    """The random-weight model and, for mode 3, the frozen global model; with --compile, compiled
    as train_deep_globe.py --compile does."""
    import torch

    model, frozen = B.build_glnet(args.n_class, args.mode, device, args.channels_last)
    if args.compile:
        from models.build import tune_for_device

        tune_for_device((model, frozen), torch.device("cpu"), compile_=True)  # cpu: no layout change here
    return model, frozen


def evaluate_images(args, device, model, frozen, images: TimedImages) -> None:
    """engine.evaluate over the images, as the CLI runs it; with --save_predictions the
    predictions go to a temporary folder, removed afterwards."""
    import engine
    import helper

    pred_dir = tempfile.mkdtemp(prefix="bench_preds_") if args.save_predictions else None
    print(f"mode {args.mode}: {args.warmup} warm-up + {args.n_images} timed images on {device} ({args.precision})", flush=True)
    try:
        with B.autocast(device, args.precision):
            cfg = helper.Config(helper.STAGES[args.mode], device, args.n_class, args.size_p, args.sub_batch_size,
                                tta=args.tta, progress=False)
            engine.evaluate(model, images.batches(), cfg, frozen, predictions_dir=pred_dir, with_labels=not args.no_labels)
    finally:
        if pred_dir:
            shutil.rmtree(pred_dir, ignore_errors=True)


def in_process_results(images: TimedImages, build_s: float, rss_after_build, device) -> dict:
    """The figures of the timed images; memory is read now, after them."""
    image_s, load_s = images.image_s, images.load_s
    total = sum(image_s)
    st = B.stats(image_s)
    compute = [a - b for a, b in zip(image_s, load_s)]
    return {
        "seconds_per_image": st["mean"],
        "seconds_per_image_median": st["median"],
        "seconds_per_image_min": st["min"],
        "seconds_per_image_max": st["max"],
        "images_per_second": len(image_s) / total if total > 0 else None,
        "load_seconds_per_image": B.stats(load_s)["mean"],
        "compute_seconds_per_image": B.stats(compute)["mean"],
        "per_image_seconds": [round(x, 4) for x in image_s],
        "model_build_seconds": round(build_s, 3),
        "peak_rss_mib": B.peak_rss_mib(),
        "timed_peak_rss_mib": B.hwm_mib() if images.hwm_reset else None,
        "rss_after_build_mib": rss_after_build,
        "rss_end_mib": B.current_rss_mib(),
        **B.cuda_memory(device),
    }


def run_in_process(args, device, data_dir: str) -> dict:
    """Build the models (timed apart), then evaluate the warm-up and the timed images."""
    import torch  # noqa: F401  (the imports stay out of the model build's time)

    import engine  # noqa: F401
    from dataset.deep_globe import DeepGlobe

    t0 = time.perf_counter()
    model, frozen = build_models(args, device)
    build_s = time.perf_counter() - t0
    rss_after_build = B.current_rss_mib()
    ds = DeepGlobe(data_dir, "crossvali", args.size_g, args.size_p, args.n_class, labels=not args.no_labels)
    images = TimedImages(ds, device, args.warmup, args.n_images)
    evaluate_images(args, device, model, frozen, images)
    return in_process_results(images, build_s, rss_after_build, device)


# ----------------------------------------------------------------------------- whole CLI timing

def eval_command(args, device, data_dir: str, work: str, ckpt: list[str]) -> list[str]:
    """The `train_deep_globe.py --evaluation` command line (models in work/models)."""
    cmd = [
        sys.executable, os.path.join(REPO, "train_deep_globe.py"), "--evaluation", "--mode", str(args.mode),
        "--data_path", data_dir, "--model_path", os.path.join(work, "models"),
        "--log_path", os.path.join(work, "runs"), "--task_name", "bench",
        "--n_class", str(args.n_class), "--size_g", str(args.size_g), "--size_p", str(args.size_p),
        "--sub_batch_size", str(args.sub_batch_size), "--batch_size", str(args.batch_size),
        "--num_workers", str(args.num_workers), "--device", str(device), "--no_progress", *ckpt,
    ]
    if args.tta:
        cmd.append("--tta")
    if args.save_predictions:
        cmd += ["--predictions_dir", os.path.join(work, "predictions")]
    return cmd


def evaluate_seconds(lines: list[str]) -> float | None:
    """engine.evaluate's own time, from the CLI's last 'crossvali: N images in S s' line."""
    eval_s = None
    for line in lines:
        m = re.match(r"crossvali: (\d+) images in ([\d.]+) s", line)
        if m:
            eval_s = float(m.group(2))
    return eval_s


def run_eval_cli(args, device, data_dir: str, work: str) -> dict:
    """Save random checkpoints, then time `train_deep_globe.py --evaluation` in a subprocess."""
    os.makedirs(os.path.join(work, "models"), exist_ok=True)
    ckpt = B.save_checkpoints(args, os.path.join(work, "models"))
    cmd = eval_command(args, device, data_dir, work, ckpt)
    env = B.child_env(args.threads)
    print("timing: " + " ".join(cmd), flush=True)
    wall, lines, usage, tree_peak = B.time_child(cmd, env)
    eval_s = evaluate_seconds(lines)
    return {
        "wall_seconds": wall,
        "seconds_per_image": wall / args.n_images,
        "images_per_second": args.n_images / wall,
        "evaluate_seconds": eval_s,  # engine.evaluate alone, as the CLI reports it
        "evaluate_seconds_per_image": None if eval_s is None else eval_s / args.n_images,
        "startup_seconds": None if eval_s is None else wall - eval_s,  # imports, model build, checkpoints, metrics
        "child_peak_rss_mib": B._kib_to_mib(usage.ru_maxrss),
        "tree_peak_pss_mib": tree_peak or None,
    }


# ----------------------------------------------------------------------------- main

COLUMNS = [
    ("mode", "mode"), ("image", "image"), ("g/p", "gp"), ("device", "device"), ("prec", "precision"),
    ("thr", "threads"), ("n", "n_images"), ("s/image", "seconds_per_image"), ("median", "seconds_per_image_median"),
    ("img/s", "images_per_second"), ("load s", "load_seconds_per_image"), ("peak RSS MiB", "peak_rss_mib"),
    ("timed peak MiB", "timed_peak_rss_mib"), ("CUDA max MiB", "cuda_max_allocated_mib"),
]
CLI_COLUMNS = [
    ("mode", "mode"), ("image", "image"), ("g/p", "gp"), ("device", "device"), ("thr", "threads"),
    ("n", "n_images"), ("wall s", "wall_seconds"), ("s/image", "seconds_per_image"),
    ("eval s/image", "evaluate_seconds_per_image"), ("startup s", "startup_seconds"),
    ("child peak RSS MiB", "child_peak_rss_mib"), ("tree peak PSS MiB", "tree_peak_pss_mib"),
]


def main(argv=None) -> int:
    p = get_parser()
    args = p.parse_args(argv)
    if args._write_data:
        write_data(args, args._write_data)
        return 0
    check_args(p, args)
    device = B.setup_torch(args.device, args.threads)
    import torch

    work = tempfile.mkdtemp(prefix="bench_inference_")
    data_dir = args.data_dir or os.path.join(work, "data")
    try:
        gen_s = prepare_data(args, data_dir)
        results = run_eval_cli(args, device, data_dir, work) if args.eval_cli else run_in_process(args, device, data_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    h, w = args.image_size
    config = {
        "mode": args.mode, "image_size": [h, w], "size_g": args.size_g, "size_p": args.size_p,
        "sub_batch_size": args.sub_batch_size, "n_class": args.n_class, "device": str(device),
        "precision": args.precision, "threads": args.threads if args.eval_cli else torch.get_num_threads(),
        "channels_last": args.channels_last, "compile": args.compile, "n_images": args.n_images, "warmup": 0 if args.eval_cli else args.warmup,
        "tta": args.tta, "labels": not args.no_labels, "save_predictions": args.save_predictions, "data": args.data,
        "image_format": args.image_format,
        "eval_cli": args.eval_cli,
    }
    if args.eval_cli:
        config.update(num_workers=args.num_workers, batch_size=args.batch_size)
    record = {
        "benchmark": "inference_cli" if args.eval_cli else "inference",
        "date": B.now(),
        "command": B.command_line(),
        "machine": B.machine_info(device),
        "config": config,
        "results": {**results, "data_generation_seconds": round(gen_s, 2)},
    }
    row = {**config, **results, "image": f"{h}x{w}", "gp": f"{args.size_g}/{args.size_p}"}
    print()
    print(B.format_table([row], CLI_COLUMNS if args.eval_cli else COLUMNS))
    B.append_jsonl(args.results, record)
    print(f"appended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
