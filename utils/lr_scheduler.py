"""Poly learning-rate schedule, stepped every iteration (docs/MODEL.md section 6)."""
import torch


def poly_lr(base_lr: float, epoch: int, i: int, iters_per_epoch: int, num_epochs: int, power: float = 0.9) -> float:
    """lr = base * (1 - T/N)^power with T = epoch * iters_per_epoch + i, N = num_epochs * iters_per_epoch."""
    t = epoch * iters_per_epoch + i
    n = num_epochs * iters_per_epoch
    return base_lr * (1.0 - t / n) ** power


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
