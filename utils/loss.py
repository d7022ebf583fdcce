"""Focal loss of the original (docs/MODEL.md section 6)."""
import torch
import torch.nn.functional as F

from utils.labels import IGNORE_LABEL


def focal_loss(
    logits: torch.Tensor, target: torch.Tensor, gamma: float = 3.0, eps: float = 1e-7, ignore_index: int = IGNORE_LABEL
) -> torch.Tensor:
    """Mean over pixels of -(1 - p_t)^gamma * log(p_t), p_t = softmax probability of the
    target class clamped to [eps, 1 - eps]. logits (B, C, H, W), target (B, H, W).

    Pixels labelled `ignore_index` (255: padding) are left out of the mean; class 0 is
    trained like any other class, as in the original.
    """
    c = logits.shape[1]
    logits = logits.permute(0, 2, 3, 1).reshape(-1, c)
    target = target.reshape(-1).long()
    keep = target != ignore_index
    if not bool(keep.all()):
        if not bool(keep.any()):  # nothing to learn from (e.g. an all-ignore crop): zero, not NaN
            return logits.sum() * 0.0
        logits, target = logits[keep], target[keep]
    p = F.softmax(logits, dim=1).gather(1, target[:, None])[:, 0].clamp(eps, 1.0 - eps)
    return (-((1.0 - p) ** gamma) * p.log()).mean()
