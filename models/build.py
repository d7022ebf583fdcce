"""The models of a run, built and loaded as its stage says (a row of helper.STAGES, passed in;
docs/MODEL.md section 1): which checkpoint feeds which part, what starts from
--backbone_weights, and the frozen global model of mode 3. Checkpoint names (--path_*) are
joined to --model_path. `stages` (all the rows) only names, in an error, the mode whose
training writes a missing or wrong checkpoint.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Iterable

import torch

from models import GLNet, LocalOnly
from models.resnet import NO_TORCHVISION, load_backbone_weights
from utils.checkpoint import all_keys, global_keys, load_checkpoint
from utils.errors import UserError


def checkpoint_path(args, flag: str) -> str:
    return os.path.join(args.model_path, getattr(args, flag))


def _hint(args, flag: str, stages: Iterable) -> str:
    writer = next((f"--mode {s.mode} training" for s in stages if s.eval_from == flag), "the training of its stage")
    return f"--{flag} should name the checkpoint written by {writer} (--path_* are relative to --model_path {args.model_path})"


def check_checkpoints_exist(args, stage, resuming: bool, stages: Iterable = ()) -> None:
    for flag in stage.checkpoints(args.evaluation, resuming):
        path = checkpoint_path(args, flag)
        if not os.path.isfile(path):
            raise UserError(f"--{flag}: checkpoint not found: {path}; {_hint(args, flag, stages)}")


def load_for_flag(model, args, flag: str, select, assign: bool = False, stages: Iterable = ()) -> None:
    """load_checkpoint, with the flag and where the file should come from in the message."""
    try:
        load_checkpoint(model, checkpoint_path(args, flag), select, assign)
    except UserError as e:
        raise UserError(f"--{flag}: {e}; {_hint(args, flag, stages)}") from e


def check_backbone_weights(source: str | None) -> None:
    if source and source.lower() == "imagenet" and importlib.util.find_spec("torchvision") is None:
        raise UserError(NO_TORCHVISION)
    if source and source.lower() not in ("imagenet", "none", "random") and not os.path.isfile(source):
        raise UserError(f"--backbone_weights {source}: no such file; use imagenet, none, or a ResNet-50 state-dict file")


def _backbone(module, source: str) -> None:
    try:
        load_backbone_weights(module, source)
    except UserError:
        raise
    except Exception as e:
        raise UserError(
            f"--backbone_weights {source} is not a torchvision ResNet-50 state dict "
            f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:150]})"
        ) from e


def new_model(n_class: int, stage, evaluation: bool) -> GLNet | LocalOnly:
    """The stage's model with random weights: the local-only network for `--mode local`
    (stage.local_only); for the evaluation of a stage that needs only the plain global network
    (stage.plain_eval), just that; otherwise the whole GLNet."""
    if stage.local_only:
        return LocalOnly(n_class)
    if evaluation and stage.plain_eval:
        return GLNet(n_class, local=False, context=False)
    return GLNet(n_class)


def _frozen_plain_global(n_class: int) -> GLNet:
    """The plain global network alone, frozen and in eval mode, random weights: what mode 3's
    frozen global model and the coarse model of --coarse_to_fine are built as."""
    model = GLNet(n_class, local=False, context=False)
    model.requires_grad_(False)
    return model.eval()


def new_frozen(n_class: int, stage) -> GLNet | None:
    """Mode 3's frozen global model with random weights, frozen and in eval mode (None for
    the other stages): only its plain global network is used (section 5)."""
    return None if stage.frozen_from is None else _frozen_plain_global(n_class)


def random_models(n_class: int, stage, device: torch.device, evaluation: bool, seed: int = 0):
    """The model and frozen model of a stage, random-init after manual_seed(seed), on the device:
    what benchmarks and tests run where no checkpoint exists."""
    torch.manual_seed(seed)
    model = new_model(n_class, stage, evaluation)
    frozen = new_frozen(n_class, stage)
    return model.to(device), (frozen.to(device) if frozen is not None else None)


def build_models(args, stage, device: torch.device, init: bool = True, stages: Iterable = ()):
    """The model (trained or evaluated) and, for mode 3, the frozen global model. init=False
    skips the model's initial weights (a resumed run loads them from its resume file).

    Evaluation builds its models on the meta device (no initialisation, no memory) and
    assigns the checkpoint's tensors (memory-mapped from zip files) instead of copying
    them; a stage whose evaluation needs only the plain global network builds just that."""
    torch.manual_seed(args.seed)
    if args.evaluation and init:
        with torch.device("meta"):
            model = new_model(args.n_class, stage, evaluation=True)
        load_for_flag(model, args, stage.eval_from, all_keys, assign=True, stages=stages)
    else:
        model = new_model(args.n_class, stage, evaluation=False)
    if init and not args.evaluation:
        for flag, global_only in stage.init_from:
            load_for_flag(model, args, flag, global_keys if global_only else all_keys, stages=stages)
        for name in stage.backbones:
            _backbone(getattr(model, name), args.backbone_weights)
    return model.to(device), build_frozen(args, stage, device, stages)


def build_frozen(args, stage, device: torch.device, stages: Iterable = ()) -> GLNet | None:
    """The frozen global model (mode 3): only its plain global network is used (section 5).
    Evaluation maps it from the file; a training run (hours, days) holds its own copy, safe
    from anything that rewrites the file in place meanwhile."""
    if stage.frozen_from is None:
        return None
    if args.evaluation:
        with torch.device("meta"):
            frozen = new_frozen(args.n_class, stage)
    else:
        frozen = new_frozen(args.n_class, stage)
    load_for_flag(frozen, args, stage.frozen_from, global_keys, assign=args.evaluation, stages=stages)
    return frozen.to(device)


COARSE_HINT = ("--path_coarse should name a --mode 1 checkpoint (the global branch trained on whole images) of "
               "--n_class classes; --path_* are relative to --model_path")


def check_coarse(args) -> None:
    """Coarse-to-fine (docs/MODEL.md section 9): --coarse_to_fine needs --path_coarse, and
    --path_coarse is read only with it; its file must exist."""
    if args.coarse_to_fine and not args.path_coarse:
        raise UserError("--coarse_to_fine needs --path_coarse FILE: the mode-1 checkpoint whose foreground box the "
                        "fine stage predicts (relative to --model_path)")
    if args.path_coarse and not args.coarse_to_fine:
        raise UserError("--path_coarse is read only with --coarse_to_fine: add it, or leave --path_coarse out")
    if args.coarse_to_fine and not os.path.isfile(checkpoint_path(args, "path_coarse")):
        raise UserError(f"--path_coarse: checkpoint not found: {checkpoint_path(args, 'path_coarse')}; {COARSE_HINT}")


def build_coarse(args, device: torch.device) -> GLNet:
    """The coarse model of --coarse_to_fine: --path_coarse loaded as mode-1 evaluation loads
    --path_g (the plain global network, on the meta device, the file's tensors assigned)."""
    with torch.device("meta"):
        coarse = _frozen_plain_global(args.n_class)
    try:
        load_checkpoint(coarse, checkpoint_path(args, "path_coarse"), all_keys, assign=True)
    except UserError as e:
        raise UserError(f"--path_coarse: {e}; {COARSE_HINT}") from e
    return coarse.to(device)


def tune_for_device(models, device: torch.device, compile_: bool = False, compile_backend: str = "inductor") -> None:
    """On CUDA, weights in channels_last (NHWC), the layout in which cuDNN's convolutions
    are fastest; with --compile, torch.compile the ResNets and the global FPN in place
    (`nn.Module.compile`, so state-dict keys and checkpoints stay as they are)."""
    for m in models:
        if m is None:
            continue
        if device.type == "cuda":
            m.to(memory_format=torch.channels_last)
        if compile_:
            # Not fpn_local: its inputs carry the patch index (global crops, merge sinks),
            # which the compiler would specialise on, recompiling for every patch.
            for name in ("resnet_global", "resnet_local", "fpn_global"):
                part = getattr(m, name, None)  # (the local-only network has no global branch)
                if part is not None:
                    part.compile(backend=compile_backend)
