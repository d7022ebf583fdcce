"""The kernel fingerprint of this process: digests of a few float computations at the shapes of
the parity fixture (global view 64 px, patches 128 px, sub-batches of 3), and the thread count.

Float results depend on more than torch's version and ATen's CPU capability: oneDNN picks its
convolution code per CPU (avx512_core, avx512_core_bf16, amx, avx2, ...), and reductions follow
the number of threads. Two processes whose fingerprints are equal ran the same kernels on these
probes, so a fixture written by one may be compared bitwise by the other; any other fingerprint
sends the comparison to calibrated tolerances (tests/test_parity.py).

Used by tests/test_parity.py and by tests/data/make_parity_fixture.py (which stores the
fingerprint of the process that wrote the fixture); it imports nothing of the project.
"""
import hashlib

import torch
import torch.nn.functional as F


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _conv(gen: torch.Generator, shape, out_ch: int, k: int, stride: int = 1) -> str:
    """Forward and backward (input and weight gradients) of one convolution."""
    x = torch.randn(shape, generator=gen).requires_grad_()
    w = (torch.randn(out_ch, shape[1], k, k, generator=gen) * 0.05).requires_grad_()
    y = F.conv2d(x, w, stride=stride, padding=k // 2)
    gx, gw = torch.autograd.grad(y, (x, w), torch.randn(y.shape, generator=gen))
    return _digest(y, gx, gw)


def _batch_norm(gen: torch.Generator, training: bool) -> str:
    x = torch.randn(3, 64, 32, 32, generator=gen)
    mean, var = torch.randn(64, generator=gen) * 0.1, torch.rand(64, generator=gen) + 0.5
    weight, bias = torch.rand(64, generator=gen) + 0.5, torch.randn(64, generator=gen) * 0.1
    y = F.batch_norm(x, mean, var, weight, bias, training=training, momentum=0.1, eps=1e-5)
    return _digest(y, mean, var)


def fingerprint() -> dict[str, str | int]:
    """The probes' digests and the thread count (a dict that compares with ==)."""
    gen = torch.Generator().manual_seed(20190615)
    with torch.no_grad():
        small = torch.randn(1, 128, 5, 7, generator=gen)
        big = torch.randn(3, 7, 32, 32, generator=gen)
        resizes = _digest(
            F.interpolate(small, size=(32, 32), mode="bilinear", align_corners=False),  # a crop to a local map
            F.interpolate(big, size=(11, 13), mode="bilinear", align_corners=False),  # a local map to a canvas
            F.interpolate(big, size=(128, 128), mode="nearest"),  # logits to a patch
        )
        a, b = torch.randn(64, 256, generator=gen), torch.randn(256, 96, generator=gen)
        matmul = _digest(a @ b)
    return {
        "threads": torch.get_num_threads(),
        "conv_stem": _conv(gen, (3, 3, 128, 128), 64, 7, stride=2),  # ResNet conv1 on patches
        "conv_3x3": _conv(gen, (3, 64, 32, 32), 64, 3),  # a layer1 conv on patches
        "conv_1x1": _conv(gen, (1, 256, 16, 16), 64, 1),  # a bottleneck 1x1 on the global view
        "conv_fpn": _conv(gen, (1, 512, 16, 16), 128, 3),  # an FPN smooth conv with context
        "resize": resizes,
        "matmul": matmul,
        "batch_norm_train": _batch_norm(gen, True),
        "batch_norm_eval": _batch_norm(gen, False),
    }


if __name__ == "__main__":
    for key, value in fingerprint().items():
        print(f"{key}\t{value}")
