"""What the command lines share (train_deep_globe.py, predict.py): the help formatter that shows
every default once, --mode by a stage's number or name, the torch device of --device, and the
check that an output folder is writable. Entry points import this module, never one another.
"""
from __future__ import annotations

import argparse
import os
import tempfile

from utils.errors import UserError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default, except where the help already says what it is (defaults that
    depend on the mode) or there is none to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default:" in text or action.default is None:
            return text
        return super()._get_help_string(action)


def _stage_choices() -> str:
    """'1 or global, 2 or global2local, ...': the stages of helper.STAGES by number and name."""
    import helper

    return ", ".join(f"{m} or {s.name}" for m, s in helper.STAGES.items())


def stage_mode(text: str) -> int:
    """argparse type of --mode: a stage's number or name (helper.STAGES) -> its number."""
    import helper

    for mode, stage in helper.STAGES.items():
        if text.strip() in (str(mode), stage.name):
            return mode
    raise argparse.ArgumentTypeError(f"{text!r} is no stage: choose {_stage_choices()}")


def mode_help() -> str:
    """--mode's help: the stages by number and name."""
    return "the stage, by number or name: " + _stage_choices()


def get_device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"--device {name!r} is not a torch device ({e})") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but CUDA is not available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def ensure_writable_dir(folder: str, flag: str) -> None:
    """Create `folder` and write a probe file into it (os.access says yes to root even on a
    read-only file system)."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"{flag} {folder} is not a writable folder ({e.strerror or e}); choose another {flag}") from e
