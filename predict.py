"""Segment images of any size with trained GLNet checkpoints: image in, mask out.

    python predict.py --mode 3 --model_path saved_models big.tif photos/ 'tiles/*.jpg' --out predictions
    python predict.py --mode 3 --format index,color,overlay,geotiff,confidence scene.tif --out out

Inputs are image files (JPEG, PNG, TIFF, GeoTIFF), folders (their images, not recursive) or
globs. Per image, the outputs of --format go to --out as <stem>_mask.png etc. (utils/outputs.py);
the predictions are evaluation's (`--evaluation --predictions_dir` gives the same classes):
the same code (inference.py) makes them in bounded memory, patches by rows, each band of
output rows written as soon as it is final. A bad input is reported in one line and the others are still written; the
exit status is 0 only if every input was. Under torchrun the inputs are shared out among the
processes. With --coarse_to_fine --path_coarse FILE (docs/MODEL.md section 9) a mode-1 model
finds the foreground's box, the --mode's checkpoints predict the box's crop (only its window
of a TIFF is read), class 0 outside; <stem>_box.json says which box.

This file is the command line only; the prediction is inference.py, the image readers
dataset/raster.py, the writers utils/outputs.py.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time
import traceback

from utils.errors import UserError, error_message, run_command

DEFAULT_FORMATS = ("index", "color")


def get_parser() -> argparse.ArgumentParser:
    from dataset.presets import add_dataset_args, preset_help
    from cli import HelpFormatter, mode_help, stage_mode  # every default shown, once
    from utils.outputs import FORMATS
    from dataset.raster import FAITHFUL_MAX_PIXELS

    p = argparse.ArgumentParser(
        description="Predict class masks of images of any size with GLNet checkpoints.",
        formatter_class=HelpFormatter,
    )
    a = p.add_argument
    a("inputs", nargs="*", metavar="INPUT", help="image files, folders of images, or globs ('tiles/*.tif')")
    a("--out", required=True, help="folder for the outputs (created if missing)")
    a("--format", nargs="+", action="append", metavar="FORMAT", help="outputs per image, of "
      f"{', '.join(FORMATS)}: comma-separated (--format index,color), repeated, or space-separated; "
      f"default {','.join(DEFAULT_FORMATS)}")
    a("--mode", type=stage_mode, default=3, metavar="MODE", help=mode_help())
    a("--model_path", default="./saved_models/", help="folder of the checkpoints; --path_* are relative to it")
    add_dataset_args(p)
    a("--path_g", default=None, help="global checkpoint (mode 1; the frozen global model of mode 3) " + preset_help("path_g"))
    a("--path_g2l", default=None, help="global2local checkpoint (mode 2) " + preset_help("path_g2l"))
    a("--path_l2g", default=None, help="local2global checkpoint (mode 3) " + preset_help("path_l2g"))
    a("--path_local", default=None, help="local-only checkpoint (--mode local) " + preset_help("path_local"))
    a("--n_class", type=int, default=None, help="number of classes of the checkpoints " + preset_help("n_class"))
    a("--size_g", type=int, default=None, help="side of the downsampled global image, as in training " + preset_help("size_g"))
    a("--size_p", type=int, default=None, help="side of the full-resolution patches, as in training " + preset_help("size_p"))
    a("--sub_batch_size", type=int, default=None, help="patches per forward pass " + preset_help("sub_batch_size"))
    a("--global_view", choices=("square", "aspect"), default="square", help="the global view the checkpoints were "
      "trained with: square (size_g x size_g, the original) or aspect (long side size_g, the aspect kept)")
    a("--tta", action="store_true", help="sum scores over the 8 flips/rotations (holds the whole image's scores: memory grows with the image)")
    a("--coarse_to_fine", action="store_true", help="the coarse-to-fine GLNet (docs/MODEL.md section 9): the "
      "--path_coarse model's foreground box, the --mode's checkpoints on the box's crop (only its window of a TIFF "
      "is read), class 0 outside it; also writes <stem>_box.json")
    a("--path_coarse", default=None, help="with --coarse_to_fine: the mode-1 checkpoint (trained on whole images) "
      "that finds the foreground box")
    a("--amp", choices=("bf16", "fp16"), default=None, help="mixed precision (default fp32, as evaluation)")
    a("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available)")
    a("--bands", default=None, help="three 1-based bands of a multispectral TIFF to use as RGB, e.g. 3,2,1")
    a("--overlay_size", type=int, default=2048, help="long side of the overlay output, pixels")
    a("--faithful_max_mp", type=float, default=FAITHFUL_MAX_PIXELS / 1e6,
      help="largest image (megapixels) whose global view is evaluation's PIL resize of the whole image; larger "
           "TIFFs get a decimated read instead (never the whole image in memory)")
    a("--dist_timeout", type=float, default=86400, help="under torchrun: seconds a process that is done waits for "
      "the others at the end (the inputs are shared out whole, so one process may have the one large image)")
    a("--no_progress", action="store_true", help="no progress bars")
    a("--debug", action="store_true", help="show tracebacks for errors")
    return p


def parse_bands(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        bands = tuple(int(b) for b in text.split(","))
    except ValueError:
        bands = ()
    if len(bands) != 3:
        raise UserError(f"--bands {text}: give three 1-based band numbers, e.g. --bands 3,2,1")
    return bands


def split_formats(groups: list[list[str]] | None, inputs: list[str]) -> tuple[list[str], list[str]]:
    """(formats, inputs) from the values of each --format and the positional inputs.

    A --format given space-separated values takes the words after it up to the next flag,
    inputs included (`--format index scene.jpg`): its words from the first one that is not a
    format (nor a comma list of formats) on are inputs."""
    from utils.outputs import FORMATS

    formats, more = [], []
    for words in groups or []:
        for k, word in enumerate(words):
            names = word.split(",")
            if not all(n in FORMATS for n in names if n) or not any(names):
                if k == 0:  # `--format X` where X is no format: a typo, not an input
                    raise UserError(f"--format {word}: not a format (choose from {', '.join(FORMATS)})")
                more += words[k:]
                break
            formats += [n for n in dict.fromkeys(names) if n and n not in formats]
    return formats or list(DEFAULT_FORMATS), inputs + more


def check_args(args):
    """Fill the --dataset preset's defaults, check the flags; returns the class table."""
    from dataset.presets import apply_preset, classes_from_args
    from dataset.raster import RASTERIO_HINT, have_rasterio

    args.format, args.inputs = split_formats(args.format, args.inputs)
    if not args.inputs:
        raise UserError("no INPUT given: name image files, folders or globs (python predict.py --help)")
    args.data_path = None  # a preset flag predict.py has no use for
    apply_preset(args)

    for name in ("size_g", "size_p"):
        v = getattr(args, name)
        if v <= 0 or v % 4:
            raise UserError(f"--{name} must be a positive multiple of 4, got {v}")
    for name in ("sub_batch_size", "n_class", "overlay_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.n_class > 255:
        raise UserError(f"--n_class must be at most 255 (8-bit outputs), got {args.n_class}")
    if args.tta and "confidence" in args.format:
        raise UserError("--format confidence is not made with --tta; leave one of them out")
    if ("geotiff" in args.format or args.bands) and not have_rasterio():
        what = "--format geotiff" if "geotiff" in args.format else "--bands"
        raise UserError(f"{what} needs rasterio: {RASTERIO_HINT}")
    args.bands = parse_bands(args.bands)
    return classes_from_args(args)


def find_inputs(inputs: list[str]) -> tuple[list[str], list[str]]:
    """(image files, one error line per input that gives none) from files, folders and globs;
    a file named twice (by any path) counts once. Of two files with the same stem (their
    outputs would have the same names) the first is kept and the other gets an error line."""
    from dataset.raster import IMAGE_EXTENSIONS

    files, errors, real, stems = [], [], set(), {}
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f) for f in os.listdir(item)
                           if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(item, f)))
            if not found:
                errors.append(f"{item}: no images in this folder ({', '.join(IMAGE_EXTENSIONS)})")
        elif os.path.isfile(item):
            found = [item]
        else:
            found = sorted(f for f in glob.glob(item) if os.path.isfile(f))
            if not found:
                errors.append(f"{item}: no such file, folder, or matching files")
        for f in found:
            if os.path.realpath(f) in real:
                continue
            real.add(os.path.realpath(f))
            stem = os.path.splitext(os.path.basename(f))[0]
            if stem in stems:
                errors.append(f"{f}: another input, {stems[stem]}, has the same name {stem}: its outputs would "
                              "replace those; predict it into another --out folder")
                continue
            stems[stem] = f
            files.append(f)
    return files, errors


def build(args, device):
    """The stage, its models (the model and for mode 3 the frozen global model) from the
    checkpoints, as evaluation, and how each image is predicted: whole, or coarse-to-fine
    with the --path_coarse model."""
    import inference
    from helper import STAGES
    from models import build as builder

    stage = STAGES[args.mode]
    ns = argparse.Namespace(**vars(args), evaluation=True, seed=0)
    builder.check_checkpoints_exist(ns, stage, resuming=False, stages=STAGES.values())
    builder.check_coarse(args)
    model, frozen = builder.build_models(ns, stage, device, stages=STAGES.values())
    coarse = builder.build_coarse(args, device) if args.coarse_to_fine else None
    builder.tune_for_device((model, frozen, coarse), device)
    model.eval()
    if coarse is None:
        return stage, inference.Models(model, frozen), inference.WholeImage()
    return stage, inference.Models(model, frozen), inference.CoarseToFine(coarse, args.size_g, args.global_view)


def check_geometry(path: str, height: int, width: int, size_g: int, size_p: int, view: str) -> None:
    """A patch must cover at least one cell of the global branch's coarsest map (1/32 of
    the global view), or its crop of the global maps is empty (docs/MODEL.md section 4)."""
    from dataset.deep_globe import global_size

    padded = (max(height, size_p), max(width, size_p))
    for side, g in zip(padded, global_size(*padded, size_g, view)):
        cells = g
        for _ in range(5):  # the ResNet's five stride-2 stages
            cells = (cells + 1) // 2
        if round(cells * size_p / side) < 1:
            limit = int(2 * cells * size_p)
            raise UserError(
                f"{path}: {width}x{height} is too large for --size_g {size_g} / --size_p {size_p}: a patch would "
                f"cover no cell of the global branch's coarsest map (sides up to {limit} px work); raise --size_g "
                "(the model then needs training at that size) or tile the image"
            )


def predict_one(path, args, stage, models, predictor, device, classes, inputs: set[str]) -> str:
    """Predict `path` with `predictor` (inference.WholeImage or CoarseToFine) and write its
    outputs; returns the summary line. `inputs`: the real paths of all inputs, which no output
    may replace."""
    from utils import outputs
    from dataset.raster import image_size, open_image

    start = time.perf_counter()
    stem = os.path.splitext(os.path.basename(path))[0]
    paths = outputs.output_paths(args.out, stem, args.format)
    box_path = os.path.join(args.out, stem + outputs.BOX_SUFFIX) if args.coarse_to_fine else None
    for p in [*paths.values(), box_path]:
        if p is not None and os.path.realpath(p) in inputs:
            raise UserError(f"{path}: its output {p} would overwrite the input {p}; choose another --out")
    max_side = args.overlay_size if "overlay" in args.format else None
    if not stage.local_only:  # (the local-only network crops no global maps)
        check_geometry(path, *image_size(path), args.size_g, args.size_p, args.global_view)  # before decoding
    with open_image(path, args.size_g, args.size_p, args.bands, max_side, int(args.faithful_max_mp * 1e6),
                    args.global_view) as src:
        if "geotiff" in args.format and src.georef is None:
            print(f"note: {path} has no georeference: {paths['geotiff']} is a plain TIFF", file=sys.stderr)
        if not src.faithful:
            print(f"note: {path} is above {args.faithful_max_mp:g} MP: its global view is a decimated read "
                  "(not evaluation's PIL resize)", file=sys.stderr)
        spools = {"classes": outputs.Spool(src.height, src.width, args.out)}
        if "confidence" in args.format:
            spools["confidence"] = outputs.Spool(src.height, src.width, args.out)
        try:
            patches, found = _predict_into(src, args, stage, models, predictor, device, spools)
            box = None if found is None else found.box
            _write_outputs(paths, spools, src, args, classes, box)
            if found is not None:
                outputs.write_box_json(box_path, box, found.foreground, (src.width, src.height))
        finally:
            for s in spools.values():
                s.close()
        seconds = time.perf_counter() - start
        written = [*paths.values(), *([box_path] if box_path else [])]
        where = "" if found is None else f", box {list(box) if box else 'none (no foreground)'}"
        return (f"{path}: {src.width}x{src.height}, {patches} patches{where}, {seconds:.1f} s -> "
                + ", ".join(os.path.basename(p) for p in written))


def _predict_into(src, args, stage, models, predictor, device, spools):
    """The main output's strips of `src` into the spools; returns (patches read, the coarse
    box or None)."""
    import torch

    import inference
    from utils.amp import autocast

    settings = inference.Settings.for_device(device, args.size_p, args.sub_batch_size, tta=args.tta,
                                             confidence="confidence" in spools, exact_coverage=src.faithful,
                                             spill_dir=args.out)
    pixels = inference.SourcePixels(src, args.size_p, device, None if args.no_progress else os.path.basename(src.path))
    image_global = src.image_global[None].to(device)
    with autocast(device, args.amp):
        prediction = predictor.predict(stage, models, pixels, image_global, (src.height, src.width), settings,
                                       (stage.main_output,))
        for strip in prediction.strips:
            spools["classes"].write(strip.top, strip.classes.to("cpu", torch.uint8).numpy())
            if strip.confidence is not None:
                spools["confidence"].write(strip.top, strip.confidence.cpu().numpy())
    if not spools["classes"].complete:
        raise RuntimeError(f"{src.path}: the prediction stopped at row {spools['classes'].rows_written}")
    return pixels.patches_read, prediction.coarse


def _write_outputs(paths, spools, src, args, classes, box) -> None:
    """Each asked-for format, streamed from the spools; `box`: drawn on the overlay."""
    from utils import outputs

    palette = classes.palette
    for fmt, p in paths.items():
        if fmt == "index":
            outputs.write_png(p, spools["classes"])
        elif fmt == "color":
            outputs.write_png(p, spools["classes"], palette)
        elif fmt == "confidence":
            outputs.write_png(p, spools["confidence"])
        elif fmt == "geotiff":
            outputs.write_geotiff(p, spools["classes"], src.georef, palette)
        elif fmt == "overlay":
            outputs.write_overlay(p, spools["classes"], src.thumbnail(args.overlay_size), palette, box=box)


def main(args) -> int:
    import torch

    from cli import ensure_writable_dir, get_device
    from utils import dist
    from dataset.raster import limit_gdal_cache

    limit_gdal_cache()
    classes = check_args(args)
    files, errors = find_inputs(args.inputs)
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    if not files:
        raise UserError("no images to predict")
    ensure_writable_dir(args.out, "--out")
    procs = dist.Processes.from_env()
    device = dist.start(procs, get_device(args.device), args.dist_timeout)
    try:
        stage, models, predictor = build(args, device)
        failed = len(errors) if procs.main else 0
        status = 2 if errors else 0
        inputs = {os.path.realpath(f) for f in files}
        for path in files[procs.rank :: procs.world]:
            try:
                print(predict_one(path, args, stage, models, predictor, device, classes, inputs), flush=True)
            except UserError as e:
                print(f"error: {error_message(e)}", file=sys.stderr)
                failed, status = failed + 1, max(status, 2)
            except Exception as e:  # e.g. out of memory, a full disk, a library's error: the next image may work
                if args.debug:
                    traceback.print_exc()
                print(f"error: {path}: {type(e).__name__}: {error_message(e)}", file=sys.stderr)
                failed, status = failed + 1, max(status, 1)
        if procs.active:
            total = dist.sum_(procs, torch.tensor([failed, status == 1], dtype=torch.int64, device=device))
            failed, status = int(total[0]), 1 if total[1] else (2 if total[0] else 0)
        if failed and procs.main:
            print(f"{failed} of {len(files) + len(errors)} inputs not written", file=sys.stderr)
        return status
    finally:
        dist.stop(procs)


def cli(argv=None) -> int:
    return run_command(get_parser, main, argv)


if __name__ == "__main__":
    sys.exit(cli())
