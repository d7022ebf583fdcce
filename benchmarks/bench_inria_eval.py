"""Inria Aerial evaluation benchmark: time and peak memory of GLNet (mode 3) on one 5000x5000 tile.

A thin layer over bench_inference.py with the Inria settings (`--dataset inria`: 2 classes,
536 px patches and global view, sub-batch 6): one uniform-noise 5000x5000 RGB TIFF with a
random 0/1 label, random-init weights, and by default the whole `train_deep_globe.py
--evaluation` process timed (wall time, its peak RSS, the peak PSS of it and its loader
workers). `--in_process` times engine.evaluate in this process instead (seconds of the image,
peak RSS of this process). Every other option of bench_inference.py can be given and wins over
these defaults (e.g. `--size_p 508`, `--device cuda`, `--n_images 2`).

    python benchmarks/bench_inria_eval.py --threads 2 --device cpu           # the measurement
    python benchmarks/bench_inria_eval.py --image_size 1200 --device cpu     # a quick check

The table is printed and one JSON line appended to benchmarks/results/inria_eval.jsonl.
"""
from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import benchmarks as B  # noqa: E402
from benchmarks import bench_inference  # noqa: E402
from dataset.presets import PRESETS  # noqa: E402

INRIA = PRESETS["inria"]
TILE = 5000  # side of an Inria Aerial tile


def inria_defaults() -> list[str]:
    """bench_inference.py arguments of the Inria measurement (later arguments override them)."""
    return [
        "--mode", "3", "--image_size", str(TILE), "--n_class", str(INRIA.n_class),
        "--size_g", str(INRIA.size_g), "--size_p", str(INRIA.size_p),
        "--sub_batch_size", str(INRIA.sub_batch_size),
        "--data", "random", "--image_format", "tif", "--n_images", "1", "--warmup", "0",
        "--results", os.path.join(B.RESULTS_DIR, "inria_eval.jsonl"),
    ]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        print("Defaults given to bench_inference.py: " + " ".join(inria_defaults()) + " --eval_cli\n")
    in_process = "--in_process" in argv
    argv = [a for a in argv if a != "--in_process"]
    return bench_inference.main(inria_defaults() + ([] if in_process else ["--eval_cli"]) + argv)


if __name__ == "__main__":
    sys.exit(main())
