"""Inference of every stage, written once (docs/MODEL.md sections 4, 5 and 7): evaluation
(`engine.evaluate`) and predict.py call the same code.

- A stage's scoring function (its row of `helper.STAGES` names it: `score_global`,
  `score_global2local`, `score_local2global`, `score_local`) runs the models on one image and yields its
  scores as they are made: `GlobalScores` (the global view's logits) and `PatchScores` (one
  output's logits for some patches). It reads the patches from the image's pixels:
  `ImagePixels` (a decoded uint8 tensor) or `SourcePixels` (a `dataset.raster.ImageSource` read by
  rows of patches).
- A sink sums them: `Canvases` holds whole score canvases (`whole_scores`: the TTA views,
  tests), `Bands` one band of rows per output, one patch high, whose rows leave as `Strip`s of
  class indices as soon as no later patch can add to them (`predict_strips`: evaluation
  without TTA and predict.py). Both sum the same logits in the same order: the same scores.
- `tta_class_maps` wraps any function (image, global image) -> Scores: the 8 flips/rotations,
  each undone, the scores summed (section 7).
- How an image is predicted is a plain object with one method, `predict` (-> `Prediction`):
  `WholeImage` (the stage on the whole image, `predict_strips`) or `CoarseToFine` (section 9:
  a mode-1 model's foreground box, the stage on the box's crop, class 0 elsewhere).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from dataset.deep_globe import image_views
from models.glnet import (
    FreeMaps, GLNet, LocalCanvases, ensemble_local_half, ensemble_with_global,
)
from utils.boxes import Box, relax_box, tight_box
from utils.geometry import PatchGrid, add_patch_scores, coverage_counts, crop_global, resized_coverage

STRIP_ROWS = 256  # rows per strip of the global output


# ----------------------------------------------------------------------------- patches

def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1] (ToTensor, no normalisation)."""
    return x.float().div_(255)


def sub_batches(n: int, size: int) -> Iterator[list[int]]:
    for start in range(0, n, size):
        yield list(range(start, min(start + size, n)))


def patch_batches(image: torch.Tensor, grid: PatchGrid, sub_batch: int) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(index, patches) sub-batches: exact crops of a (3, H, W) uint8 image, as float."""
    p = grid.patch
    for index in sub_batches(len(grid), sub_batch):
        crops = [image[:, t : t + p, l : l + p] for t, l in ((grid.tops[k], grid.lefts[k]) for k in index)]
        yield index, to_float(torch.stack(crops))


def backbone_batch(device: torch.device) -> int | None:
    """Patches per local ResNet call in inference. On the CPU one at a time: faster (6
    patches of 508 px: 1.64 s one by one against 2.69 s as a batch of 6, 2 threads,
    measured on the development machine), the ResNet's activations are those of one patch,
    and at 508 px the maps are bitwise those of a batch (checked there; at other sizes
    oneDNN may pick kernels that round differently, ~1e-6). Elsewhere the whole sub-batch
    (GPUs gain from batching)."""
    return 1 if device.type == "cpu" else None


class ImagePixels:
    """The patches of a decoded image: uint8 (3, H, W) on the device, already padded to at
    least a patch per side (`dataset.deep_globe.image_views`). `patches_read` counts them."""

    faithful = True  # (its global view is evaluation's: see SourcePixels)

    def __init__(self, image: torch.Tensor) -> None:
        self.image, self.device = image, image.device
        self.shape = tuple(image.shape[-2:])
        self.patches_read = 0

    def batches(self, grid: PatchGrid, sub_batch: int) -> Iterator[tuple[list[int], torch.Tensor]]:
        for index, patches in patch_batches(self.image, grid, sub_batch):
            self.patches_read += len(index)
            yield index, patches

    def whole(self) -> torch.Tensor:
        return self.image

    def crop(self, box: Box, size_g: int, size_p: int, view: str) -> tuple["ImagePixels", torch.Tensor]:
        """The pixels of `box` (inside the unpadded image) as an image of the box's size, and
        its global view (1, 3, h, w): `dataset.deep_globe.image_views` of the crop, as
        evaluation makes them of an image."""
        x0, y0, x1, y1 = box
        crop = self.image[:, y0:y1, x0:x1].permute(1, 2, 0).cpu().numpy()
        views = image_views(Image.fromarray(crop), size_g, size_p, view)
        return ImagePixels(views["image"].to(self.device)), views["image_global"][None].to(self.device)


class SourcePixels:
    """The patches of an `ImageSource` (predict.py), read a row of patches at a time (only
    that row is in memory), zero-padded to at least `size_p` per side as evaluation pads.
    `desc`: a progress bar over the patches read, with this label; `patches_read` counts them."""

    def __init__(self, source, size_p: int, device: torch.device, desc: str | None = None) -> None:
        self.source, self.device, self.desc = source, device, desc
        self.shape = (max(source.height, size_p), max(source.width, size_p))
        self.faithful = source.faithful  # its global view is evaluation's
        self.patches_read = 0

    def batches(self, grid: PatchGrid, sub_batch: int) -> Iterator[tuple[list[int], torch.Tensor]]:
        p, row_top, row = grid.patch, None, None
        bar = tqdm(total=len(grid), desc=self.desc, unit="patch", leave=False, dynamic_ncols=True,
                   disable=self.desc is None)
        try:
            for index in sub_batches(len(grid), sub_batch):
                crops = []
                for k in index:
                    if grid.tops[k] != row_top:
                        row = None  # drop the previous row of patches before reading the next
                        row_top = grid.tops[k]
                        row = torch.from_numpy(self.source.read(row_top, 0, p, grid.width)).to(self.device)
                    crops.append(row[:, :, grid.lefts[k] : grid.lefts[k] + p])
                self.patches_read += len(index)
                yield index, to_float(torch.stack(crops))
                bar.update(len(index))
        finally:
            bar.close()

    def whole(self) -> torch.Tensor:
        """The padded image (3, H, W) uint8 on the device (--tta needs it whole)."""
        return torch.from_numpy(self.source.read(0, 0, *self.shape)).to(self.device)

    def crop(self, box: Box, size_g: int, size_p: int, view: str) -> tuple["SourcePixels", torch.Tensor]:
        """The pixels of `box` as an image of the box's size (`ImageSource.window`: only the
        box's window of the file is read), and its global view (1, 3, h, w)."""
        window = self.source.window(box, size_g, size_p, view)
        return SourcePixels(window, size_p, self.device, self.desc), window.image_global[None].to(self.device)


class Inputs(NamedTuple):
    """One image as a scoring function sees it: its pixels, its global view (1, 3, h, w) float
    on the device, and the patch grid over the (padded) pixels."""

    pixels: ImagePixels | SourcePixels
    image_global: torch.Tensor
    grid: PatchGrid

    @classmethod
    def of(cls, pixels: ImagePixels | SourcePixels, image_global: torch.Tensor, size_p: int) -> "Inputs":
        return cls(pixels, image_global, PatchGrid.for_size(*pixels.shape, size_p))


class Models(NamedTuple):
    """The model evaluated, and mode 3's frozen global model (None elsewhere); in eval mode."""

    model: GLNet
    frozen: GLNet | None = None


@dataclass(frozen=True)
class Settings:
    """How one image is predicted (the result does not depend on them, unless said)."""

    size_p: int
    sub_batch: int  # patches read and put through the local branch together
    backbone_batch: int | None = None  # patches per local ResNet call (`backbone_batch`); None: the sub-batch
    tta: bool = False  # the 8 flips/rotations, scores summed (changes the result)
    confidence: bool = False  # strips also carry the top-1 probability
    # mode 3: the coverage template resized from the full-resolution one (evaluation's values);
    # False: from its row and column counts, up to float rounding (predict.py above 32 MP)
    exact_coverage: bool = True
    spill_dir: str | None = None  # mode 3: the per-patch ensemble halves in a temporary file there (None: in memory)

    @classmethod
    def for_device(cls, device: torch.device, size_p: int, sub_batch: int, **kwargs) -> "Settings":
        return cls(size_p, sub_batch, backbone_batch(device), **kwargs)


# ----------------------------------------------------------------------------- scoring functions

class GlobalScores(NamedTuple):
    """The global view's logits (1, C, size_g/4, size_g/4): the output "global"."""

    logits: torch.Tensor


class PatchScores(NamedTuple):
    """One output's logits (n, C, p/4, p/4) for patches `index` of the grid."""

    output: str  # "local" or "aggregated"
    logits: torch.Tensor
    index: list[int]


Scored = GlobalScores | PatchScores


def score_global(models: Models, inputs: Inputs, settings: Settings) -> Iterator[Scored]:
    """Mode 1: the global logits alone."""
    yield GlobalScores(models.model.global_maps(inputs.image_global, policy=FreeMaps()).output)


def score_global2local(models: Models, inputs: Inputs, settings: Settings) -> Iterator[Scored]:
    """Mode 2: the model's global maps as context of its local branch, patch by patch (section 5)."""
    model, grid = models.model, inputs.grid
    glob = model.global_maps(inputs.image_global)  # all kept: every patch crops them
    yield GlobalScores(glob.output)
    for index, patches in inputs.pixels.batches(grid, settings.sub_batch):
        local, aggregated = [], []
        for k, ps3, logits in model.local_patches(patches, glob, grid, index, None, settings.backbone_batch):
            global_crop = crop_global(glob.ps3, grid, [k], ps3.shape[-2:])
            aggregated.append(model.ensemble(ps3, global_crop))
            local.append(logits)
            del ps3, global_crop
        yield PatchScores("local", torch.cat(local), index)
        yield PatchScores("aggregated", torch.cat(aggregated), index)


def score_local(models: Models, inputs: Inputs, settings: Settings) -> Iterator[Scored]:
    """Local only (`models.glnet.LocalOnly`): each patch's logits, no global view (section 9)."""
    model, grid = models.model, inputs.grid
    for index, patches in inputs.pixels.batches(grid, settings.sub_batch):
        yield PatchScores("local", torch.cat(list(model.patch_logits(patches, settings.backbone_batch))), index)


class KeptHalves:
    """Per-patch tensors kept in memory in patch order, read back by ranges of patches."""

    def __init__(self) -> None:
        self.items: list[torch.Tensor] = []

    def append(self, x: torch.Tensor) -> None:
        self.items.append(x)

    def read(self, start: int, n: int, device: torch.device) -> torch.Tensor:
        return torch.cat(self.items[start : start + n]).to(device)

    def close(self) -> None:
        self.items = []


class SpilledHalves:
    """Per-patch tensors of one shape and dtype written to a temporary file in patch order,
    read back by ranges of patches, bit for bit."""

    def __init__(self, folder: str | None = None) -> None:
        self.file = tempfile.TemporaryFile(dir=folder)
        self.shape: tuple[int, ...] | None = None
        self.dtype: torch.dtype | None = None

    def append(self, x: torch.Tensor) -> None:
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


def score_local2global(models: Models, inputs: Inputs, settings: Settings) -> Iterator[Scored]:
    """Mode 3: the frozen global model's maps as context of the local branch, whose maps,
    merged over the patches, are the context of the model's global branch (section 5).

    1. the local branch runs patch by patch; each patch's maps are merged into the canvases
       as soon as the FPN is done with them, its logits leave as the local scores, and of its
       ps3 only the local half of the ensemble conv is kept (n_class channels, not 512);
    2. the global branch runs with the merged canvases, freeing each level of both once used;
    3. per patch the ensemble's global half on a crop of the global ps3 completes the
       aggregated scores."""
    model, frozen, grid = models.model, models.frozen, inputs.grid
    if frozen is None:
        raise ValueError("mode 3 needs the frozen global model")
    device = inputs.image_global.device
    # only the frozen maps shared with the local branch are needed (not its ps3 and logits)
    frozen_glob = frozen.global_maps(inputs.image_global)._replace(ps3=None, output=None)
    sizes = {tuple(t.shape[-2:]) for t in frozen_glob.context()}
    coverage = resized_coverage(grid, sizes, device, exact=settings.exact_coverage)
    canvases = LocalCanvases(frozen_glob)
    halves = SpilledHalves(settings.spill_dir) if settings.spill_dir else KeptHalves()
    try:
        for index, patches in inputs.pixels.batches(grid, settings.sub_batch):
            local = []
            for k, ps3, logits in model.local_patches(patches, frozen_glob, grid, index, canvases,
                                                      settings.backbone_batch):
                halves.append(ensemble_local_half(model, ps3))
                local.append(logits)
                del ps3
            yield PatchScores("local", torch.cat(local), index)
        # the last sub-batch's patches and logits would otherwise live through the global branch
        del patches, local, logits, frozen_glob
        context = canvases.finish(coverage)
        del canvases, coverage
        glob = model.global_maps(inputs.image_global, context, FreeMaps(context=True))
        del context
        yield GlobalScores(glob.output)
        # the crops of the global ps3 (512 channels at the patch's 1/4) are the largest maps
        # here: on the CPU one patch at a time, like the local ResNet
        for index in sub_batches(len(grid), settings.backbone_batch or settings.sub_batch):
            local_half = halves.read(index[0], len(index), device)
            yield PatchScores("aggregated", ensemble_with_global(model, local_half, glob.ps3, grid, index), index)
    finally:
        halves.close()


# ----------------------------------------------------------------------------- whole canvases

class Scores(NamedTuple):
    """Class scores of one image: global logits at 1/4 of size_g (None for the local-only
    stage), and the local and aggregated patch logits reassembled into (C, H/stride,
    W/stride) canvases."""

    global_: torch.Tensor | None
    local: torch.Tensor | None
    aggregated: torch.Tensor | None
    stride: int = 1


def score_grid(grid: PatchGrid, factor: int = 4) -> tuple[PatchGrid, int]:
    """The grid on which patch logits (at 1/4 of the patch) are summed, and its stride.

    The original resizes each patch's logits 'nearest' x4 and sums them at full
    resolution, so its canvas is constant on s x s cells whenever the patch size is a
    multiple of 4 and every start a multiple of s. We sum on those cells (s = 4 for
    DeepGlobe 2448/508, starts 0, 388, ..., 1940; s = 2 for 1224/508, starts 0, 358,
    716): the very same sums with s*s times less memory and work, and the argmax is
    repeated. Otherwise we sum at full resolution.
    """
    if grid.patch % factor:
        return grid, 1
    for s in range(factor, 1, -1):
        if factor % s or any(t % s for t in grid.row_starts + grid.col_starts):
            continue
        small = PatchGrid(
            grid.height // s, grid.width // s, grid.patch // s,
            tuple(t // s for t in grid.row_starts), tuple(t // s for t in grid.col_starts),
        )
        return small, s
    return grid, 1


def upsample_canvas(x: torch.Tensor, stride: int) -> torch.Tensor:
    """Repeat each cell stride x stride times (the same as 'nearest' by an integer factor)."""
    if stride == 1:
        return x
    return x.repeat_interleave(stride, dim=-2).repeat_interleave(stride, dim=-1)


def upsample_global(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Global logits (1, C, h, w) -> (C, H, W) with legacy 'nearest' (section 7)."""
    return F.interpolate(logits, size=tuple(size), mode="nearest")[0]


class Canvases:
    """Sink of whole score canvases: the global logits, and per patch output a float32
    canvas (C, H/s, W/s) on the cells of `score_grid` into which patch logits are summed."""

    def __init__(self, grid: PatchGrid) -> None:
        self.sgrid, self.stride = score_grid(grid)
        self.global_: torch.Tensor | None = None
        self.canvases: dict[str, torch.Tensor] = {}

    def add(self, part: Scored) -> None:
        if isinstance(part, GlobalScores):
            self.global_ = part.logits
            return
        canvas = self.canvases.get(part.output)
        if canvas is None:
            shape = (part.logits.shape[1], self.sgrid.height, self.sgrid.width)
            canvas = self.canvases[part.output] = torch.zeros(shape, dtype=torch.float32, device=part.logits.device)
        add_patch_scores(canvas, part.logits, self.sgrid, part.index)

    def scores(self) -> Scores:
        stride = self.stride if self.canvases else 1
        return Scores(self.global_, self.canvases.get("local"), self.canvases.get("aggregated"), stride)


@torch.no_grad()
def whole_scores(stage, models: Models, inputs: Inputs, settings: Settings) -> Scores:
    """The scores of one image in whole canvases: `stage.scores` into `Canvases`."""
    sink = Canvases(inputs.grid)
    for part in stage.scores(models, inputs, settings):
        sink.add(part)
    return sink.scores()


def class_maps(scores: Scores, size: Sequence[int]) -> dict[str, torch.Tensor]:
    """Class maps (H, W) int64 of each output of `scores` (`size`: the padded image's)."""
    # argmax commutes with nearest upsampling: argmax at 1/4, then upsample the indices
    out = {}
    if scores.global_ is not None:
        out["global"] = upsample_global(scores.global_.argmax(1, keepdim=True).float(), size)[0].long()
    for name in ("local", "aggregated"):
        canvas = getattr(scores, name)
        if canvas is not None:
            out[name] = upsample_canvas(canvas.argmax(0), scores.stride)
    return out


def dihedral(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """One of the 8 flips/rotations of the last two dims: horizontal flip, then k x 90 degrees."""
    if flip:
        x = x.flip(-1)
    return torch.rot90(x, k, dims=(-2, -1))


def undo_dihedral(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    x = torch.rot90(x, -k, dims=(-2, -1))
    return x.flip(-1) if flip else x


def tta_class_maps(
    score: Callable[[torch.Tensor, torch.Tensor], Scores], image: torch.Tensor, image_global: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Test-time augmentation around `score` (image, global image) -> Scores: each of the 8
    flips/rotations of the image (and of the global image) is scored, its scores upsampled
    to full resolution and the view undone; the class maps are the argmax of the sums."""
    total: dict[str, torch.Tensor] = {}
    for flip in (False, True):
        for k in range(4):
            view = dihedral(image, k, flip)
            s = score(view, dihedral(image_global, k, flip))
            parts = {} if s.global_ is None else {"global": upsample_global(s.global_, view.shape[-2:])}
            for name in ("local", "aggregated"):
                if getattr(s, name) is not None:
                    parts[name] = upsample_canvas(getattr(s, name), s.stride)
            for name, part in parts.items():
                v = undo_dihedral(part, k, flip)
                total[name] = v if name not in total else total[name] + v
    return {name: v.argmax(0) for name, v in total.items()}


def predict(stage, models: Models, pixels: ImagePixels | SourcePixels, image_global: torch.Tensor,
            settings: Settings) -> dict[str, torch.Tensor]:
    """Class maps (H, W) int64 of one image (its global view: (1, 3, h, w) on the device),
    for each output of `stage`, from whole score canvases; with settings.tta, over the 8
    flips/rotations of the whole image (whose patches then count in `pixels.patches_read`)."""
    if not settings.tta:
        scores = whole_scores(stage, models, Inputs.of(pixels, image_global, settings.size_p), settings)
        return class_maps(scores, pixels.shape)

    def score(view: torch.Tensor, view_global: torch.Tensor) -> Scores:
        view_pixels = ImagePixels(view)
        scores = whole_scores(stage, models, Inputs.of(view_pixels, view_global, settings.size_p), settings)
        pixels.patches_read += view_pixels.patches_read
        return scores

    return tta_class_maps(score, pixels.whole(), image_global)


# ----------------------------------------------------------------------------- bands of rows

class Strip(NamedTuple):
    """Rows top .. top + n of one output's prediction, cropped to the image (no padding):
    class indices (n, W) int64 on the device and, if asked for, the top-1 probability
    (n, W) uint8 (0..255)."""

    output: str
    top: int
    classes: torch.Tensor
    confidence: torch.Tensor | None = None


class _Band:
    """Score canvas of one output's rows still open: one patch high (on the cells of
    `score_grid`), all the columns, starting at cell row `top`."""

    def __init__(self, n_class: int, sgrid: PatchGrid, device: torch.device) -> None:
        self.sgrid, self.top = sgrid, 0
        self.data = torch.zeros((n_class, sgrid.patch, sgrid.width), dtype=torch.float32, device=device)

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


def _row_groups(grid: PatchGrid, index: list[int]) -> Iterator[list[int]]:
    """`index` (consecutive patches) split where the row of patches changes."""
    start = 0
    for i in range(1, len(index) + 1):
        if i == len(index) or grid.tops[index[i]] != grid.tops[index[start]]:
            yield index[start:i]
            start = i


def _nearest_index(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """The source index of each output position of a legacy 'nearest' resize n_in -> n_out,
    as torch computes it (resizing a ramp)."""
    ramp = torch.arange(n_in, dtype=torch.float32, device=device)[None, None, :, None]
    return F.interpolate(ramp, size=(n_out, 1), mode="nearest")[0, 0, :, 0].long()


def _probability(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 softmax probability over dim 0, as uint8 0..255."""
    return torch.softmax(logits.float(), 0).amax(0).mul(255).round_().to(torch.uint8)


class Bands:
    """Sink of score bands: per output of `outputs` a `_Band`; the scores of other outputs
    are dropped. Patches come a row of patches at a time (top to bottom): when a row of
    patches is about to be added, the rows above its top are final and leave as `Strip`s
    (argmax, optional confidence); after an output's last patch, all its rows leave and its
    band is freed. `size`: the image's (height, width) without padding."""

    def __init__(self, grid: PatchGrid, size: Sequence[int], outputs: Sequence[str], confidence: bool = False) -> None:
        self.grid, self.outputs, self.confidence = grid, tuple(outputs), confidence
        self.height, self.width = size
        self.sgrid, self.stride = score_grid(grid)
        self.bands: dict[str, _Band] = {}
        self.counts = None  # patches per cell row and column (the confidence is of their mean logits)

    def add(self, part: Scored) -> Iterable[Strip]:
        """Add `part`; returns the strips that became final (for the global output, lazily:
        they are cut from its small logits as they are read)."""
        if isinstance(part, GlobalScores):
            return self._global_strips(part.logits) if "global" in self.outputs else ()
        if part.output not in self.outputs:
            return ()
        band = self.bands.get(part.output)
        if band is None:
            band = self.bands[part.output] = _Band(part.logits.shape[1], self.sgrid, part.logits.device)
        strips, offset = [], 0
        for group in _row_groups(self.grid, part.index):
            strips += self._finish_rows(part.output, band, self.sgrid.tops[group[0]])
            band.add(part.logits[offset : offset + len(group)], group)
            offset += len(group)
        if part.index[-1] == len(self.grid) - 1:  # the output's last patch: its band is done
            strips += self._finish_rows(part.output, self.bands.pop(part.output), self.sgrid.height)
        return strips

    def close(self) -> list[Strip]:
        """The rows still open, of every output."""
        strips = []
        for name, band in self.bands.items():
            strips += self._finish_rows(name, band, self.sgrid.height)
        return strips

    def _finish_rows(self, name: str, band: _Band, upto: int) -> list[Strip]:
        """The band's rows above cell row `upto`, as a strip of the image (padding dropped)."""
        top = band.top
        scores = band.finish(upto)
        n = 0 if scores is None else min(scores.shape[1] * self.stride, self.height - top * self.stride)
        if n <= 0:
            return []
        classes = upsample_canvas(scores.argmax(0), self.stride)[:n, : self.width]
        conf = None
        if self.confidence:
            if self.counts is None:
                self.counts = coverage_counts(self.sgrid, scores.device)
            rows, cols = self.counts
            coverage = rows[top : top + scores.shape[1], None] * cols[None, :]
            conf = upsample_canvas(_probability(scores / coverage), self.stride)[:n, : self.width]
        return [Strip(name, top * self.stride, classes, conf)]

    def _global_strips(self, logits: torch.Tensor) -> Iterator[Strip]:
        """The global logits (1, C, h, w) upsampled 'nearest' to the padded image as
        `upsample_global` does, then argmax, STRIP_ROWS rows at a time."""
        classes = logits[0].argmax(0)
        conf = _probability(logits[0]) if self.confidence else None
        sy = _nearest_index(classes.shape[0], self.grid.height, logits.device)
        sx = _nearest_index(classes.shape[1], self.grid.width, logits.device)[: self.width]
        for top in range(0, self.height, STRIP_ROWS):
            rows = sy[top : min(top + STRIP_ROWS, self.height)]
            yield Strip("global", top, classes[rows][:, sx], None if conf is None else conf[rows][:, sx])


@torch.no_grad()
def predict_strips(
    stage, models: Models, pixels: ImagePixels | SourcePixels, image_global: torch.Tensor, size: Sequence[int],
    settings: Settings, outputs: Sequence[str],
) -> Iterator[Strip]:
    """The prediction of `outputs` of one image as strips of rows, each output's from top to
    bottom (the outputs' strips interleaved): `stage.scores` into `Bands`, so that at most a
    band of rows one patch high is held per output. `size`: the image's (height, width)
    without padding. With settings.tta the whole image is read and scored over the 8
    views (`predict`): one strip per output."""
    if settings.tta:
        if settings.confidence:
            raise ValueError("the confidence output is not made with --tta")
        maps = predict(stage, models, pixels, image_global, settings)
        for name in outputs:
            yield Strip(name, 0, maps.pop(name)[: size[0], : size[1]])
        return
    inputs = Inputs.of(pixels, image_global, settings.size_p)
    sink = Bands(inputs.grid, size, outputs, settings.confidence)
    for part in stage.scores(models, inputs, settings):
        yield from sink.add(part)
    yield from sink.close()


# ----------------------------------------------------------------------------- how an image is predicted

class CoarseBox(NamedTuple):
    """What the coarse pass of `CoarseToFine` found: the box the fine stage ran on (None: no
    foreground, the whole image is class 0) and the coarse foreground's pixel count A."""

    box: Box | None
    foreground: int


class Prediction(NamedTuple):
    """One image's prediction: its `Strip`s (each output's from top to bottom, the outputs'
    interleaved), made as they are read; and, with coarse-to-fine, the box (None otherwise)."""

    strips: Iterator[Strip]
    coarse: CoarseBox | None = None


class WholeImage:
    """Plain inference: the stage on the whole image (`predict_strips`)."""

    def predict(self, stage, models: Models, pixels: ImagePixels | SourcePixels, image_global: torch.Tensor,
                size: Sequence[int], settings: Settings, outputs: Sequence[str]) -> Prediction:
        return Prediction(predict_strips(stage, models, pixels, image_global, size, settings, outputs))


class _Scoring(NamedTuple):
    """What `predict_strips` reads of a stage: its scoring function."""

    scores: Callable


COARSE = _Scoring(score_global)  # the coarse pass: mode 1's scoring, the global view alone


@torch.no_grad()
def coarse_box(coarse: GLNet, pixels: ImagePixels | SourcePixels, image_global: torch.Tensor, size: Sequence[int],
               settings: Settings) -> CoarseBox:
    """The coarse pass of section 9: `coarse` (a mode-1 model) predicts the whole image as
    mode-1 evaluation does (its logits resized to the image, argmax; with settings.tta over
    the 8 views), and the foreground (every class but 0) gives the box of
    `utils.boxes.foreground_box`. The class map is read as strips of rows: only the tight
    box of each strip's foreground and their count are kept, never the whole mask."""
    height, width = size
    tight, area = None, 0
    plain = replace(settings, confidence=False)
    for strip in predict_strips(COARSE, Models(coarse), pixels, image_global, size, plain, ("global",)):
        part, n = tight_box(strip.classes != 0)
        if part is None:
            continue
        part = Box(part.x0, part.y0 + strip.top, part.x1, part.y1 + strip.top)
        tight = part if tight is None else Box(min(tight.x0, part.x0), min(tight.y0, part.y0),
                                               max(tight.x1, part.x1), max(tight.y1, part.y1))
        area += n
    if tight is None:
        return CoarseBox(None, 0)
    return CoarseBox(relax_box(tight, area, (width, height), settings.size_p), area)


def _background(output: str, top: int, bottom: int, width: int, confidence: bool,
                device: torch.device) -> Iterator[Strip]:
    """Rows top .. bottom of class 0 (confidence 255: class 0 by the rule), STRIP_ROWS at a time."""
    for start in range(top, bottom, STRIP_ROWS):
        n = min(STRIP_ROWS, bottom - start)
        conf = torch.full((n, width), 255, dtype=torch.uint8, device=device) if confidence else None
        yield Strip(output, start, torch.zeros((n, width), dtype=torch.int64, device=device), conf)


def _placed(strip: Strip, box: Box, width: int) -> Strip:
    """A strip of the box's crop as the same rows of the whole image: class 0 (confidence 255)
    left and right of the box."""
    n, device = strip.classes.shape[0], strip.classes.device
    classes = torch.zeros((n, width), dtype=strip.classes.dtype, device=device)
    classes[:, box.x0 : box.x1] = strip.classes
    conf = None
    if strip.confidence is not None:
        conf = torch.full((n, width), 255, dtype=torch.uint8, device=device)
        conf[:, box.x0 : box.x1] = strip.confidence
    return Strip(strip.output, box.y0 + strip.top, classes, conf)


@dataclass(frozen=True)
class CoarseToFine:
    """The coarse-to-fine GLNet (docs/MODEL.md section 9) around any stage: `coarse_box` with
    the mode-1 model `coarse`; the stage then predicts the box's crop of the full-resolution
    image exactly as it would an image of that size (its pixels read from the box alone, its
    own global view: `size_g` and `global_view` as the run's); outside the box, class 0. No
    foreground: the whole image is class 0 and the stage does not run."""

    coarse: GLNet
    size_g: int
    global_view: str = "square"

    def predict(self, stage, models: Models, pixels: ImagePixels | SourcePixels, image_global: torch.Tensor,
                size: Sequence[int], settings: Settings, outputs: Sequence[str]) -> Prediction:
        """The box is found at once; the strips are made as they are read."""
        found = coarse_box(self.coarse, pixels, image_global, size, settings)
        return Prediction(self._strips(stage, models, pixels, size, settings, outputs, found.box), found)

    def _strips(self, stage, models: Models, pixels: ImagePixels | SourcePixels, size: Sequence[int],
                settings: Settings, outputs: Sequence[str], box: Box | None) -> Iterator[Strip]:
        height, width = size
        device = pixels.device
        if box is None:
            for name in outputs:
                yield from _background(name, 0, height, width, settings.confidence, device)
            return
        crop, crop_global = pixels.crop(box, self.size_g, settings.size_p, self.global_view)
        # the crop's coverage template as predict.py would make it for a file of the crop's size
        fine = replace(settings, exact_coverage=settings.exact_coverage or crop.faithful)
        for name in outputs:
            yield from _background(name, 0, box.y0, width, settings.confidence, device)
        for strip in predict_strips(stage, models, crop, crop_global, (box.height, box.width), fine, outputs):
            yield _placed(strip, box, width)
            if strip.top + strip.classes.shape[0] == box.height:  # the output's last rows of the box
                yield from _background(strip.output, box.y1, height, width, settings.confidence, device)
        pixels.patches_read += crop.patches_read
