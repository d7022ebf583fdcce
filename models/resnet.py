"""ResNet-50 feature extractor in torchvision's layout, without `fc` and `avgpool`.

The parameter names are torchvision's (conv1, bn1, layer1..layer4, each block with
conv1..conv3, bn1..bn3 and downsample.0/.1), which are also the names inside the
authors' checkpoints and in torchvision's ImageNet weights (docs/MODEL.md section 1):
the stride of a stage sits on the 3x3 conv of its first block. The classes are our
own so that inference does not import torchvision (about 190 MB of resident memory
and half a second of start-up); torchvision is imported only to fetch ImageNet
weights. tests/test_model.py checks the outputs against torchvision's ResNet-50.
"""
from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from utils.errors import UserError


NO_TORCHVISION = (
    "--backbone_weights imagenet needs torchvision (pip install torchvision); "
    "or give a ResNet-50 state-dict file, or none for random init"
)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 (4x width) with batch norms, plus the shortcut."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class ResNet50Features(nn.Module):
    """ResNet-50 returning c2, c3, c4, c5 (strides 4, 8, 16, 32; 256..2048 channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        cin = 64
        for k, (width, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)), 1):
            layer = []
            for b in range(blocks):
                layer.append(Bottleneck(cin, width, stride if b == 0 else 1))
                cin = width * Bottleneck.expansion
            self.add_module(f"layer{k}", nn.Sequential(*layer))
        # torchvision's ResNet-50 builds its 1000-class `fc` at this point: drawing the same
        # random numbers gives, for a given seed, the very weights torchvision's would have.
        nn.Linear(512 * Bottleneck.expansion, 1000)
        # torchvision's initialisation (used when no ImageNet weights are loaded; skipped
        # on the meta device, where there is nothing to fill)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) and m.weight.is_meta:
                continue
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

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
    try:
        from torchvision.models import ResNet50_Weights

        return ResNet50_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
    except ImportError as e:
        raise UserError(NO_TORCHVISION) from e
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
