"""Confusion matrix, IoU and the mIoU (docs/MODEL.md section 7), accumulated on the device;
the ISIC challenge's score of 2-class tables (section 9), from per-image confusion matrices."""
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
        # the ISIC challenge's score over the images added with `add_image` (evaluation of
        # 2-class tables sets it), None where not kept
        self.challenge: ChallengeScore | None = None

    def update(self, label: torch.Tensor, pred: torch.Tensor) -> None:
        n = self.n_class
        label = label.reshape(-1).to(self.matrix.device, torch.int64)
        pred = pred.reshape(-1).to(self.matrix.device, torch.int64)
        keep = (label >= 0) & (label < n)
        # Skipped pixels go to an extra bin n*n that is dropped: no boolean indexing,
        # so no host sync on a GPU and no compaction copies.
        idx = torch.where(keep, label * n + pred, n * n)
        self.matrix += torch.bincount(idx, minlength=n * n + 1)[: n * n].reshape(n, n)

    def add_image(self, image: "ConfusionMatrix") -> None:
        """Add the counts of one image's own matrix (and its challenge score, if kept)."""
        self.matrix += image.matrix
        if self.challenge is not None:
            self.challenge.add(image.matrix)

    def iou(self) -> list[float]:
        """Per-class IoU; NaN for a class absent from both labels and predictions."""
        m = self.matrix.double().cpu()
        inter = m.diag()
        union = m.sum(0) + m.sum(1) - inter
        return [float(i / u) if u > 0 else math.nan for i, u in zip(inter, union)]

    def miou(self) -> float:
        return mean_iou(self.iou(), self.miou_classes)


CHALLENGE_THRESHOLD = 0.65  # ISIC 2018 task 1: an image's IoU below this scores 0


def challenge_iou(matrix: torch.Tensor, threshold: float = CHALLENGE_THRESHOLD) -> float:
    """One image's ISIC challenge score from its 2 x 2 confusion matrix: the IoU of class 1
    (the foreground) if at least `threshold`, else 0. An image with no foreground in its
    label nor in the prediction (union 0) counts as IoU 1: nothing to find, nothing found."""
    m = matrix.double().cpu()
    inter = float(m[1, 1])
    union = float(m[0, 1] + m[1, 0] + m[1, 1])
    iou = inter / union if union > 0 else 1.0
    return iou if iou >= threshold else 0.0


class ChallengeScore:
    """The ISIC challenge's score: the mean over images of `challenge_iou`. `totals` holds
    (sum of the images' scores, number of images), float64 on the device, so that processes
    can sum them (utils.dist.sum_) as they sum confusion matrices."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.totals = torch.zeros(2, dtype=torch.float64, device=device)

    def add(self, matrix: torch.Tensor) -> None:
        """Add one image, given its own 2 x 2 confusion matrix."""
        self.totals[0] += challenge_iou(matrix)
        self.totals[1] += 1

    def value(self) -> float:
        """The mean over the images added; NaN before any."""
        total, count = (float(x) for x in self.totals.cpu())
        return total / count if count else math.nan
