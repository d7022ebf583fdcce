"""Confusion matrix and IoU (GLNET_SPEC.md section 7), accumulated on the device."""
from __future__ import annotations

import math

import torch


class ConfusionMatrix:
    """n x n int64 counts (rows: label, columns: prediction) over pixels whose label
    is in 0..n-1; other labels (255 = ignore) are skipped."""

    def __init__(self, n_class: int, device: torch.device | str | None = None) -> None:
        self.n_class = n_class
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
        return mean_iou(self.iou())


def mean_iou(iou: list[float]) -> float:
    """The reported mIoU: mean over classes 1.. (class 0 'unknown' excluded), NaN as 0."""
    rest = iou[1:]
    return sum(0.0 if math.isnan(x) else x for x in rest) / len(rest)
