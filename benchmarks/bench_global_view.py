"""--global_view square against aspect on a small synthetic set of non-square images (issue 11).

Each setting trains mode 1 from random init (batch 1, the same seed and data), then evaluates
it on crossvali; every run is a fresh `train_deep_globe.py` process, whose peak RSS is read
from getrusage at its end. Prints one row per setting and appends JSON lines to
benchmarks/results/global_view.jsonl.

    python benchmarks/bench_global_view.py --size 256x512 --size_g 128 --epochs 6 --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ("import resource, sys, train_deep_globe; rc = train_deep_globe.cli(sys.argv[1:]); "
       "u = resource.getrusage(resource.RUSAGE_SELF); "
       "print('maxrss_kb', u.ru_maxrss, 'cpu_s', u.ru_utime + u.ru_stime); sys.exit(rc)")


def _cli(argv: list[str], threads: int) -> tuple[float, float]:
    """(CPU seconds, peak RSS in MB) of one train_deep_globe.py process (CPU time: wall time
    on a shared machine says more about the neighbours than about the run)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, "-c", RUN, *argv], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"run failed: {' '.join(argv)}\n{proc.stderr[-2000:]}")
    fields = proc.stdout.rsplit("maxrss_kb", 1)[1].split()
    return float(fields[2]), float(fields[0]) / 1024


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="256x512", help="HxW of every image (landscape; every second one portrait)")
    p.add_argument("--size_g", type=int, default=128)
    p.add_argument("--size_p", type=int, default=128)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--n_train", type=int, default=8)
    p.add_argument("--n_val", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval_size_g", type=int, default=512, help="a second evaluation of the trained weights at this size_g (memory)")
    args = p.parse_args()
    sys.path.insert(0, REPO)
    from dataset.synthetic import generate

    h, w = (int(x) for x in args.size.split("x"))
    root = tempfile.mkdtemp(prefix="global_view_")
    generate(os.path.join(root, "data"), n_train=args.n_train, n_val=args.n_val, n_test=0, seed=args.seed,
             sizes=[(h, w), (w, h)])
    rows = []
    for view in ("square", "aspect"):
        common = ["--data_path", os.path.join(root, "data"), "--model_path", os.path.join(root, view),
                  "--log_path", os.path.join(root, view, "runs"), "--mode", "1", "--batch_size", "1",
                  "--size_g", str(args.size_g), "--size_p", str(args.size_p), "--global_view", view,
                  "--backbone_weights", "none", "--num_workers", "0", "--no_progress", "--device", "cpu",
                  "--seed", str(args.seed), "--task_name", "g", "--path_g", "g.pth"]
        train_s, train_rss = _cli(common + ["--num_epochs", str(args.epochs), "--lr", "2e-4"], args.threads)
        eval_s, eval_rss = _cli(common + ["--evaluation", "--task_name", "ev"], args.threads)
        with open(os.path.join(root, view, "runs", "ev.crossvali.metrics.json")) as f:
            miou = json.load(f)["global"]["miou"]
        big = list(common)
        big[big.index("--size_g") + 1] = str(args.eval_size_g)
        big_s, big_rss = _cli(big + ["--evaluation", "--task_name", "ev_big"], args.threads)
        rows.append(dict(view=view, miou=miou, train_cpu_s=train_s, train_rss_mb=train_rss, eval_cpu_s=eval_s,
                         eval_rss_mb=eval_rss, big_eval_cpu_s=big_s, big_eval_rss_mb=big_rss,
                         size=args.size, size_g=args.size_g, eval_size_g=args.eval_size_g, epochs=args.epochs,
                         n_train=args.n_train, n_val=args.n_val, seed=args.seed, threads=args.threads))
    print(f"{'view':8} {'mIoU':>6} {'train CPU s':>11} {'train RSS MB':>12} {'eval CPU s':>10} {'eval RSS MB':>11} "
          f"{'eval@' + str(args.eval_size_g) + ' CPU s':>16} {'RSS MB':>7}")
    for r in rows:
        print(f"{r['view']:8} {r['miou']:6.3f} {r['train_cpu_s']:11.1f} {r['train_rss_mb']:12.0f} {r['eval_cpu_s']:10.1f} "
              f"{r['eval_rss_mb']:11.0f} {r['big_eval_cpu_s']:16.1f} {r['big_eval_rss_mb']:7.0f}")
    os.makedirs(os.path.join(REPO, "benchmarks", "results"), exist_ok=True)
    with open(os.path.join(REPO, "benchmarks", "results", "global_view.jsonl"), "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
