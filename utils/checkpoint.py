"""Checkpoint I/O in the authors' format (docs/MODEL.md section 1).

The released `.pth` files are the state dict of the model wrapped in
`nn.DataParallel`, so every key starts with `module.`. We read prefixed and
unprefixed files, and write the prefixed format so that files move freely
between the original code and this one. Writes are atomic (utils.io.atomic_write).
"""
from __future__ import annotations

import os
import zipfile
from typing import Callable, Mapping

import torch
from torch import nn

from utils.errors import UserError
from utils.io import atomic_write

PREFIX = "module."


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file in the same folder, then rename over `path`
    (utils.io.atomic_write: a crash leaves the old file or the new one, never half)."""
    with atomic_write(path) as f:
        torch.save(obj, f)


def save_state_dict(model: nn.Module, path: str) -> None:
    """Save the model's state dict with `module.`-prefixed keys (the original format)."""
    # contiguous: a model trained in channels_last (CUDA) still writes plain NCHW tensors
    atomic_save({PREFIX + k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, path)


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read a checkpoint onto the CPU and strip the `module.` prefix."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        # mmap: tensors are read from the file as they are copied into the model,
        # instead of holding a second full copy of the weights in memory.
        # (The authors' files from torch 0.4 are in the legacy format, which cannot be mapped.)
        mmap = zipfile.is_zipfile(path)
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises many kinds for a file that is not a checkpoint
        raise UserError(f"cannot read checkpoint {path}: not a complete PyTorch file ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]})") from e
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a model state dict")
    return {k.removeprefix(PREFIX): v for k, v in state.items()}


def global_keys(key: str) -> bool:
    """The keys taken from a global checkpoint: every key without 'local' (section 1)."""
    return "local" not in key


def all_keys(key: str) -> bool:
    return True


def load_checkpoint(
    model: nn.Module, path: str, select: Callable[[str], bool] = all_keys, assign: bool = False
) -> None:
    """Load the keys of `model` chosen by `select` from `path`, strictly: every chosen
    key must be in the file with the same shape, and the file must have no chosen key the
    model lacks (keys of parts the model was built without, see `GLNet.omits`, are
    skipped). A mismatch is one UserError naming what differs.

    assign: the model's tensors become the file's tensors instead of copies of them
    (`load_state_dict(assign=True)`): for a model built on the meta device, which then
    costs neither an initialisation nor a second copy of the weights; with a zip file,
    the weights stay memory-mapped from it. Every key of the model must be chosen.
    """
    state = read_state_dict(path)
    own = {k: v for k, v in model.state_dict().items() if select(k)}
    if assign and len(own) != len(model.state_dict()):
        raise ValueError("assign=True needs a selection that covers every key of the model")
    file_classes = _n_class(state)
    if file_classes is not None and file_classes != _n_class(own):
        raise UserError(
            f"the checkpoint {path} has {file_classes} classes but --n_class is {_n_class(own)}"
        )
    # Keys outside the selection (e.g. the local branch when only global keys are
    # taken) are not looked at; among the selected ones, all must match.
    omits = getattr(model, "omits", lambda key: False)
    unexpected = [k for k in state if select(k) and k not in own and not omits(k)]
    missing = [k for k in own if k not in state]
    what = getattr(model, "title", "GLNet") + _holds(state, own)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:3])})")
        raise UserError(f"{path} does not fit {what}: " + "; ".join(parts))
    bad = [k for k in own if state[k].shape != own[k].shape]
    if bad:
        k = bad[0]
        raise UserError(
            f"{path} does not fit {what}: {k} has shape {tuple(state[k].shape)}, expected {tuple(own[k].shape)}"
        )
    if assign:
        # as a copy into the model would: the model's dtype, plain layout (no-ops, so no
        # copy and the memory map is kept, for the usual fp32 contiguous files)
        state = {k: state[k].to(dtype=own[k].dtype).contiguous() for k in own}
    model.load_state_dict({k: state[k] for k in own}, strict=False, assign=assign)


def _holds(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> str:
    """' (the file holds ...)' where the file is of the other kind of network: a GLNet's
    (resnet_global.*) against the local-only network's (resnet_local.* alone), or back."""
    def glnet(keys) -> bool:
        return any(k.startswith("resnet_global.") for k in keys)

    local_only = not glnet(state) and "fpn_local.toplayer.weight" in state and "fpn_local.smooth.weight" not in state
    if glnet(state) and not glnet(own):
        return " (the file holds a GLNet, of --mode 1, 2 or 3)"
    if local_only and glnet(own):
        return " (the file holds the local-only network of --mode local)"
    return ""


def _n_class(state: Mapping[str, torch.Tensor]) -> int | None:
    for k in ("fpn_global.classify.bias", "fpn_local.classify.bias", "ensemble_conv.bias"):
        if k in state:
            return int(state[k].shape[0])
    return None
