"""predict.py on large synthetic images: wall time and peak RSS of the whole process.

    python benchmarks/bench_predict.py --sizes 2448 5000 4499x6749 10000x12000 --mode 3 --threads 2 --device cpu

For each size (H x W) a synthetic image is written (a tiled GeoTIFF by default, read by
windows; --image_format jpg for a JPEG, decoded whole), random-init checkpoints are saved,
and `predict.py` runs in a child process; its peak RSS is the kernel's ru_maxrss of that
child (wait4). Figures per size: seconds, patches, seconds per patch, peak RSS. One JSON
line per size goes to benchmarks/results/predict.jsonl.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import benchmarks as B  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--sizes", nargs="+", type=B.parse_size, default=[B.parse_size("2448")], help="image sizes, N or HxW")
    a("--mode", type=int, choices=(1, 2, 3), default=3)
    a("--n_class", type=int, default=7)
    a("--size_g", type=int, default=508)
    a("--size_p", type=int, default=508)
    a("--sub_batch_size", type=int, default=6)
    a("--image_format", choices=("tif", "jpg"), default="tif", help="GeoTIFF (windows) or JPEG (decoded whole)")
    a("--format", nargs="+", default=["index"], help="predict.py's --format")
    a("--threads", type=int, default=None, help="OMP/MKL threads of the child")
    a("--device", default="cpu")
    a("--extra", default="", help="more predict.py arguments, e.g. '--faithful_max_mp 200'")
    a("--results", default=os.path.join(REPO, "benchmarks", "results", "predict.jsonl"))
    return p


def write_image(path: str, height: int, width: int, fmt: str) -> None:
    """A smooth synthetic scene (so that JPEG and deflate behave as on real images),
    written by bands of rows for the GeoTIFF (never whole in memory)."""
    import numpy as np

    def band(top: int, rows: int):
        y, x = np.mgrid[top : top + rows, 0:width].astype(np.float32)
        r = 128 + 100 * np.sin(x / 97.0) * np.cos(y / 131.0)
        g = 128 + 100 * np.sin((x + y) / 211.0)
        b = 128 + 60 * np.cos(x / 53.0 - y / 71.0)
        return np.clip(np.stack([r, g, b]), 0, 255).astype(np.uint8)

    if fmt == "jpg":
        from PIL import Image

        Image.fromarray(band(0, height).transpose(1, 2, 0)).save(path, quality=90)
        return
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=3, dtype="uint8",
                       tiled=True, blockxsize=512, blockysize=512, compress="deflate", BIGTIFF="IF_SAFER",
                       crs="EPSG:32633", transform=from_origin(500000.0, 4200000.0, 0.5, 0.5)) as dst:
        for top in range(0, height, 512):
            rows = min(512, height - top)
            dst.write(band(top, rows), window=Window(0, top, width, rows))


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    import torch

    device = torch.device(args.device)
    work = tempfile.mkdtemp(prefix="bench_predict_")
    rows = []
    try:
        models = os.path.join(work, "models")
        os.makedirs(models)
        ckpt = B.save_checkpoints(args, models)
        for h, w in args.sizes:
            image = os.path.join(work, f"synthetic_{h}x{w}.{args.image_format}")
            print(f"writing {image}", flush=True)
            write_image(image, h, w, args.image_format)
            cmd = [sys.executable, os.path.join(REPO, "predict.py"), image, "--out", os.path.join(work, "out"),
                   "--mode", str(args.mode), "--model_path", models, *ckpt, "--n_class", str(args.n_class),
                   "--size_g", str(args.size_g), "--size_p", str(args.size_p), "--sub_batch_size",
                   str(args.sub_batch_size), "--device", str(device), "--no_progress", "--format", *args.format,
                   *args.extra.split()]
            print("timing: " + " ".join(cmd), flush=True)
            wall, lines, usage, _ = B.time_child(cmd, B.child_env(args.threads))
            m = re.search(r", (\d+) patches, ([\d.]+) s", "".join(lines))
            patches, seconds = (int(m.group(1)), float(m.group(2))) if m else (None, None)
            row = {
                "image": f"{h}x{w}", "megapixels": round(h * w / 1e6, 1), "format": args.image_format,
                "patches": patches, "wall_seconds": round(wall, 1), "image_seconds": seconds,
                "seconds_per_patch": round(seconds / patches, 3) if patches else None,
                "peak_rss_mib": round(B._kib_to_mib(usage.ru_maxrss)),
            }
            rows.append(row)
            B.append_jsonl(args.results, {
                "benchmark": "predict", "date": B.now(), "command": B.command_line(),
                "machine": B.machine_info(device),
                "config": {"mode": args.mode, "size_g": args.size_g, "size_p": args.size_p,
                           "sub_batch_size": args.sub_batch_size, "threads": args.threads, "format": args.format,
                           "extra": args.extra},
                "results": row,
            })
            os.remove(image)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(B.format_table(rows, [("image", "image"), ("MP", "megapixels"), ("input", "format"), ("patches", "patches"),
                                ("wall s", "wall_seconds"), ("image s", "image_seconds"),
                                ("s/patch", "seconds_per_patch"), ("peak RSS MiB", "peak_rss_mib")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
