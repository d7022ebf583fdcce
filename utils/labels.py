"""The label conventions that the data, the loss and the metrics share: the ignored label value
and the reported mIoU (docs/MODEL.md section 7). Pure Python, so that the data tools, which
import it through the class tables, stay free of torch.
"""
from __future__ import annotations

import math
from typing import Sequence

IGNORE_LABEL = 255  # label value skipped by the loss and the metrics (padding, no label)


def mean_iou(iou: Sequence[float], classes: Sequence[int] | None = None) -> float:
    """The reported mIoU: mean of iou[c] over `classes`, a NaN (class absent from labels and
    predictions) counted as 0 (section 7); None = classes 1.. (class 0 'unknown' excluded).
    NaN when `classes` is empty (a 1-class table)."""
    values = [iou[c] for c in (range(1, len(iou)) if classes is None else classes)]
    if not values:
        return math.nan
    return sum(0.0 if math.isnan(x) else x for x in values) / len(values)
