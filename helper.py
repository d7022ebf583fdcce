"""The GLNet stages (docs/MODEL.md sections 5-6): what each --mode does, and its training step.

mode 1: global branch alone; mode 2 (global2local): local branch trained with the
frozen global branch; mode 3 (local2global): global branch retrained with the
frozen local branch and a frozen global model for the local branch's context;
mode 4 (local): the paper's "local only" baseline, a ResNet-50 with a plain FPN on
patches (models.glnet.LocalOnly). `--mode` takes a stage's number or its name (cli.py).

`STAGES` (at the end of this file) is the one place that says what each mode does:
what it trains and outputs, its defaults, which checkpoint feeds which part, its
scoring function (inference.py) and its training functions (the `TrainStep`'s micro-batches
and losses). Everything else takes a `Stage`. The epoch loops are engine.py's.

Everything per image (patches, canvases) stays on the model's device; patches are sliced
from the decoded uint8 image and run in sub-batches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import inference
from dataset.classes import ClassTable, class_table
from inference import patch_batches, sub_batches
from models.glnet import GLNet, LocalCanvases, Maps, global2local, local2global_ensemble
from utils.geometry import PatchGrid, coverage_template
from utils.loss import focal_loss
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
    scores: Callable  # inference: (Models, Inputs, Settings) -> the image's GlobalScores / PatchScores
    micro_batches: Callable  # (step, batch) -> the micro-batches of one training batch
    losses: Callable  # (step, micro-batch) -> StepResult: TrainStep.forward
    local_only: bool = False  # its network is models.glnet.LocalOnly, not GLNet

    def checkpoints(self, evaluation: bool, resuming: bool = False) -> list[str]:
        """The --path_* flags whose files a run loads (docs/MODEL.md section 1). A resumed
        run takes the trained model from its resume file."""
        if evaluation:
            own = [self.eval_from]
        else:
            own = [] if resuming else [flag for flag, _ in self.init_from]
        return own + ([self.frozen_from] if self.frozen_from else [])


def _parts(model: nn.Module) -> list[str]:
    """The names of PARTS that `model` has (the local-only network: the local branch)."""
    return [name for name in PARTS if getattr(model, name, None) is not None]


def configure_stage(model: GLNet, stage: Stage) -> list[torch.nn.Parameter]:
    """Freeze what `stage` does not train (requires_grad False); return the trainable parameters."""
    params = []
    for name in _parts(model):
        trained = name in stage.trained
        for p in getattr(model, name).parameters():
            p.requires_grad_(trained)
            if trained:
                params.append(p)
    return params


def set_train_mode(model: GLNet, stage: Stage) -> None:
    """Trained parts in train mode; frozen parts (BatchNorm included) in eval mode."""
    model.train()
    for name in _parts(model):
        if name not in stage.trained:
            getattr(model, name).eval()


def make_optimizer(params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, weight_decay=5e-4)


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

    @property
    def base_lr(self) -> float:
        return self.stage.lr if self.lr is None else self.lr

    def confusion_matrices(self) -> dict[str, ConfusionMatrix]:
        """A zero confusion matrix per output of the stage, on the run's device."""
        return {name: ConfusionMatrix(self.n_class, self.device, self.classes.miou_classes) for name in self.stage.outputs}


# ----------------------------------------------------------------------------- training

def patch_labels(label: torch.Tensor, grid: PatchGrid, index: Sequence[int]) -> torch.Tensor:
    """Label crops of the patches, resized to p/4 with PIL-NEAREST ('nearest-exact'): int64."""
    p = grid.patch
    crops = torch.stack([label[t : t + p, l : l + p] for t, l in ((grid.tops[k], grid.lefts[k]) for k in index)])
    small = F.interpolate(crops[:, None].float(), size=(p // 4, p // 4), mode="nearest-exact")
    return small[:, 0].long()


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


def _image_patches(step: TrainStep, image: torch.Tensor, label: torch.Tensor):
    """One training image's patches, a sub-batch at a time, with their labels at 1/4:
    (grid, index, patches, labels)."""
    image, label = step.to_device(image), step.to_device(label)
    grid = PatchGrid.for_size(*image.shape[-2:], step.cfg.size_p)
    for index, patches in patch_batches(image, grid, step.cfg.sub_batch):
        yield grid, index, patches, patch_labels(label, grid, index)


def _micro_global2local(step: TrainStep, batch: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Mode 2: one micro-batch per sub-batch of patches, with its image's global maps
    (computed once per image, without grad). Gradients accumulate over all of them."""
    ig = step.to_device(batch["image_global"])
    for b, image in enumerate(batch["image"]):
        with torch.no_grad():
            glob = step.model.global_maps(ig[b : b + 1])
        scored = [("global", step.to_device(batch["label_global"][b]), glob.output.argmax(1))]
        for grid, index, patches, labels in _image_patches(step, image, batch["label"][b]):
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


def _micro_local(step: TrainStep, batch: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Local only: one micro-batch per sub-batch of patches of each image, as mode 2's
    without the global maps. Gradients accumulate over all of them."""
    for b, image in enumerate(batch["image"]):
        for _, _, patches, labels in _image_patches(step, image, batch["label"][b]):
            yield {"patches": patches, "labels": labels}


def _losses_local(step: TrainStep, m: dict[str, Any]) -> StepResult:
    """Local only: focal loss of the patches' logits."""
    out, y = step.model(m["patches"]), m["labels"]
    loss = focal_loss(out, y)
    return StepResult(step.scale(loss), {"loss": loss.detach(), "focal_local": loss.detach()},
                      [("local", y, out.detach().argmax(1))])


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
        context, outputs, ps3 = _local_pass(step, ig[b : b + 1], image, grid, keep[b])
        for index, y in zip(sub_batches(len(grid), cfg.sub_batch), targets[b]):
            scored.append(("local", y, step.to_device(outputs[index]).argmax(1)))
        contexts.append(context.context())
        if keep[b]:
            kept[b] = ps3
        del context, outputs, ps3
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
        ps3 = kept.pop(b) if keep[b] else None
        ps3_local = ((index, ps3[index]) for index in sub_batches(len(grid), cfg.sub_batch)) if keep[b] else \
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


def _local_pass(step: TrainStep, image_global: torch.Tensor, image: torch.Tensor, grid: PatchGrid,
                keep_ps3: bool) -> tuple[Maps, torch.Tensor, torch.Tensor | None]:
    """Mode 3 training, first pass over one image's patches, without grad: the local branch
    on every patch with crops of the frozen global model's maps, its maps merged into
    canvases sized like those. Returns (the merged maps, the patches' local logits, their
    ps3 if `keep_ps3`). Per-patch results are parked on the CPU when training on a GPU,
    like the original."""
    cfg = step.cfg
    store = torch.device("cpu") if cfg.device.type == "cuda" else cfg.device
    outputs, kept = [], []
    with torch.no_grad():
        fglob = step.frozen.global_maps(image_global)
        template = coverage_template(grid, cfg.device)
        canvases = LocalCanvases(fglob)
        for index, patches in patch_batches(image, grid, cfg.sub_batch):
            logits = []
            for _, ps3, out in step.model.local_patches(patches, fglob, grid, index, canvases):
                if keep_ps3:
                    kept.append(ps3.to(store))
                logits.append(out)
            outputs.append(torch.cat(logits).to(store))
        context = canvases.finish(template)
    return context, torch.cat(outputs), torch.cat(kept) if keep_ps3 else None


def _ps3_again(step: TrainStep, image_global: torch.Tensor, image: torch.Tensor, grid: PatchGrid):
    """The local ps3 of one image's patches, sub-batch by sub-batch, computed again exactly
    as in `_local_pass` (same calls, same sub-batches: the same values)."""
    cfg = step.cfg
    with torch.no_grad():
        fglob = step.frozen.global_maps(image_global)
    for index, patches in patch_batches(image, grid, cfg.sub_batch):
        with torch.no_grad():  # not around the yield: the caller's code needs grad
            ps3 = [p for _, p, _ in step.model.local_patches(patches, fglob, grid, index)]
        yield index, torch.cat(ps3)


# ----------------------------------------------------------------------------- the stages

_GLOBAL_PARTS = ("resnet_global", "fpn_global", "ensemble_conv")
_LOCAL_PARTS = ("resnet_local", "fpn_local", "ensemble_conv")
_ALL_OUTPUTS = ("global", "local", "aggregated")

STAGES: dict[int, Stage] = {
    1: Stage(
        1, "global", "fpn_deepglobe_global", 120, 5e-5, _GLOBAL_PARTS, ("global",), "global", "size_g",
        init_from=(), backbones=("resnet_global", "resnet_local"), eval_from="path_g", frozen_from=None,
        plain_eval=True, one_forward_per_batch=True, scores=inference.score_global, micro_batches=_micro_whole_batch, losses=_losses_global,
    ),
    2: Stage(
        2, "global2local", "fpn_deepglobe_global2local", 50, 2e-5, _LOCAL_PARTS, _ALL_OUTPUTS, "aggregated", "size_p",
        init_from=(("path_g", True),), backbones=("resnet_local",), eval_from="path_g2l", frozen_from=None,
        plain_eval=False, one_forward_per_batch=False, scores=inference.score_global2local, micro_batches=_micro_global2local, losses=_losses_global2local,
    ),
    3: Stage(
        3, "local2global", "fpn_deepglobe_local2global", 120, 5e-5, _GLOBAL_PARTS, _ALL_OUTPUTS, "aggregated", "size_g",
        init_from=(("path_g2l", False),), backbones=(), eval_from="path_l2g", frozen_from="path_g",
        plain_eval=False, one_forward_per_batch=True, scores=inference.score_local2global, micro_batches=_micro_whole_batch, losses=_losses_local2global,
    ),
    # "local only" (docs/MODEL.md section 9): mode 2's schedule, the backbone from ImageNet as in mode 1
    4: Stage(
        4, "local", "fpn_deepglobe_local", 50, 2e-5, ("resnet_local", "fpn_local"), ("local",), "local", "size_p",
        init_from=(), backbones=("resnet_local",), eval_from="path_local", frozen_from=None,
        plain_eval=False, one_forward_per_batch=False, scores=inference.score_local, micro_batches=_micro_local, losses=_losses_local,
        local_only=True,
    ),
}
