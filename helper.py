"""Training and evaluation of the three GLNet modes (GLNET_SPEC.md sections 5-7).

mode 1: global branch alone; mode 2 (global2local): local branch trained with the
frozen global branch; mode 3 (local2global): global branch retrained with the
frozen local branch and a frozen global model for the local branch's context.

Everything per image (patches, canvases, confusion matrices) stays on the model's
device; patches are sliced from the decoded uint8 image and run in sub-batches.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from dataset.classes import colorize
from models.glnet import GLNet, Maps, Release, global2local, local2global_collect, local2global_ensemble
from utils.geometry import PatchGrid, add_patch_scores, coverage_template
from utils.loss import focal_loss
from utils.lr_scheduler import poly_lr, set_lr
from utils.metrics import ConfusionMatrix

# Parts trained in each mode (section 6); the others are frozen.
TRAINED_PARTS = {
    1: ("resnet_global", "fpn_global", "ensemble_conv"),
    2: ("resnet_local", "fpn_local", "ensemble_conv"),
    3: ("resnet_global", "fpn_global", "ensemble_conv"),
}
PARTS = ("resnet_global", "resnet_local", "fpn_global", "fpn_local", "ensemble_conv")
# The outputs each mode produces, and the one written as its prediction.
OUTPUTS = {1: ("global",), 2: ("global", "local", "aggregated"), 3: ("global", "local", "aggregated")}
MAIN_OUTPUT = {1: "global", 2: "aggregated", 3: "aggregated"}


# ----------------------------------------------------------------------------- stages

def configure_stage(model: GLNet, mode: int) -> list[torch.nn.Parameter]:
    """Freeze what `mode` does not train (requires_grad False); return the trainable parameters."""
    params = []
    for name in PARTS:
        trained = name in TRAINED_PARTS[mode]
        for p in getattr(model, name).parameters():
            p.requires_grad_(trained)
            if trained:
                params.append(p)
    return params


def set_train_mode(model: GLNet, mode: int) -> None:
    """Trained parts in train mode; frozen parts (BatchNorm included) in eval mode."""
    model.train()
    for name in PARTS:
        if name not in TRAINED_PARTS[mode]:
            getattr(model, name).eval()


def make_optimizer(params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, weight_decay=5e-4)


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str | None):
    """torch.autocast for --amp bf16/fp16, or nothing (fp32, the default)."""
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def _backward(loss: torch.Tensor, scaler=None) -> None:
    (scaler.scale(loss) if scaler is not None else loss).backward()


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


def patch_labels(label: torch.Tensor, grid: PatchGrid, index: Sequence[int]) -> torch.Tensor:
    """Label crops of the patches, resized to p/4 with PIL-NEAREST ('nearest-exact'): int64."""
    p = grid.patch
    crops = torch.stack([label[t : t + p, l : l + p] for t, l in ((grid.tops[k], grid.lefts[k]) for k in index)])
    small = F.interpolate(crops[:, None].float(), size=(p // 4, p // 4), mode="nearest-exact")
    return small[:, 0].long()


# ----------------------------------------------------------------------------- inference

class Scores(NamedTuple):
    """Class scores of one image: global logits at 1/4 of size_g, and the local and
    aggregated patch logits reassembled into (C, H/stride, W/stride) canvases."""

    global_: torch.Tensor
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


def backbone_batch(device: torch.device) -> int | None:
    """Patches per local ResNet call in inference. On the CPU one at a time: faster (6
    patches of 508 px: 1.64 s one by one against 2.69 s as a batch of 6, 2 threads,
    measured on the development machine), the ResNet's activations are those of one patch,
    and at 508 px the maps are bitwise those of a batch (checked there; at other sizes
    oneDNN may pick kernels that round differently, ~1e-6). Elsewhere the whole sub-batch
    (GPUs gain from batching)."""
    return 1 if device.type == "cpu" else None


@torch.no_grad()
def predict_scores(
    model: GLNet,
    mode: int,
    image: torch.Tensor,
    image_global: torch.Tensor,
    size_p: int,
    sub_batch: int,
    frozen: GLNet | None = None,
) -> Scores:
    """Scores of one image: `image` (3, H, W) uint8 and `image_global` (1, 3, g, g) float,
    both on the model's device. mode 3 needs `frozen`, the frozen global model."""
    if mode == 1:
        return Scores(model.global_maps(image_global, policy=Release(other=True)).output, None, None)
    h, w = image.shape[-2:]
    grid = PatchGrid.for_size(h, w, size_p)
    sgrid, stride = score_grid(grid)
    n_class = model.ensemble_conv.out_channels
    local = image_global.new_zeros((n_class, sgrid.height, sgrid.width), dtype=torch.float32)
    aggregated = torch.zeros_like(local)
    bb = backbone_batch(image.device)
    if mode == 2:
        glob = model.global_maps(image_global)
        for index, patches in patch_batches(image, grid, sub_batch):
            ens, out, _ = global2local(model, patches, glob, grid, index, low_memory=True, backbone_batch=bb)
            add_patch_scores(local, out, sgrid, index)
            add_patch_scores(aggregated, ens, sgrid, index)
        return Scores(glob.output, local, aggregated, stride)
    if frozen is None:
        raise ValueError("mode 3 needs the frozen global model")
    # only the frozen maps shared with the local branch are needed (not its ps3 and logits)
    fglob = frozen.global_maps(image_global)._replace(ps3=None, output=None)
    template = coverage_template(grid, image.device)
    lp = local2global_collect(
        model, fglob, patch_batches(image, grid, sub_batch), grid, template, keep_ps3=False, backbone_batch=bb
    )
    del template, fglob
    add_patch_scores(local, lp.outputs, sgrid, range(len(grid)))
    # the merged canvases are handed over: the global FPN frees each level once used
    context, lp = lp.context, lp._replace(context=None)
    glob = model.global_maps(image_global, context, Release(other=True))
    del context
    # the crops of the global ps3 (512 channels at the patch's 1/4) are the largest maps here:
    # on the CPU one patch at a time, like the local ResNet
    for index in sub_batches(len(grid), bb or sub_batch):
        ens = local2global_ensemble(
            model, glob.ps3, grid, index, ensemble_local=lp.ensemble_local[index[0] : index[-1] + 1]
        )
        add_patch_scores(aggregated, ens, sgrid, index)
    return Scores(glob.output, local, aggregated, stride)


def upsample_global(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Global logits (1, C, h, w) -> (C, H, W) with legacy 'nearest' (section 7)."""
    return F.interpolate(logits, size=tuple(size), mode="nearest")[0]


def dihedral(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """One of the 8 flips/rotations of the last two dims: horizontal flip, then k x 90 degrees."""
    if flip:
        x = x.flip(-1)
    return torch.rot90(x, k, dims=(-2, -1))


def undo_dihedral(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    x = torch.rot90(x, -k, dims=(-2, -1))
    return x.flip(-1) if flip else x


def predict(
    model: GLNet, mode: int, image: torch.Tensor, image_global: torch.Tensor, size_p: int, sub_batch: int,
    frozen: GLNet | None = None, tta: bool = False, predict_fn=None,
) -> dict[str, torch.Tensor]:
    """Class maps (H, W) int64 of one image for each output of `mode`.

    With `tta`, scores are summed over the 8 flips/rotations of the image (and of
    the global image), each undone before the sum. `predict_fn` replaces
    `predict_scores` (for tests).
    """
    fn = predict_fn or predict_scores
    size = image.shape[-2:]
    if not tta:
        s = fn(model, mode, image, image_global, size_p, sub_batch, frozen)
        # argmax commutes with nearest upsampling: argmax at 1/4, then upsample the indices.
        g = upsample_global(s.global_.argmax(1, keepdim=True).float(), size)[0].long()
        out = {"global": g}
        if mode != 1:
            out["local"] = upsample_canvas(s.local.argmax(0), s.stride)
            out["aggregated"] = upsample_canvas(s.aggregated.argmax(0), s.stride)
        return out
    total: dict[str, torch.Tensor] = {}
    for flip in (False, True):
        for k in range(4):
            view = dihedral(image, k, flip)
            s = fn(model, mode, view, dihedral(image_global, k, flip), size_p, sub_batch, frozen)
            g = upsample_global(s.global_, view.shape[-2:])
            parts = {"global": g}
            if mode != 1:
                parts["local"] = upsample_canvas(s.local, s.stride)
                parts["aggregated"] = upsample_canvas(s.aggregated, s.stride)
            for name in OUTPUTS[mode]:
                v = undo_dihedral(parts[name], k, flip)
                total[name] = v if name not in total else total[name] + v
    return {name: v.argmax(0) for name, v in total.items()}


def save_prediction(pred: torch.Tensor, path: str) -> None:
    """DeepGlobe colour PNG of a class map, written to a temp name then renamed."""
    tmp = path + ".tmp.png"
    Image.fromarray(colorize(pred.to("cpu", torch.uint8).numpy())).save(tmp)
    os.replace(tmp, path)


def evaluate(
    model: GLNet,
    loader,
    mode: int,
    device: torch.device,
    n_class: int,
    size_p: int,
    sub_batch: int,
    frozen: GLNet | None = None,
    tta: bool = False,
    predictions_dir: str | None = None,
    with_labels: bool = True,
    progress: bool = True,
    desc: str = "evaluation",
    amp: str | None = None,
) -> tuple[dict[str, ConfusionMatrix], dict[str, Any] | None]:
    """Predict every image of `loader`; return a confusion matrix per output and the
    first image with its label and predictions (for TensorBoard)."""
    model.eval()
    if frozen is not None:
        frozen.eval()
    cms = {name: ConfusionMatrix(n_class, device) for name in OUTPUTS[mode]}
    example = None
    if predictions_dir:
        os.makedirs(predictions_dir, exist_ok=True)
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for batch in bar:
        for b, image in enumerate(batch["image"]):
            image = image.to(device, non_blocking=True)
            ig = batch["image_global"][b : b + 1].to(device, non_blocking=True)
            with autocast(device, amp):
                preds = predict(model, mode, image, ig, size_p, sub_batch, frozen, tta)
            h, w = batch["size"][b]
            preds = {k: v[:h, :w] for k, v in preds.items()}  # drop the padding
            if with_labels:
                label = batch["label"][b][:h, :w].to(device, non_blocking=True)
                for name, pred in preds.items():
                    cms[name].update(label, pred)
            if predictions_dir:
                save_prediction(preds[MAIN_OUTPUT[mode]], os.path.join(predictions_dir, f"{batch['id'][b]}_mask.png"))
            if example is None:
                example = {
                    "id": batch["id"][b],
                    "image": batch["image"][b][:, :h, :w],
                    "label": batch["label"][b][:h, :w] if with_labels else None,
                    # class ids fit 8 bits (--n_class <= 255): 8x less than int64 at 2448 px
                    "predictions": {k: v.to("cpu", torch.uint8) for k, v in preds.items()},
                }
        if with_labels and progress:
            bar.set_postfix({k[:3]: f"{cm.miou():.3f}" for k, cm in cms.items()})
    return cms, example


# ----------------------------------------------------------------------------- training

def _train_step_mode1(model, batch, device, cms, scaler=None, **_):
    ig = batch["image_global"].to(device, non_blocking=True)
    lg = batch["label_global"].to(device, non_blocking=True)
    out = model(ig)
    loss = focal_loss(out, lg)
    _backward(loss, scaler)
    cms["global"].update(lg, out.detach().argmax(1))
    return {"loss": loss.detach(), "focal_global": loss.detach()}


def _train_step_mode2(model, batch, device, cms, size_p, sub_batch, lamb_fmreg, scaler=None, **_):
    """Gradients accumulate over all sub-batches of all images; one optimizer step after."""
    ig = batch["image_global"].to(device, non_blocking=True)
    total = torch.zeros((), device=device)
    parts = {k: torch.zeros((), device=device) for k in ("focal_local", "focal_aggregated", "fmreg")}
    for b, image in enumerate(batch["image"]):
        image = image.to(device, non_blocking=True)
        label = batch["label"][b].to(device, non_blocking=True)
        grid = PatchGrid.for_size(*image.shape[-2:], size_p)
        with torch.no_grad():
            glob = model.global_maps(ig[b : b + 1])
        cms["global"].update(batch["label_global"][b].to(device), glob.output.argmax(1))
        for index, patches in patch_batches(image, grid, sub_batch):
            y = patch_labels(label, grid, index)
            ens, out, fmreg = global2local(model, patches, glob, grid, index)
            focal_l, focal_ens = focal_loss(out, y), focal_loss(ens, y)
            loss = focal_l + focal_ens + lamb_fmreg * fmreg
            _backward(loss, scaler)
            total += loss.detach()
            for k, v in zip(parts, (focal_l, focal_ens, fmreg)):
                parts[k] += v.detach()
            cms["local"].update(y, out.detach().argmax(1))
            cms["aggregated"].update(y, ens.detach().argmax(1))
    return {"loss": total, **parts}


def _train_step_mode3(model, batch, device, cms, size_p, sub_batch, frozen, scaler=None, **_):
    """loss = focal(output_g) + sum over sub-batches of focal(ensemble).

    The original calls backward through the whole global branch once per sub-batch
    (retain_graph). The ensemble losses reach the global branch only through ps3_g,
    so we collect their gradient on a detached ps3_g and send it back through the
    global branch together with the global loss in one pass: same gradients (up to
    float summation order), one global backward instead of one per sub-batch.
    """
    ig = batch["image_global"].to(device, non_blocking=True)
    lg = batch["label_global"].to(device, non_blocking=True)
    # Per-patch ps3 maps are large; like the original, park them on the CPU when on a GPU.
    store = torch.device("cpu") if device.type == "cuda" else device
    passes, grids, labels = [], [], []
    for b, image in enumerate(batch["image"]):
        image = image.to(device, non_blocking=True)
        grid = PatchGrid.for_size(*image.shape[-2:], size_p)
        with torch.no_grad():
            fglob = frozen.global_maps(ig[b : b + 1])
        template = coverage_template(grid, device)
        passes.append(
            local2global_collect(model, fglob, patch_batches(image, grid, sub_batch), grid, template, keep_ps3=True, store=store)
        )
        grids.append(grid)
        labels.append(batch["label"][b].to(device, non_blocking=True))
    context = Maps.from_context([torch.cat(maps) for maps in zip(*(lp.context.context() for lp in passes))])
    glob = model.global_maps(ig, context)
    loss_g = focal_loss(glob.output, lg)
    cms["global"].update(lg, glob.output.detach().argmax(1))
    ps3_g = glob.ps3.detach().requires_grad_()
    total = loss_g.detach().clone()
    parts = {"focal_global": loss_g.detach(), "focal_aggregated": torch.zeros((), device=device)}
    for b, (lp, grid, label) in enumerate(zip(passes, grids, labels)):
        for index in sub_batches(len(grid), sub_batch):
            y = patch_labels(label, grid, index)
            ens = local2global_ensemble(model, ps3_g[b : b + 1], grid, index, ps3_local=lp.ps3[index].to(device))
            loss = focal_loss(ens, y)
            _backward(loss, scaler)
            total += loss.detach()
            parts["focal_aggregated"] += loss.detach()
            cms["local"].update(y, lp.outputs[index].to(device).argmax(1))
            cms["aggregated"].update(y, ens.detach().argmax(1))
    if scaler is not None:
        loss_g = scaler.scale(loss_g)
    torch.autograd.backward([loss_g, glob.ps3], [torch.ones_like(loss_g), ps3_g.grad])
    return {"loss": total, **parts}


TRAIN_STEPS = {1: _train_step_mode1, 2: _train_step_mode2, 3: _train_step_mode3}


class NonFiniteLoss(RuntimeError):
    pass


def train_one_epoch(
    model: GLNet,
    loader,
    optimizer: torch.optim.Optimizer,
    mode: int,
    epoch: int,
    num_epochs: int,
    base_lr: float,
    device: torch.device,
    n_class: int,
    size_p: int,
    sub_batch: int,
    lamb_fmreg: float = 0.15,
    frozen: GLNet | None = None,
    progress: bool = True,
    on_iteration=None,
    amp: str | None = None,
    scaler=None,
) -> dict[str, float]:
    """One epoch: poly lr per iteration, one optimizer step per batch. Returns the mean
    loss and the train mIoU of each output (at the loss resolution, 1/4)."""
    set_train_mode(model, mode)
    if frozen is not None:
        frozen.eval()
    cms = {name: ConfusionMatrix(n_class, device) for name in OUTPUTS[mode]}
    step = TRAIN_STEPS[mode]
    iters = len(loader)
    loss_sum, n = 0.0, 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{num_epochs}", disable=not progress, dynamic_ncols=True)
    for i, batch in enumerate(bar):
        lr = poly_lr(base_lr, epoch, i, iters, num_epochs)
        set_lr(optimizer, lr)
        with autocast(device, amp):
            out = step(model, batch, device, cms, size_p=size_p, sub_batch=sub_batch, lamb_fmreg=lamb_fmreg,
                       frozen=frozen, scaler=scaler)
        loss = float(out["loss"])
        if not math.isfinite(loss):
            optimizer.zero_grad(set_to_none=True)
            parts = ", ".join(f"{k} {float(v):.4g}" for k, v in out.items() if k != "loss")
            raise NonFiniteLoss(f"non-finite loss {loss} at epoch {epoch + 1}, iteration {i + 1} of {iters} ({parts})")
        if scaler is not None:  # fp16: skips the step when gradients overflowed
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += loss
        n += 1
        if progress:
            bar.set_postfix(loss=f"{loss_sum / n:.4f}", **{f"mIoU_{k[:3]}": f"{cm.miou():.3f}" for k, cm in cms.items()})
        if on_iteration is not None:
            on_iteration(i, lr, loss)
    stats = {"loss": loss_sum / max(n, 1)}
    stats.update({f"miou_{k}": cm.miou() for k, cm in cms.items()})
    return stats


def example_grid(example: dict[str, Any], max_side: int = 512) -> np.ndarray:
    """Image | label | predictions side by side, in DeepGlobe colours, (3, h, W) uint8 for TensorBoard."""
    img = example["image"]
    h, w = img.shape[-2:]
    s = max(1, math.ceil(max(h, w) / max_side))
    tiles = [img[:, ::s, ::s].permute(1, 2, 0).numpy()]
    if example["label"] is not None:
        tiles.append(colorize(example["label"][::s, ::s].numpy()))
    for name in ("global", "local", "aggregated"):
        if name in example["predictions"]:
            tiles.append(colorize(example["predictions"][name][::s, ::s].numpy().astype(np.uint8)))
    return np.concatenate(tiles, axis=1).transpose(2, 0, 1)
