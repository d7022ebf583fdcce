"""The two runs of train_deep_globe.py: training (epochs of `train_one_epoch`, each
followed by validation with `evaluate`, checkpoints and logs, with graceful stops and
resume) and evaluation (metrics table and JSON, predictions). The stage's specifics come
from helper.STAGES (its training step) and inference.py (its predictions); the run's files
and life from utils.run.

Under torchrun (utils.dist): each process trains on its share of every epoch's images
(DistributedSampler) through a DistributedDataParallel wrapper of the TrainStep, and
evaluates its share of the images (each image once); confusion matrices are summed over the
processes, and the main process alone writes checkpoints, logs and metrics.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import os
import sys
import time
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import helper
import inference
from dataset.classes import class_table
from dataset.deep_globe import collate
from utils.errors import SharedError, UserError
from utils.io import save_png, write_json
from utils.labels import mean_iou
from utils.lr_scheduler import poly_lr, set_lr
from utils.metrics import ChallengeScore, ConfusionMatrix
from utils import dist
from utils.amp import autocast
from utils.dist import SINGLE, Processes
from utils.run import GracefulStop, Interrupted, RunFiles, RunLog, first_nonfinite, restore_training, save_epoch, worker_init


def make_loader(dataset, args, device, shuffle: bool, generator=None, sampler=None) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=args.num_workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        generator=generator,
        drop_last=False,
        worker_init_fn=worker_init if args.num_workers > 0 else None,
    )


class SharedBatches:
    """A loader whose batches the processes agree on before any of them is used
    (utils.dist.raise_shared): an error loading a batch on one process (a truncated image, an
    unknown mask value) stops every process at that batch, with the one line and exit code
    of one process. `steps`: how many agreements each process takes part in, the largest
    number of batches of any process (one whose share is done still takes part). In one
    process it is the loader itself."""

    def __init__(self, loader: DataLoader, procs: Processes, device: torch.device, steps: int | None = None) -> None:
        self.loader, self.procs, self.device = loader, procs, device
        self.steps = len(loader) if steps is None else steps

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        if not self.procs.active:
            yield from self.loader
            return
        batches, own = iter(self.loader), len(self.loader)
        for k in range(self.steps):
            batch, error = None, None
            try:
                batch = next(batches)
            except StopIteration:  # this process's share is done; before its end, an error
                if k < own:
                    error = RuntimeError(f"the data loader ended after {k} of its {own} batches")
            except Interrupted:  # a second SIGINT/SIGTERM: stop at once
                raise
            except Exception as e:
                error = e
            dist.raise_shared(self.procs, error, self.device)
            if batch is not None:
                yield batch


# ----------------------------------------------------------------------------- one epoch

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


def accumulate(step: helper.TrainStep, batch: dict[str, Any], cms: dict[str, ConfusionMatrix], forward=None) -> dict[str, torch.Tensor]:
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
    step: helper.TrainStep, loader, optimizer: torch.optim.Optimizer, epoch: int, scaler=None, on_iteration=None,
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


# ----------------------------------------------------------------------------- evaluation

def save_prediction(pred: torch.Tensor, path: str, classes=None) -> None:
    """Colour PNG of a class map (the class table's palette; DeepGlobe's by default), written atomically."""
    classes = classes or class_table(7)
    save_png(path, classes.colorize(pred.to("cpu", torch.uint8).numpy()))


@dataclasses.dataclass
class BoxLog:
    """Coarse-to-fine evaluation: how its images are predicted (`inference.CoarseToFine`) and
    the box found in each, by image id ([x0, y0, x1, y1], or None: no foreground)."""

    predictor: inference.CoarseToFine
    boxes: dict[str, list[int] | None] = dataclasses.field(default_factory=dict)


def evaluate(
    model, loader, cfg: helper.Config, frozen=None, predictions_dir: str | None = None,
    with_labels: bool = True, desc: str = "evaluation", box_log: BoxLog | None = None,
) -> tuple[dict[str, ConfusionMatrix], dict[str, Any] | None]:
    """Predict every image of `loader` with `inference.predict_strips` (with `box_log`:
    coarse-to-fine, each image's box kept in it); return a confusion matrix per output and
    the first image with its label and predictions (for TensorBoard).

    Without TTA an image's predictions come as bands of rows, each counted in the confusion
    matrices as soon as it is final: no score canvas of the whole image is held. Whole class
    maps (uint8) are assembled only where they are needed: every output of the first image
    (the example), and the main output with `predictions_dir` (its colour PNG)."""
    model.eval()
    if frozen is not None:
        frozen.eval()
    models = inference.Models(model, frozen)
    predictor = inference.WholeImage() if box_log is None else box_log.predictor
    settings = inference.Settings.for_device(cfg.device, cfg.size_p, cfg.sub_batch, tta=cfg.tta)
    cms = cfg.confusion_matrices()
    if cfg.n_class == 2:  # binary tables: the ISIC challenge's score too, image by image
        for cm in cms.values():
            cm.challenge = ChallengeScore(cfg.device)
    example = None
    if predictions_dir:
        os.makedirs(predictions_dir, exist_ok=True)
    bar = tqdm(loader, desc=desc, disable=not cfg.progress, leave=False, dynamic_ncols=True)
    for batch in bar:
        for b in range(len(batch["image"])):
            keep = cfg.stage.outputs if example is None else (cfg.stage.main_output,) if predictions_dir else ()
            maps, found = _score_image(cfg, models, settings, predictor, batch, b, cms if with_labels else None, keep)
            if box_log is not None:
                box_log.boxes[batch["id"][b]] = None if found.box is None else list(found.box)
            if predictions_dir:
                path = os.path.join(predictions_dir, f"{batch['id'][b]}_mask.png")
                save_prediction(maps[cfg.stage.main_output], path, cfg.classes)
            if example is None:
                example = _example(batch, b, maps, with_labels)
        if with_labels and cfg.progress:
            bar.set_postfix({k[:3]: f"{cm.miou():.3f}" for k, cm in cms.items()})
    return cms, example


def _score_image(cfg: helper.Config, models: inference.Models, settings: inference.Settings, predictor,
                 batch: dict[str, Any], b: int, cms: dict[str, ConfusionMatrix] | None,
                 keep) -> tuple[dict[str, torch.Tensor], inference.CoarseBox | None]:
    """Image `b` of `batch` through `predictor` (`inference.WholeImage` or `CoarseToFine`):
    each strip of rows counted in `cms` (if given) against the label's same rows; returns the
    whole (H, W) uint8 class maps (on the CPU) of the outputs in `keep`, and the coarse box.
    Matrices that keep a per-image score (the challenge score) get the image's own matrix,
    added once the image is done."""
    device = cfg.device
    h, w = batch["size"][b]
    pixels = inference.ImagePixels(batch["image"][b].to(device, non_blocking=True))
    image_global = batch["image_global"][b : b + 1].to(device, non_blocking=True)
    label = batch["label"][b][:h, :w].to(device, non_blocking=True) if cms is not None else None
    maps = {name: torch.empty((h, w), dtype=torch.uint8) for name in keep}
    per_image = {name: ConfusionMatrix(cm.n_class, device, cm.miou_classes) for name, cm in (cms or {}).items()
                 if cm.challenge is not None}
    with autocast(device, cfg.amp):
        prediction = predictor.predict(cfg.stage, models, pixels, image_global, (h, w), settings, cfg.stage.outputs)
        for strip in prediction.strips:
            rows = slice(strip.top, strip.top + strip.classes.shape[0])
            if label is not None:
                per_image.get(strip.output, cms[strip.output]).update(label[rows], strip.classes)
            if strip.output in maps:
                maps[strip.output][rows] = strip.classes.to("cpu", torch.uint8)
    for name, image in per_image.items():
        cms[name].add_image(image)
    return maps, prediction.coarse


def _example(batch, b: int, maps: dict[str, torch.Tensor], with_labels: bool) -> dict[str, Any]:
    h, w = batch["size"][b]
    return {
        "id": batch["id"][b],
        "image": batch["image"][b][:, :h, :w],
        "label": batch["label"][b][:h, :w] if with_labels else None,
        # class ids fit 8 bits (--n_class <= 255): 8x less than int64 at 2448 px
        "predictions": maps,
    }


def metrics_dict(cms, classes=None) -> dict:
    """{output: {"iou": [...], "miou": m}}; a class table's `other_mious` (URUR: "miou_all")
    add their means under their keys; matrices that kept the ISIC challenge score (2-class
    tables in evaluation), "challenge_score"."""
    out = {
        name: {"iou": [None if math.isnan(x) else x for x in cm.iou()], "miou": cm.miou()} for name, cm in cms.items()
    }
    for key, counted in getattr(classes, "other_mious", ()):
        for name, cm in cms.items():
            out[name][key] = mean_iou(cm.iou(), counted)
    for name, cm in cms.items():  # 2-class tables: the ISIC challenge's score (docs/MODEL.md section 9)
        if cm.challenge is not None:
            out[name]["challenge_score"] = cm.challenge.value()
    return out


def format_table(results: dict, classes) -> str:
    """Per-class IoU table with class names, one column per output; one mIoU line per mean,
    labelled with the classes it averages (`other_mious` after `miou`); then the challenge
    score, where the results have it."""
    names = list(results)
    means = [("miou", "mIoU", classes.miou_classes)]
    means += [(key, "mIoU" + key[len("miou"):], counted) for key, counted in getattr(classes, "other_mious", ())]
    labels = [f"{title} ({counted[0]}..{counted[-1]})" for _, title, counted in means]
    width = max(14, *(len(label) + 1 for label in labels))
    lines = [f"{'class':<{width}}" + "".join(f"{k:>12}" for k in names)]
    for c, class_name in enumerate(classes.names):
        cells = "".join(
            f"{'n/a' if results[k]['iou'][c] is None else format(results[k]['iou'][c], '.4f'):>12}" for k in names
        )
        lines.append(f"{c} {class_name:<{width - 2}}" + cells)
    for (key, _, _), label in zip(means, labels):
        lines.append(f"{label:<{width}}" + "".join(f"{results[k][key]:>12.4f}" for k in names))
    if all("challenge_score" in results[k] for k in names):  # 2-class tables (section 9)
        lines.append(f"{'challenge':<{width}}" + "".join(f"{results[k]['challenge_score']:>12.4f}" for k in names))
    return "\n".join(lines)


def evaluate_shared(model, ds, args, cfg: helper.Config, frozen, procs: Processes, **kwargs):
    """`evaluate` on this process's share of `ds`, the confusion matrices summed over
    the processes (the same matrices as one process evaluating every image)."""
    loader = make_loader(dist.shard(procs, ds), args, cfg.device, shuffle=False)
    steps = math.ceil(math.ceil(len(ds) / procs.world) / args.batch_size)  # the batches of the largest share
    cms, example = evaluate(model, SharedBatches(loader, procs, cfg.device, steps), cfg, frozen, **kwargs)
    for cm in cms.values():
        dist.sum_(procs, cm.matrix)
        if cm.challenge is not None:
            dist.sum_(procs, cm.challenge.totals)
    return cms, example


def run_evaluation(args, cfg: helper.Config, model, frozen, ds, procs: Processes = SINGLE,
                   coarse_to_fine: inference.CoarseToFine | None = None) -> int:
    """Predict one split (`ds`); score it when it has labels: table, <task>.<split>.metrics.json.
    With `coarse_to_fine`, each image's box goes to <task>.<split>.boxes.json."""
    split = args.split
    t0 = time.time()
    box_log = None if coarse_to_fine is None else BoxLog(coarse_to_fine)
    cms, _ = evaluate_shared(
        model, ds, args, cfg, frozen, procs, box_log=box_log,
        predictions_dir=args.predictions_dir, with_labels=ds.labels, desc=f"{split} ({len(ds)} images)",
    )
    boxes = None if box_log is None else dist.merge_dicts(procs, box_log.boxes)
    if not procs.main:
        return 0
    elapsed = time.time() - t0
    print(f"{split}: {len(ds)} images in {elapsed:.2f} s ({elapsed / len(ds):.2f} s/image)")
    if args.predictions_dir:
        print(f"predictions: {args.predictions_dir}")
    if boxes is not None:
        path = RunFiles.of(args).boxes(split)
        write_json(path, dict(sorted(boxes.items())))
        found = sum(box is not None for box in boxes.values())
        print(f"boxes: {path} (foreground found in {found} of {len(boxes)} images)")
    if not ds.labels:
        return 0
    results = metrics_dict(cms, cfg.classes)
    print(f"IoU on {split} ({len(ds)} images), task {args.task_name}")
    print(format_table(results, cfg.classes))
    print(f"{split}: " + "  ".join(f"mIoU {k}: {v['miou']:.4f}" for k, v in results.items()))
    path = RunFiles.of(args).metrics(split)
    write_json(path, results)
    print(f"metrics: {path}")
    return 0


def wrap_distributed(step: helper.TrainStep):
    """The step wrapped in DistributedDataParallel: gradients averaged over the processes in
    the last backward of each batch (accumulate runs the others under no_sync).
    find_unused_parameters: a stage's forward leaves some trained parameters unused (mode 1:
    the context layers). Buffers (BatchNorm statistics) are broadcast from the main process
    at every forward only where a batch is one forward on every process; elsewhere the
    number of forwards differs between processes and each keeps its own statistics."""
    from torch.nn.parallel import DistributedDataParallel

    device = step.cfg.device
    sync = step.cfg.stage.one_forward_per_batch
    # newer torch names it forward_sync_buffers (broadcast_buffers is deprecated there)
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    buffers = {"forward_sync_buffers": sync} if "forward_sync_buffers" in params else {"broadcast_buffers": sync}
    return DistributedDataParallel(
        step, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True, **buffers,
    )


class Trainer:
    """One training run: the epochs left, each followed by validation, checkpoints
    (utils.run.save_epoch) and its log line. SIGINT/SIGTERM stop it at the next iteration
    or epoch boundary; `run` returns the exit code."""

    def __init__(self, args, cfg: helper.Config, model, frozen, datasets, command: str,
                 procs: Processes = SINGLE) -> None:
        self.args, self.cfg, self.model, self.frozen, self.command = args, cfg, model, frozen, command
        self.procs, self.files = procs, RunFiles.of(args)
        self.train_ds, self.val_ds = datasets["train"], datasets["crossvali"]
        self.generator = torch.Generator()
        self.sampler = None
        if procs.active:  # each process its share of every epoch, shuffled from --seed and the epoch
            self.sampler = DistributedSampler(self.train_ds, procs.world, procs.rank, shuffle=True, seed=args.seed)
        # every process has as many batches (DistributedSampler pads its shares)
        self.train_loader = SharedBatches(make_loader(self.train_ds, args, cfg.device, True, self.generator, self.sampler),
                                          procs, cfg.device)
        self.optimizer = helper.make_optimizer(helper.configure_stage(model, cfg.stage), cfg.base_lr)
        self.scaler = torch.amp.GradScaler(cfg.device.type) if cfg.amp == "fp16" else None
        self.step = helper.TrainStep(model, cfg, frozen, self.scaler)
        self.forward = wrap_distributed(self.step) if procs.active else self.step
        self.val_cfg = dataclasses.replace(cfg, tta=False, progress=cfg.progress and procs.main)  # as the original: no TTA
        self.start, self.done, self.best = 0, 0, -1.0  # done: epochs in the resume file

    def agree(self, flag: bool) -> bool:
        return dist.any_true(self.procs, flag, self.cfg.device)

    def restore(self, state: dict | None) -> None:
        """Every process restores the resume file (model, optimizer, RNG); the main process
        alone tidies and reports."""
        say = print if self.procs.main else (lambda *a, **k: None)
        if self.procs.main:
            for name in self.files.remove_stale_temps():
                say(f"removed {name}, left by an interrupted write")
        if state is not None:
            self.start, self.best = restore_training(self.model, self.optimizer, state, self.files.resume, self.scaler)
            self.done = self.start
            say(f"resumed from {self.files.resume}: {self.start} of {self.cfg.num_epochs} epochs done, best mIoU {self.best:.4f}")
            before, now, batch = state.get("processes"), self.procs.world, self.args.batch_size
            if before is not None and before != now and self.procs.main:  # (older resume files lack it)
                print(f"note: the interrupted run had {before} process(es), this one has {now}: from epoch {self.start + 1} "
                      f"on, each process trains on other images and an optimizer step sees {now * batch} image(s) "
                      f"instead of {before * batch}", file=sys.stderr)

    def run(self, state: dict | None = None) -> int:
        self.restore(state)
        if self.start >= self.cfg.num_epochs:
            if self.procs.main:
                print(f"nothing to do: all {self.cfg.num_epochs} epochs are done (a larger --num_epochs trains on)")
            return 0
        stop = GracefulStop()
        log = RunLog(self.files, self.cfg.num_epochs, len(self.train_loader), stop, self.procs, self.cfg.device)
        log.start_epoch(self.start)
        if state is not None:
            log.note(f"resumed after epoch {self.start} from {self.files.resume}")
        try:
            with stop:
                for epoch in range(self.start, self.cfg.num_epochs):
                    self.epoch(epoch, log)
                    log.check()  # a signal during validation or saving stops here, with this epoch saved
        except NonFiniteLoss as e:  # at the same iteration on every process (agreed)
            line = f"{e}: training stopped; {self._kept()}"
            if self.procs.active:
                raise dist.shared_error(self.procs, f"error: {line}", 2) from e
            raise UserError(line) from e
        except Exception as e:
            if not isinstance(e, Interrupted):
                if stop.signum is None or isinstance(e, UserError) or (isinstance(e, SharedError) and e.code == 2):
                    raise
                # e.g. a loader worker killed by the same SIGTERM (sent to the whole process group)
                e = Interrupted(stop.signum)
            if self.procs.main:
                print(f"interrupted by {e.name} ({self._where(log)}); {self._saved()}", file=sys.stderr, flush=True)
            return e.code
        finally:
            log.close()
        if not self.procs.main:
            return 0
        print(f"checkpoints: {self.files.last} (last), {self.files.best} (best val mIoU {self.best:.4f})")
        print(f"TensorBoard: tensorboard --logdir {self.args.log_path}")
        return 0

    def epoch(self, epoch: int, log: RunLog) -> None:
        cfg = self.cfg
        log.start_epoch(epoch)
        self.generator.manual_seed(self.args.seed * 1000003 + epoch)  # shuffling and augmentation depend on (seed, epoch) only
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        self.train_ds.set_epoch(epoch)
        t0 = time.time()
        stats = train_one_epoch(self.step, self.train_loader, self.optimizer, epoch, self.scaler, log.iteration,
                                       self.forward, self.agree if self.procs.active else None)
        bad = first_nonfinite(self.model)
        if self.agree(bad is not None):  # (BatchNorm statistics can differ between processes)
            raise NonFiniteLoss(f"non-finite weights after epoch {epoch + 1} (first: {bad or 'on another process'})")
        log.position = "during validation"
        cms, example = evaluate_shared(self.model, self.val_ds, self.args, self.val_cfg, self.frozen, self.procs,
                                       desc="validation")
        val = {k: cm.miou() for k, cm in cms.items()}
        log.position = "while saving"
        score = val[cfg.stage.main_output]
        if self.procs.main:
            self.best = save_epoch(self.files, self.args, self.model, self.optimizer, epoch, score, self.best, self.scaler,
                                   self.procs.world)
        else:
            self.best = max(self.best, score)
        self.done = epoch + 1
        image = example_grid(example, cfg.classes) if example is not None and self.procs.main else None
        log.epoch_end(stats, val, self.best, image, time.time() - t0)

    def _kept(self) -> str:
        if self.done:
            return (f"the weights of the last good epoch ({self.done}) are in {self.files.last}; "
                    f"lower --lr and continue with: {self.command} --lr LR")
        return f"no epoch was saved; lower --lr (now {self.cfg.base_lr:g}) and start again"

    def _where(self, log: RunLog) -> str:
        if self.done <= log.epoch:
            return f"epoch {log.epoch + 1}/{self.cfg.num_epochs}, {log.position}"
        return f"after epoch {self.done}"

    def _saved(self) -> str:
        if self.done:
            return f"epochs 1..{self.done} are saved in {self.files.resume}; continue with:\n  {self.command}"
        return "no epoch was completed, so nothing was saved: run the same command again (without --resume)"
