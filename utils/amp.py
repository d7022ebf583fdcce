"""Mixed precision: the autocast context of --amp."""
from __future__ import annotations

import contextlib

import torch

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str | None):
    """torch.autocast for --amp bf16/fp16, or nothing (fp32, the default)."""
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])
