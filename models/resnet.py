"""ResNet-50 feature extractor: torchvision's ResNet-50 without `fc` and `avgpool`.

The parameter names are torchvision's (conv1, bn1, layer1..layer4), which are also
the names inside the authors' checkpoints (GLNET_SPEC.md section 1).
"""
from __future__ import annotations

import os
import warnings

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet


class ResNet50Features(ResNet):
    """ResNet-50 returning c2, c3, c4, c5 (strides 4, 8, 16, 32; 256..2048 channels)."""

    def __init__(self) -> None:
        super().__init__(Bottleneck, [3, 4, 6, 3])
        del self.fc, self.avgpool

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return c2, c3, c4, c5


def imagenet_state_dict() -> dict[str, torch.Tensor] | None:
    """torchvision's ImageNet ResNet-50 weights (V1, as the original used), or None
    with a one-line warning when they can be neither found in the cache nor downloaded."""
    from torchvision.models import ResNet50_Weights

    try:
        return ResNet50_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
    except Exception as e:  # offline, proxy, corrupt cache: all mean "no weights"
        warnings.warn(
            f"ImageNet ResNet-50 weights unavailable ({type(e).__name__}); "
            "the backbones start from random init",
            stacklevel=2,
        )
        return None


def load_backbone_weights(backbone: nn.Module, source: str | None) -> bool:
    """Initialise a ResNet50Features from `source`: None/'none' (keep random init),
    'imagenet' (torchvision download or cache), or the path of a state dict file
    (torchvision ResNet-50 keys; `fc.*` is ignored). Returns True if weights were loaded.
    """
    if source is None or source.lower() in ("", "none", "random"):
        return False
    if source.lower() == "imagenet":
        state = imagenet_state_dict()
        if state is None:
            return False
    else:
        if not os.path.isfile(source):
            raise FileNotFoundError(f"backbone weights file not found: {source}")
        state = torch.load(source, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith(("fc.", "module.fc."))}
    backbone.load_state_dict(state, strict=True)
    return True
