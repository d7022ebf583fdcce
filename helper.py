"""Training and evaluation of the GLNet stages (GLNET_SPEC.md sections 5-7).

mode 1: global branch alone; mode 2 (global2local): local branch trained with the
frozen global branch; mode 3 (local2global): global branch retrained with the
frozen local branch and a frozen global model for the local branch's context.

`STAGES` (at the end of this file) is the one place that says what each mode does:
what it trains and outputs, its defaults, which checkpoint feeds which part, and
its inference and training functions. Everything else takes a `Stage`.

Everything per image (patches, canvases, confusion matrices) stays on the model's
device; patches are sliced from the decoded uint8 image and run in sub-batches.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dataset.classes import ClassTable, class_table
from models.glnet import (
    GLNet, Maps, Release, global2local, local2global_collect, local2global_ensemble,
)
from utils.geometry import PatchGrid, add_patch_scores, coverage_template
from utils.io import save_png
from utils.loss import focal_loss
from utils.lr_scheduler import poly_lr, set_lr
from utils.metrics import ConfusionMatrix

PARTS = ("resnet_global", "resnet_local", "fpn_global", "fpn_local", "ensemble_conv")


@dataclass(frozen=True)
class Stage:
    """What one --mode does (the rows of `STAGES`)."""

    mode: int
    name: str
    task_name: str  # default run name
    epochs: int  # default number of epochs (section 6)
    lr: float  # default base learning rate (section 6)
    trained: tuple[str, ...]  # parts trained; the others are frozen
    outputs: tuple[str, ...]  # the predictions it makes
    main_output: str  # the one written as its prediction, and whose mIoU picks the best epoch
    trained_input: str  # the input size the trained BatchNorms see: "size_g" or "size_p"
    init_from: tuple[tuple[str, bool], ...]  # training starts from (--path_* flag, global keys only)
    backbones: tuple[str, ...]  # ResNets initialised from --backbone_weights when training
    eval_from: str  # --path_* flag of the checkpoint evaluation loads
    frozen_from: str | None  # --path_* flag of the frozen global model (mode 3)
    plain_eval: bool  # evaluation needs only the plain global network
    one_forward_per_batch: bool  # its training batch is a single micro-batch (--sync_bn is safe)
    scores: Callable  # (model, image, image_global, size_p, sub_batch, frozen) -> Scores
    micro_batches: Callable  # (step, batch) -> the micro-batches of one training batch
    losses: Callable  # (step, micro-batch) -> StepResult: TrainStep.forward

    def checkpoints(self, evaluation: bool, resuming: bool = False) -> list[str]:
        """The --path_* flags whose files a run loads (GLNET_SPEC.md section 1). A resumed
        run takes the trained model from its resume file."""
        if evaluation:
            own = [self.eval_from]
        else:
            own = [] if resuming else [flag for flag, _ in self.init_from]
        return own + ([self.frozen_from] if self.frozen_from else [])


def configure_stage(model: GLNet, stage: Stage) -> list[torch.nn.Parameter]:
    """Freeze what `stage` does not train (requires_grad False); return the trainable parameters."""
    params = []
    for name in PARTS:
        trained = name in stage.trained
        for p in getattr(model, name).parameters():
            p.requires_grad_(trained)
            if trained:
                params.append(p)
    return params


def set_train_mode(model: GLNet, stage: Stage) -> None:
    """Trained parts in train mode; frozen parts (BatchNorm included) in eval mode."""
    model.train()
    for name in PARTS:
        if name not in stage.trained:
            getattr(model, name).eval()


def make_optimizer(params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, weight_decay=5e-4)


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str | None):
    """torch.autocast for --amp bf16/fp16, or nothing (fp32, the default)."""
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


@dataclass(frozen=True)
class Config:
    """What training and evaluation need to know of a run."""

    stage: Stage
    device: torch.device
    n_class: int
    size_p: int
    sub_batch: int
    lamb_fmreg: float = 0.15
    num_epochs: int = 1
    lr: float | None = None  # None: the stage's default
    amp: str | None = None
    tta: bool = False
    progress: bool = True
    # mode-3 training: images of a batch whose per-patch local ps3 stay in memory (the others
    # run the frozen local branch again)
    keep_patch_maps: int = 1
    # the run's class table (names, colours, mIoU classes); None: class_table(n_class)
    classes: ClassTable | None = None

    def __post_init__(self) -> None:
        if self.classes is None:
            object.__setattr__(self, "classes", class_table(self.n_class))
        elif self.classes.n_class != self.n_class:
            raise ValueError(f"n_class {self.n_class} but class table {self.classes.name!r} has {self.classes.n_class}")

    @classmethod
    def from_args(cls, args, device: torch.device) -> "Config":
        from dataset.presets import classes_from_args

        return cls(
            STAGES[args.mode], device, args.n_class, args.size_p, args.sub_batch_size, args.lamb_fmreg,
            args.num_epochs, args.lr, args.amp, args.tta, not args.no_progress, args.keep_patch_maps,
            classes_from_args(args),
        )

    @property
    def base_lr(self) -> float:
        return self.stage.lr if self.lr is None else self.lr

    def confusion_matrices(self) -> dict[str, ConfusionMatrix]:
        """A zero confusion matrix per output of the stage, on the run's device."""
        return {name: ConfusionMatrix(self.n_class, self.device, self.classes.miou_classes) for name in self.stage.outputs}


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
    model: GLNet, stage: Stage, image: torch.Tensor, image_global: torch.Tensor, size_p: int, sub_batch: int,
    frozen: GLNet | None = None,
) -> Scores:
    """Scores of one image: `image` (3, H, W) uint8 and `image_global` (1, 3, g, g) float,
    both on the model's device. Mode 3 needs `frozen`, the frozen global model."""
    return stage.scores(model, image, image_global, size_p, sub_batch, frozen)


def _scores_global(model, image, image_global, size_p, sub_batch, frozen=None) -> Scores:
    """Mode 1: the global logits alone."""
    return Scores(model.global_maps(image_global, policy=Release(other=True)).output, None, None)


def _canvases(image: torch.Tensor, n_class: int, size_p: int):
    """The patch grid of an image, and two zero score canvases on the cells of score_grid."""
    grid = PatchGrid.for_size(*image.shape[-2:], size_p)
    sgrid, stride = score_grid(grid)
    local = torch.zeros((n_class, sgrid.height, sgrid.width), dtype=torch.float32, device=image.device)
    return grid, sgrid, stride, local, torch.zeros_like(local)


def _scores_global2local(model, image, image_global, size_p, sub_batch, frozen=None) -> Scores:
    """Mode 2: the model's global maps as context of its local branch (section 5)."""
    grid, sgrid, stride, local, aggregated = _canvases(image, model.ensemble_conv.out_channels, size_p)
    bb = backbone_batch(image.device)
    glob = model.global_maps(image_global)
    for index, patches in patch_batches(image, grid, sub_batch):
        ens, out, _ = global2local(model, patches, glob, grid, index, low_memory=True, backbone_batch=bb)
        add_patch_scores(local, out, sgrid, index)
        add_patch_scores(aggregated, ens, sgrid, index)
    return Scores(glob.output, local, aggregated, stride)


def _scores_local2global(model, image, image_global, size_p, sub_batch, frozen=None) -> Scores:
    """Mode 3: the frozen global model's maps as context of the local branch, whose merged
    maps are the context of the model's global branch (section 5)."""
    if frozen is None:
        raise ValueError("mode 3 needs the frozen global model")
    grid, sgrid, stride, local, aggregated = _canvases(image, model.ensemble_conv.out_channels, size_p)
    bb = backbone_batch(image.device)
    # only the frozen maps shared with the local branch are needed (not its ps3 and logits)
    fglob = frozen.global_maps(image_global)._replace(ps3=None, output=None)
    template = coverage_template(grid, image.device)
    lp = local2global_collect(
        model, fglob, patch_batches(image, grid, sub_batch), grid, template, keep="ensemble_local", backbone_batch=bb
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
    model: GLNet, stage: Stage, image: torch.Tensor, image_global: torch.Tensor, size_p: int, sub_batch: int,
    frozen: GLNet | None = None, tta: bool = False, predict_fn=None,
) -> dict[str, torch.Tensor]:
    """Class maps (H, W) int64 of one image for each output of `stage`.

    With `tta`, scores are summed over the 8 flips/rotations of the image (and of
    the global image), each undone before the sum. `predict_fn` replaces
    `predict_scores` (for tests).
    """
    fn = predict_fn or predict_scores
    patched = [name for name in ("local", "aggregated") if name in stage.outputs]
    if not tta:
        s = fn(model, stage, image, image_global, size_p, sub_batch, frozen)
        # argmax commutes with nearest upsampling: argmax at 1/4, then upsample the indices.
        out = {"global": upsample_global(s.global_.argmax(1, keepdim=True).float(), image.shape[-2:])[0].long()}
        for name in patched:
            out[name] = upsample_canvas(getattr(s, name).argmax(0), s.stride)
        return out
    total: dict[str, torch.Tensor] = {}
    for flip in (False, True):
        for k in range(4):
            view = dihedral(image, k, flip)
            s = fn(model, stage, view, dihedral(image_global, k, flip), size_p, sub_batch, frozen)
            parts = {"global": upsample_global(s.global_, view.shape[-2:])}
            for name in patched:
                parts[name] = upsample_canvas(getattr(s, name), s.stride)
            for name in stage.outputs:
                v = undo_dihedral(parts[name], k, flip)
                total[name] = v if name not in total else total[name] + v
    return {name: v.argmax(0) for name, v in total.items()}


def save_prediction(pred: torch.Tensor, path: str, classes=None) -> None:
    """Colour PNG of a class map (the class table's palette; DeepGlobe's by default), written atomically."""
    classes = classes or class_table(7)
    save_png(path, classes.colorize(pred.to("cpu", torch.uint8).numpy()))


def evaluate(
    model: GLNet, loader, cfg: Config, frozen: GLNet | None = None, predictions_dir: str | None = None,
    with_labels: bool = True, desc: str = "evaluation",
) -> tuple[dict[str, ConfusionMatrix], dict[str, Any] | None]:
    """Predict every image of `loader`; return a confusion matrix per output and the
    first image with its label and predictions (for TensorBoard)."""
    model.eval()
    if frozen is not None:
        frozen.eval()
    device, classes = cfg.device, cfg.classes
    cms = cfg.confusion_matrices()
    example = None
    if predictions_dir:
        os.makedirs(predictions_dir, exist_ok=True)
    bar = tqdm(loader, desc=desc, disable=not cfg.progress, leave=False, dynamic_ncols=True)
    for batch in bar:
        for b, image in enumerate(batch["image"]):
            image = image.to(device, non_blocking=True)
            ig = batch["image_global"][b : b + 1].to(device, non_blocking=True)
            with autocast(device, cfg.amp):
                preds = predict(model, cfg.stage, image, ig, cfg.size_p, cfg.sub_batch, frozen, cfg.tta)
            h, w = batch["size"][b]
            preds = {k: v[:h, :w] for k, v in preds.items()}  # drop the padding
            if with_labels:
                label = batch["label"][b][:h, :w].to(device, non_blocking=True)
                for name, pred in preds.items():
                    cms[name].update(label, pred)
            if predictions_dir:
                path = os.path.join(predictions_dir, f"{batch['id'][b]}_mask.png")
                save_prediction(preds[cfg.stage.main_output], path, classes)
            if example is None:
                example = _example(batch, b, preds, with_labels)
        if with_labels and cfg.progress:
            bar.set_postfix({k[:3]: f"{cm.miou():.3f}" for k, cm in cms.items()})
    return cms, example


def _example(batch, b: int, preds: dict[str, torch.Tensor], with_labels: bool) -> dict[str, Any]:
    h, w = batch["size"][b]
    return {
        "id": batch["id"][b],
        "image": batch["image"][b][:, :h, :w],
        "label": batch["label"][b][:h, :w] if with_labels else None,
        # class ids fit 8 bits (--n_class <= 255): 8x less than int64 at 2448 px
        "predictions": {k: v.to("cpu", torch.uint8) for k, v in preds.items()},
    }


# ----------------------------------------------------------------------------- training

class StepResult(NamedTuple):
    """What a training step returns for one micro-batch: `objective`, the tensor to call
    backward() on (already scaled for fp16); `losses`, detached values to log (their
    "loss" is what the original reports); `scored`: (output name, labels, predictions)
    for the train confusion matrices."""

    objective: torch.Tensor
    losses: dict[str, torch.Tensor]
    scored: list[tuple[str, torch.Tensor, torch.Tensor]]


class TrainStep(nn.Module):
    """Training of one stage as a module: `forward(micro_batch)` runs the stage's losses on
    one micro-batch (`micro_batches(batch)` cuts a batch into them) and returns a
    StepResult, whose objective is backpropagated once. One forward, one backward: what a
    DistributedDataParallel wrapper needs to synchronise the gradients.

    `train()` puts the trained parts in train mode, the frozen ones (and the frozen
    global model of mode 3) in eval mode."""

    def __init__(self, model: GLNet, cfg: Config, frozen: GLNet | None = None, scaler=None) -> None:
        super().__init__()
        self.model, self.frozen, self.cfg = model, frozen, cfg
        # fp16 gradients can underflow: scale the losses (bf16 has float32's range and needs none)
        self.scale = scaler.scale if scaler is not None else (lambda loss: loss)

    def train(self, mode: bool = True) -> "TrainStep":
        super().train(mode)
        if mode:
            set_train_mode(self.model, self.cfg.stage)
            if self.frozen is not None:
                self.frozen.eval()
        return self

    def micro_batches(self, batch: dict[str, Any]) -> Iterator[Any]:
        return self.cfg.stage.micro_batches(self, batch)

    def forward(self, micro: Any) -> StepResult:
        return self.cfg.stage.losses(self, micro)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.cfg.device, non_blocking=True)


def _micro_whole_batch(step: TrainStep, batch: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Modes 1 and 3: the batch is one micro-batch (the global branch's BatchNorm sees all its images)."""
    yield batch


def _losses_global(step: TrainStep, batch: dict[str, Any]) -> StepResult:
    """Mode 1: focal loss of the global logits."""
    ig, lg = step.to_device(batch["image_global"]), step.to_device(batch["label_global"])
    out = step.model(ig)
    loss = focal_loss(out, lg)
    return StepResult(step.scale(loss), {"loss": loss.detach(), "focal_global": loss.detach()},
                      [("global", lg, out.detach().argmax(1))])


def _micro_global2local(step: TrainStep, batch: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Mode 2: one micro-batch per sub-batch of patches, with its image's global maps
    (computed once per image, without grad). Gradients accumulate over all of them."""
    cfg = step.cfg
    ig = step.to_device(batch["image_global"])
    for b, image in enumerate(batch["image"]):
        image, label = step.to_device(image), step.to_device(batch["label"][b])
        grid = PatchGrid.for_size(*image.shape[-2:], cfg.size_p)
        with torch.no_grad():
            glob = step.model.global_maps(ig[b : b + 1])
        scored = [("global", step.to_device(batch["label_global"][b]), glob.output.argmax(1))]
        for index, patches in patch_batches(image, grid, cfg.sub_batch):
            labels = patch_labels(label, grid, index)
            yield {"glob": glob, "grid": grid, "index": index, "patches": patches, "labels": labels, "scored": scored}
            scored = []


def _losses_global2local(step: TrainStep, m: dict[str, Any]) -> StepResult:
    """Mode 2: focal(local) + focal(ensemble) + lamb_fmreg * MSE(ps3_l, crop(ps3_g))."""
    ens, out, fmreg = global2local(step.model, m["patches"], m["glob"], m["grid"], m["index"])
    y = m["labels"]
    focal_l, focal_ens = focal_loss(out, y), focal_loss(ens, y)
    loss = focal_l + focal_ens + step.cfg.lamb_fmreg * fmreg
    losses = {"loss": loss, "focal_local": focal_l, "focal_aggregated": focal_ens, "fmreg": fmreg}
    scored = m["scored"] + [("local", y, out.detach().argmax(1)), ("aggregated", y, ens.detach().argmax(1))]
    return StepResult(step.scale(loss), {k: v.detach() for k, v in losses.items()}, scored)


class _GradSum:
    """Gradients of several losses with respect to `inputs`, summed in call order (as
    repeated backward() calls would accumulate them in .grad), without touching .grad."""

    def __init__(self, inputs: Sequence[torch.Tensor]) -> None:
        self.inputs, self.grads = list(inputs), None

    def add(self, loss: torch.Tensor) -> None:
        grads = torch.autograd.grad(loss, self.inputs)
        self.grads = list(grads) if self.grads is None else [a.add_(g) for a, g in zip(self.grads, grads)]

    def surrogate(self, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """sum(output * grad): its backward sends exactly the summed gradients into
        `outputs` (the graph tensors that the detached inputs stand for, or parameters).
        Summed in float32 (the value could overflow in fp16; the gradients do not depend on it)."""
        return sum((o.float() * g.float()).sum() for o, g in zip(outputs, self.grads))


def _losses_local2global(step: TrainStep, batch: dict[str, Any]) -> StepResult:
    """Mode 3: focal(output_g) + sum over sub-batches of focal(ensemble), section 6.

    1. Per image, the frozen local branch (no grad) runs on every patch with crops of the
       frozen global model's maps; its maps are merged into that image's context canvases.
    2. The global branch runs on the whole batch with the merged local context.
    3. Per sub-batch, the ensemble conv combines the patches' local ps3 with crops of the
       global ps3. Each patch's ps3 (512 channels at 1/4 of the patch, 33 MB at 508 px) is
       kept only for the last `keep_patch_maps` images of the batch (default 1); for the
       others the frozen global model and the local branch run again (the same values):
       memory is bounded per image, not per batch, for up to ~1.4x the time of a step.

    The original calls backward through the whole global branch once per sub-batch. The
    ensemble losses reach the global branch only through ps3_g, so their gradient is
    summed on a detached ps3_g (and on ensemble_conv) and goes back through the global
    branch together with the global loss in one backward of the returned objective: the
    same gradients (up to float summation order, tested against the original scheme).
    """
    model, cfg = step.model, step.cfg
    ig, lg = step.to_device(batch["image_global"]), step.to_device(batch["label_global"])
    images = [step.to_device(x) for x in batch["image"]]
    grids = [PatchGrid.for_size(*x.shape[-2:], cfg.size_p) for x in images]
    # per image, the labels of each sub-batch of patches (at 1/4), used by both passes
    targets = [[patch_labels(step.to_device(label), grid, index) for index in sub_batches(len(grid), cfg.sub_batch)]
               for label, grid in zip(batch["label"], grids)]
    keep = [b >= len(images) - max(cfg.keep_patch_maps, 1) for b in range(len(images))]
    contexts, scored, kept = [], [], {}
    for b, (image, grid) in enumerate(zip(images, grids)):
        lp = _local_pass(step, ig[b : b + 1], image, grid, keep="ps3" if keep[b] else None)
        for index, y in zip(sub_batches(len(grid), cfg.sub_batch), targets[b]):
            scored.append(("local", y, step.to_device(lp.outputs[index]).argmax(1)))
        contexts.append(lp.context.context())
        if keep[b]:
            kept[b] = lp.ps3
        del lp
    context = Maps.from_context([torch.cat(maps) for maps in zip(*contexts)])
    del contexts
    glob = model.global_maps(ig, context)
    del context
    loss_g = focal_loss(glob.output, lg)
    scored.append(("global", lg, glob.output.detach().argmax(1)))
    ps3_g = glob.ps3.detach().requires_grad_()
    conv = model.ensemble_conv
    grads = _GradSum([ps3_g, conv.weight, conv.bias])
    total, focal_ens = loss_g.detach().clone(), torch.zeros((), device=cfg.device)
    for b, (image, grid) in enumerate(zip(images, grids)):
        ps3_local = _ps3_kept(kept.pop(b), grid, cfg.sub_batch) if keep[b] else \
            _ps3_again(step, ig[b : b + 1], image, grid)
        for (index, ps3_l), y in zip(ps3_local, targets[b]):
            ens = local2global_ensemble(model, ps3_g[b : b + 1], grid, index, ps3_local=step.to_device(ps3_l))
            loss = focal_loss(ens, y)
            grads.add(step.scale(loss))
            total += loss.detach()
            focal_ens += loss.detach()
            scored.append(("aggregated", y, ens.detach().argmax(1)))
    objective = step.scale(loss_g) + grads.surrogate([glob.ps3, conv.weight, conv.bias])
    losses = {"loss": total, "focal_global": loss_g.detach(), "focal_aggregated": focal_ens}
    return StepResult(objective, losses, scored)


def _local_pass(step: TrainStep, image_global: torch.Tensor, image: torch.Tensor, grid: PatchGrid, keep):
    """Mode 3 training, first pass over one image's patches (`local2global_collect`).
    Per-patch results are parked on the CPU when training on a GPU, like the original."""
    cfg = step.cfg
    store = torch.device("cpu") if cfg.device.type == "cuda" else cfg.device
    with torch.no_grad():
        fglob = step.frozen.global_maps(image_global)
        template = coverage_template(grid, cfg.device)
        batches = patch_batches(image, grid, cfg.sub_batch)
        return local2global_collect(step.model, fglob, batches, grid, template, keep=keep, store=store)


def _ps3_kept(ps3: torch.Tensor, grid: PatchGrid, sub_batch: int):
    for index in sub_batches(len(grid), sub_batch):
        yield index, ps3[index]


def _ps3_again(step: TrainStep, image_global: torch.Tensor, image: torch.Tensor, grid: PatchGrid):
    """The local ps3 of one image's patches, sub-batch by sub-batch, computed again exactly
    as in `_local_pass` (same calls, same sub-batches: the same values)."""
    cfg = step.cfg
    with torch.no_grad():
        fglob = step.frozen.global_maps(image_global)
    for index, patches in patch_batches(image, grid, cfg.sub_batch):
        ps3 = []
        take = lambda group, maps, k: ps3.append(maps) if group == "ps3" else None  # noqa: E731
        with torch.no_grad():  # not around the yield: the caller's code needs grad
            step.model.local_maps_released(patches, fglob, grid, index, take)
        yield index, torch.cat(ps3)


class NonFiniteLoss(RuntimeError):
    pass


def _flag_last(items) -> Iterator[tuple[Any, bool]]:
    """(item, whether it is the last one) for each item of an iterable, read one ahead."""
    it = iter(items)
    try:
        item = next(it)
    except StopIteration:
        return
    for following in it:
        yield item, False
        item = following
    yield item, True


def accumulate(step: TrainStep, batch: dict[str, Any], cms: dict[str, ConfusionMatrix], forward=None) -> dict[str, torch.Tensor]:
    """Forward and backward of every micro-batch of `batch`: gradients summed in .grad,
    train confusion matrices updated; returns the losses summed over the micro-batches.
    `forward` runs a micro-batch: the step itself (default) or a DistributedDataParallel
    wrapper of it, whose gradients are then all-reduced once, in the last backward (the
    others run under its no_sync(); every rank must cut its batch into as many micro-batches)."""
    forward = forward or step
    sums: dict[str, torch.Tensor] = {}
    for micro, last in _flag_last(step.micro_batches(batch)):
        sync = contextlib.nullcontext() if last or not hasattr(forward, "no_sync") else forward.no_sync()
        with sync:
            result = forward(micro)
            result.objective.backward()
        for name, label, pred in result.scored:
            cms[name].update(label, pred)
        for k, v in result.losses.items():
            sums[k] = v if k not in sums else sums[k] + v
        del result
    return sums


def train_one_epoch(
    step: TrainStep, loader, optimizer: torch.optim.Optimizer, epoch: int, scaler=None, on_iteration=None,
    forward: Callable | None = None, agree: Callable[[bool], bool] | None = None,
) -> dict[str, float]:
    """One epoch: poly lr per iteration, one optimizer step per batch (gradients summed
    over its micro-batches, see `accumulate`). Returns the mean loss and the train mIoU of
    each output (at the loss resolution, 1/4), both of this process's batches.

    `forward`: see `accumulate`; `agree(flag)`: whether any process has `flag` (under
    torchrun, so that a non-finite loss on one process stops all at the same iteration)."""
    cfg = step.cfg
    step.train()
    cms = cfg.confusion_matrices()
    iters = len(loader)
    loss_sum, n = 0.0, 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.num_epochs}", disable=not cfg.progress, dynamic_ncols=True)
    for i, batch in enumerate(bar):
        lr = poly_lr(cfg.base_lr, epoch, i, iters, cfg.num_epochs)
        set_lr(optimizer, lr)
        with autocast(cfg.device, cfg.amp):
            sums = accumulate(step, batch, cms, forward)
        loss = float(sums["loss"])
        bad = not math.isfinite(loss)
        if agree is not None:  # collective: every process calls it every iteration
            bad = agree(bad)
        if bad:
            optimizer.zero_grad(set_to_none=True)
            parts = ", ".join(f"{k} {float(v):.4g}" for k, v in sums.items() if k != "loss")
            what = f"non-finite loss {loss}" if not math.isfinite(loss) else f"non-finite loss on another process (here {loss:.4g})"
            raise NonFiniteLoss(f"{what} at epoch {epoch + 1}, iteration {i + 1} of {iters} ({parts})")
        if scaler is not None:  # fp16: skips the step when gradients overflowed
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += loss
        n += 1
        if cfg.progress:
            bar.set_postfix(loss=f"{loss_sum / n:.4f}", **{f"mIoU_{k[:3]}": f"{cm.miou():.3f}" for k, cm in cms.items()})
        if on_iteration is not None:
            on_iteration(i, lr, loss)
    stats = {"loss": loss_sum / max(n, 1)}
    stats.update({f"miou_{k}": cm.miou() for k, cm in cms.items()})
    return stats


def example_grid(example: dict[str, Any], classes=None, max_side: int = 512) -> np.ndarray:
    """Image | label | predictions side by side, in the class table's colours, (3, h, W) uint8 for TensorBoard."""
    classes = classes or class_table(7)
    img = example["image"]
    h, w = img.shape[-2:]
    s = max(1, math.ceil(max(h, w) / max_side))
    tiles = [img[:, ::s, ::s].permute(1, 2, 0).numpy()]
    if example["label"] is not None:
        tiles.append(classes.colorize(example["label"][::s, ::s].numpy()))
    for name in ("global", "local", "aggregated"):
        if name in example["predictions"]:
            tiles.append(classes.colorize(example["predictions"][name][::s, ::s].numpy().astype(np.uint8)))
    return np.concatenate(tiles, axis=1).transpose(2, 0, 1)


# ----------------------------------------------------------------------------- the stages

_GLOBAL_PARTS = ("resnet_global", "fpn_global", "ensemble_conv")
_LOCAL_PARTS = ("resnet_local", "fpn_local", "ensemble_conv")
_ALL_OUTPUTS = ("global", "local", "aggregated")

STAGES: dict[int, Stage] = {
    1: Stage(
        1, "global", "fpn_deepglobe_global", 120, 5e-5, _GLOBAL_PARTS, ("global",), "global", "size_g",
        init_from=(), backbones=("resnet_global", "resnet_local"), eval_from="path_g", frozen_from=None,
        plain_eval=True, one_forward_per_batch=True, scores=_scores_global, micro_batches=_micro_whole_batch, losses=_losses_global,
    ),
    2: Stage(
        2, "global2local", "fpn_deepglobe_global2local", 50, 2e-5, _LOCAL_PARTS, _ALL_OUTPUTS, "aggregated", "size_p",
        init_from=(("path_g", True),), backbones=("resnet_local",), eval_from="path_g2l", frozen_from=None,
        plain_eval=False, one_forward_per_batch=False, scores=_scores_global2local, micro_batches=_micro_global2local, losses=_losses_global2local,
    ),
    3: Stage(
        3, "local2global", "fpn_deepglobe_local2global", 120, 5e-5, _GLOBAL_PARTS, _ALL_OUTPUTS, "aggregated", "size_g",
        init_from=(("path_g2l", False),), backbones=(), eval_from="path_l2g", frozen_from="path_g",
        plain_eval=False, one_forward_per_batch=True, scores=_scores_local2global, micro_batches=_micro_whole_batch, losses=_losses_local2global,
    ),
}
