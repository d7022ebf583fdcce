"""Prediction of one image of any size in bounded memory (predict.py).

The same predictions as evaluation (`helper.predict`, GLNET_SPEC sections 4-5, 7), made so
that nothing is held at full resolution for the whole image:
- patches are read from the image by windows, one row of patches at a time;
- patch scores are summed into a band of rows one patch high; the rows above the next row of
  patches are final: their argmax is taken and they leave as a `Strip` at once;
- mode 3's per-patch results that live until the global branch has run (the local half of
  the ensemble conv, n_class channels at 1/4 of the patch) are spilled to a temporary file;
- mode 1 upsamples the global class map row band by row band.
The patches go through the model in the sub-batches evaluation uses, in the same order, so
every score is the same and so is every sum; only the bookkeeping differs.

`--tta` sums 8 flipped/rotated views of the whole image: it runs `helper.predict` on the
whole image (memory grows with the image there).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import helper
from models.glnet import Release, global2local, local2global_collect, local2global_ensemble
from utils.geometry import PatchGrid, add_patch_scores, coverage_counts, resized_coverage
from dataset.raster import ImageSource

STRIP_ROWS = 256  # rows per strip of the mode-1 and --tta outputs


@dataclass
class Strip:
    """Rows top .. top + len(classes) of an image's prediction: class indices (h, W) uint8
    and, if asked for, the top-1 probability (h, W) uint8 (0..255)."""

    top: int
    classes: np.ndarray
    confidence: np.ndarray | None = None


@dataclass(frozen=True)
class Options:
    size_g: int
    size_p: int
    sub_batch: int
    amp: str | None = None
    tta: bool = False
    confidence: bool = False
    progress: bool = True


def _finish(scores: torch.Tensor, stride: int, coverage: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scores (C, h, w) -> class indices (h*stride, w*stride) uint8 and, given the count of
    patches summed at each cell (h, w), the top-1 probability of their mean logits."""
    classes = helper.upsample_canvas(scores.argmax(0), stride).to(torch.uint8)
    conf = None
    if coverage is not None:
        p = torch.softmax(scores.float() / coverage, 0).amax(0)
        conf = helper.upsample_canvas(p.mul(255).round_().to(torch.uint8), stride)
    return classes, conf


def _strip(top: int, classes: torch.Tensor, conf: torch.Tensor | None, height: int, width: int) -> Strip | None:
    """The part of rows top.. that lies in the image (the padding is dropped)."""
    n = min(classes.shape[0], height - top)
    if n <= 0:
        return None
    c = classes[:n, :width].cpu().numpy()
    return Strip(top, c, None if conf is None else conf[:n, :width].cpu().numpy())


class _Band:
    """Score canvas of the rows still open: one patch high (on the cells of `score_grid`),
    all the columns. Patches are added one row of patches at a time; the rows above that
    row's top are then final and leave through `finish`."""

    def __init__(self, n_class: int, sgrid: PatchGrid, device: torch.device) -> None:
        self.sgrid, self.top = sgrid, 0
        self.data = torch.zeros((n_class, sgrid.patch, sgrid.width), dtype=torch.float32, device=device)
        self.counts = coverage_counts(sgrid, device)  # patches per cell row and per cell column

    def coverage(self, top: int, n: int) -> torch.Tensor:
        """(n, width): the number of patches summed at each cell of rows top .. top + n."""
        rows, cols = self.counts
        return rows[top : top + n, None] * cols[None, :]

    def add(self, logits: torch.Tensor, index: list[int]) -> None:
        add_patch_scores(self.data, logits, self.sgrid, index, row0=self.top)

    def finish(self, upto: int) -> torch.Tensor | None:
        """Hand out the rows top .. upto and move the band down to start at `upto`."""
        n = min(upto, self.top + self.data.shape[1]) - self.top
        if n <= 0:
            return None
        out = self.data[:, :n].clone()
        rows = self.data.shape[1]
        for i in range(0, rows - n, n):  # move the open rows up; chunks of n rows never overlap
            c = min(n, rows - n - i)
            self.data[:, i : i + c] = self.data[:, n + i : n + i + c]
        self.data[:, rows - n :] = 0
        self.top = upto
        return out


class _Spill:
    """Per-patch tensors of one shape and dtype written to a temporary file in patch order,
    read back by ranges of patches, bit for bit."""

    def __init__(self, folder: str | None = None) -> None:
        self.file = tempfile.TemporaryFile(dir=folder)
        self.shape: tuple[int, ...] | None = None
        self.dtype: torch.dtype | None = None

    def __call__(self, x: torch.Tensor) -> None:
        x = x.detach().cpu().contiguous()
        if self.shape is None:
            self.shape, self.dtype = tuple(x.shape[1:]), x.dtype
        self.file.write(x.view(torch.uint8).numpy().tobytes())

    def read(self, start: int, n: int, device: torch.device) -> torch.Tensor:
        size = int(np.prod(self.shape)) * self.dtype.itemsize
        self.file.seek(start * size)
        data = bytearray(self.file.read(n * size))
        return torch.frombuffer(data, dtype=self.dtype).reshape(n, *self.shape).to(device)

    def close(self) -> None:
        self.file.close()


class _Patches:
    """The patches of a grid read from the source by rows of patches: (index, patches)
    sub-batches as `helper.patch_batches` makes them from a whole image."""

    def __init__(self, source: ImageSource, grid: PatchGrid, device: torch.device) -> None:
        self.source, self.grid, self.device = source, grid, device
        self.row_top, self.row = None, None

    def crop(self, k: int) -> torch.Tensor:
        t, l, p = self.grid.tops[k], self.grid.lefts[k], self.grid.patch
        if t != self.row_top:
            self.row = None  # drop the previous row of patches before reading the next
            self.row = torch.from_numpy(self.source.read(t, 0, p, self.grid.width)).to(self.device)
            self.row_top = t
        return self.row[:, :, l : l + p]

    def batches(self, sub_batch: int, bar=None) -> Iterator[tuple[list[int], torch.Tensor]]:
        for index in helper.sub_batches(len(self.grid), sub_batch):
            yield index, helper.to_float(torch.stack([self.crop(k) for k in index]))
            if bar is not None:
                bar.update(len(index))
        self.row = None


def _row_groups(grid: PatchGrid, index: list[int]) -> Iterator[list[int]]:
    """`index` (consecutive patches) split where the row of patches changes."""
    start = 0
    for i in range(1, len(index) + 1):
        if i == len(index) or grid.tops[index[i]] != grid.tops[index[start]]:
            yield index[start:i]
            start = i


def _banded(band: _Band, grid: PatchGrid, sgrid: PatchGrid, stride: int, logits: torch.Tensor, index: list[int],
            opts: Options, height: int, width: int) -> Iterator[Strip]:
    """Add the logits of patches `index` to the band, a row of patches at a time, handing
    out the rows that become final."""
    offset = 0
    for group in _row_groups(grid, index):
        yield from _finish_rows(band, sgrid.tops[group[0]], stride, opts, height, width)
        band.add(logits[offset : offset + len(group)], group)
        offset += len(group)


def _finish_rows(band: _Band, upto: int, stride: int, opts: Options, height: int, width: int) -> Iterator[Strip]:
    """The band's rows above `upto` (cells of the score grid), as a strip of the image."""
    top = band.top
    done = band.finish(upto)
    if done is not None:
        coverage = band.coverage(top, done.shape[1]) if opts.confidence else None
        strip = _strip(top * stride, *_finish(done, stride, coverage), height, width)
        if strip is not None:
            yield strip


def _nearest_index(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """The source index of each output position of a legacy 'nearest' resize n_in -> n_out,
    as torch computes it (resizing a ramp)."""
    ramp = torch.arange(n_in, dtype=torch.float32, device=device)[None, None, :, None]
    return F.interpolate(ramp, size=(n_out, 1), mode="nearest")[0, 0, :, 0].long()


def _global_strips(logits: torch.Tensor, shape: tuple[int, int], opts: Options, height: int, width: int) -> Iterator[Strip]:
    """Mode 1: the global logits (1, C, h, w) upsampled 'nearest' to the padded image, as
    `helper.upsample_global`, one band of rows at a time."""
    classes = logits[0].argmax(0).to(torch.uint8)
    conf = None
    if opts.confidence:
        conf = torch.softmax(logits[0].float(), 0).amax(0).mul(255).round_().to(torch.uint8)
    sy = _nearest_index(classes.shape[0], shape[0], logits.device)
    sx = _nearest_index(classes.shape[1], shape[1], logits.device)[:width]
    for top in range(0, height, STRIP_ROWS):
        rows = sy[top : min(top + STRIP_ROWS, height)]
        yield Strip(top, classes[rows][:, sx].cpu().numpy(),
                    None if conf is None else conf[rows][:, sx].cpu().numpy())


def _tta_strips(model, stage, frozen, source: ImageSource, shape, opts: Options, device) -> Iterator[Strip]:
    """--tta: evaluation's `helper.predict` on the whole image."""
    image = torch.from_numpy(source.read(0, 0, *shape)).to(device)
    ig = source.image_global[None].to(device)
    with helper.autocast(device, opts.amp):
        pred = helper.predict(model, stage, image, ig, opts.size_p, opts.sub_batch, frozen, tta=True)[stage.main_output]
    del image
    pred = pred[: source.height, : source.width].to(torch.uint8).cpu().numpy()
    for top in range(0, source.height, STRIP_ROWS):
        yield Strip(top, pred[top : top + STRIP_ROWS])


@torch.no_grad()
def predict_strips(
    model, stage, source: ImageSource, opts: Options, device: torch.device, frozen=None, spill_dir: str | None = None,
    desc: str = "",
) -> Iterator[Strip]:
    """The prediction of `stage`'s main output on `source`, as strips from top to bottom.
    `model` (and `frozen`, mode 3) in eval mode on `device`."""
    height, width = source.height, source.width
    shape = (max(height, opts.size_p), max(width, opts.size_p))  # padded as in section 6
    if opts.tta:
        if opts.confidence:
            raise ValueError("the confidence output is not made with --tta")
        yield from _tta_strips(model, stage, frozen, source, shape, opts, device)
        return
    ig = source.image_global[None].to(device)
    n_class = model.n_class
    if stage.main_output == "global":
        with helper.autocast(device, opts.amp):
            logits = model.global_maps(ig, policy=Release(other=True)).output
        yield from _global_strips(logits, shape, opts, height, width)
        return
    grid = PatchGrid.for_size(*shape, opts.size_p)
    sgrid, stride = helper.score_grid(grid)
    band = _Band(n_class, sgrid, device)
    patches = _Patches(source, grid, device)
    bb = helper.backbone_batch(device)
    passes = 2 if stage.frozen_from else 1
    bar = tqdm(total=len(grid) * passes, desc=desc, unit="patch", disable=not opts.progress, leave=False,
               dynamic_ncols=True)
    try:
        with helper.autocast(device, opts.amp):
            if stage.frozen_from is None:  # mode 2
                glob = model.global_maps(ig)
                for index, x in patches.batches(opts.sub_batch, bar):
                    ens, out, _ = global2local(model, x, glob, grid, index, low_memory=True, backbone_batch=bb)
                    logits = ens if stage.main_output == "aggregated" else out
                    yield from _banded(band, grid, sgrid, stride, logits, index, opts, height, width)
            else:  # mode 3
                yield from _local2global(model, frozen, ig, grid, sgrid, stride, band, patches, bb, opts, device,
                                         source.faithful, spill_dir, bar, height, width)
        yield from _finish_rows(band, sgrid.height, stride, opts, height, width)
    finally:
        bar.close()


def _local2global(model, frozen, ig, grid, sgrid, stride, band, patches, bb, opts, device, exact, spill_dir, bar,
                  height, width) -> Iterator[Strip]:
    """Mode 3 as `helper._scores_local2global`, with the per-patch ensemble halves spilled."""
    fglob = frozen.global_maps(ig)._replace(ps3=None, output=None)
    sizes = {tuple(t.shape[-2:]) for t in fglob.context()}
    coverage = resized_coverage(grid, sizes, device, exact=exact)
    spill = _Spill(spill_dir)
    try:
        lp = local2global_collect(model, fglob, patches.batches(opts.sub_batch, bar), grid, coverage,
                                  keep="ensemble_local", backbone_batch=bb, keep_outputs=False, spill=spill)
        del fglob, coverage
        context = lp.context
        del lp
        glob = model.global_maps(ig, context, Release(other=True))
        del context
        for index in helper.sub_batches(len(grid), bb or opts.sub_batch):
            local = spill.read(index[0], len(index), device)
            ens = local2global_ensemble(model, glob.ps3, grid, index, ensemble_local=local)
            bar.update(len(index))
            yield from _banded(band, grid, sgrid, stride, ens, index, opts, height, width)
    finally:
        spill.close()
