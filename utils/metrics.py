"""Confusion matrix, IoU and the mIoU (docs/MODEL.md section 7), accumulated on the device."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from utils.labels import mean_iou


class ConfusionMatrix:
    """n x n int64 counts (rows: label, columns: prediction) over pixels whose label
    is in 0..n-1; other labels (255 = ignore) are skipped.

    miou_classes: the classes averaged by `miou()` (a ClassTable's `miou_classes`);
    None = 1..n-1, class 0 'unknown' left out as in the paper."""

    def __init__(
        self, n_class: int, device: torch.device | str | None = None, miou_classes: Sequence[int] | None = None
    ) -> None:
        self.n_class = n_class
        self.miou_classes = tuple(range(1, n_class)) if miou_classes is None else tuple(miou_classes)
        self.matrix = torch.zeros(n_class, n_class, dtype=torch.int64, device=device)

    def update(self, label: torch.Tensor, pred: torch.Tensor) -> None:
        n = self.n_class
        label = label.reshape(-1).to(self.matrix.device, torch.int64)
        pred = pred.reshape(-1).to(self.matrix.device, torch.int64)
        keep = (label >= 0) & (label < n)
        # Skipped pixels go to an extra bin n*n that is dropped: no boolean indexing,
        # so no host sync on a GPU and no compaction copies.
        idx = torch.where(keep, label * n + pred, n * n)
        self.matrix += torch.bincount(idx, minlength=n * n + 1)[: n * n].reshape(n, n)

    def iou(self) -> list[float]:
        """Per-class IoU; NaN for a class absent from both labels and predictions."""
        m = self.matrix.double().cpu()
        inter = m.diag()
        union = m.sum(0) + m.sum(1) - inter
        return [float(i / u) if u > 0 else math.nan for i, u in zip(inter, union)]

    def miou(self) -> float:
        return mean_iou(self.iou(), self.miou_classes)
