"""Writes tests/data/parity_7e34ebe.pt: the outputs of the code at commit 7e34ebe (before the
architecture rework of issue 10) on small synthetic setups, so that tests/test_parity.py can
prove that later code gives the very same predictions, metrics and training.

It uses the APIs of that commit and is kept for provenance, not run by the tests. Run it with
that commit's code first on the import path:

    git worktree add /tmp/base 7e34ebe
    PYTHONPATH=/tmp/base python tests/data/make_parity_fixture.py tests/data/parity_7e34ebe.pt

What it stores:
- `fingerprint`: tests/kernel_fingerprint.py's probes in the writing process (thread count,
  digests of convolutions, resizes, matmul, batch norm at the fixture's shapes). A test whose
  process has the same fingerprint compares bitwise; any other, within calibrated tolerances.
- per mode and evaluation image, the score canvases (global, local, aggregated); mode 3's TTA
  class maps of image 0 (uint8: classes 0..6); per mode the confusion matrices of the three
  images;
- per mode, two training iterations (Adam, as the stage trains): the loss of each, and of the
  first step's gradients a sample of each trained tensor (`GRAD_SAMPLES` evenly spaced elements
  of the flattened gradient, float32) with the tensor's gradient norm. Gradients are continuous
  in the inputs; the weights after Adam steps are not (its first steps are about lr * sign(g)).

Inputs are random (torch generators with fixed seeds): the file holds their sha256 digests
(the test makes them again from the seeds and checks the digests), not the inputs themselves.
"""
import hashlib
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import helper
from dataset.deep_globe import _pad, _to_float
from models import GLNet

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernel_fingerprint import fingerprint  # noqa: E402  (tests/, not the old commit's code)

SIZE_G, SIZE_P, SUB = 64, 128, 3
IMAGE_SIZES = [(160, 200), (228, 228), (100, 140)]  # the last is padded to 128 x 140
TRAIN_SIZES = [(160, 160), (128, 200)]
GRAD_SAMPLES = 256


def sample(h, w, seed, labels=True):
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
    label = torch.randint(0, 7, (h, w), dtype=torch.uint8, generator=g)
    im = Image.fromarray(image.permute(1, 2, 0).numpy())
    ph, pw = max(h, SIZE_P), max(w, SIZE_P)
    im = _pad(im, ph, pw, (0, 0, 0))
    lab = _pad(Image.fromarray(label.numpy()), ph, pw, 255)
    return {
        "raw_image": image, "raw_label": label,
        "image": torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1),
        "image_global": _to_float(im.resize((SIZE_G, SIZE_G), Image.BILINEAR)),
        "label": torch.from_numpy(np.asarray(lab).copy()),
        "label_global": torch.from_numpy(np.asarray(lab.resize((SIZE_G // 4, SIZE_G // 4), Image.NEAREST)).astype(np.int64)),
        "size": (h, w), "id": f"img{seed}",
    }


def batch_of(samples):
    out = {k: [s[k] for s in samples] for k in samples[0]}
    out["image_global"] = torch.stack(out["image_global"])
    out["label_global"] = torch.stack(out["label_global"])
    return out


def digest(t):
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest(), tuple(t.shape), str(t.dtype)


def digests(samples):
    return [{k: digest(v) for k, v in smp.items() if isinstance(v, torch.Tensor)} for smp in samples]


def models(seed):
    torch.manual_seed(seed)
    model = GLNet(7).eval()
    torch.manual_seed(seed + 1)
    frozen = GLNet(7, local=False, context=False).eval()
    return model, frozen


def gradient_sample(grad: torch.Tensor) -> torch.Tensor:
    """GRAD_SAMPLES elements at evenly spaced indices, in integer arithmetic (a float linspace
    rounds differently under other kernels and would pick other elements)."""
    flat = grad.detach().flatten()
    k = min(flat.numel(), GRAD_SAMPLES)
    index = torch.arange(k, dtype=torch.int64) * (flat.numel() - 1) // max(k - 1, 1)
    return flat[index].float().clone()


def first_step_gradients(model, optimizer) -> dict:
    """Records, at the first optimizer step, a sample and the norm of each gradient."""
    names = {id(p): n for n, p in model.named_parameters()}
    grads = {}

    def hook(opt, args, kwargs):
        if grads:
            return
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    grads[names[id(p)]] = {"sample": gradient_sample(p.grad), "norm": p.grad.double().norm().item()}

    optimizer.register_step_pre_hook(hook)
    return grads


def main(out):
    fixture = {"torch": torch.__version__, "fingerprint": fingerprint(),
               "size_g": SIZE_G, "size_p": SIZE_P, "sub_batch": SUB}
    samples = [sample(h, w, 100 + i) for i, (h, w) in enumerate(IMAGE_SIZES)]
    fixture["eval_digests"] = digests(samples)
    model, frozen = models(11)
    scores = {}
    for mode in (1, 2, 3):
        for i, s in enumerate(samples):
            sc = helper.predict_scores(model, mode, s["image"], s["image_global"][None], SIZE_P, SUB, frozen)
            scores[(mode, i)] = {"global": sc.global_, "local": sc.local, "aggregated": sc.aggregated, "stride": sc.stride}
    fixture["scores"] = scores
    tta = helper.predict(model, 3, samples[0]["image"], samples[0]["image_global"][None], SIZE_P, SUB, frozen, tta=True)
    fixture["tta_mode3_image0"] = {k: v.to(torch.uint8) for k, v in tta.items()}
    cms = {}
    for mode in (1, 2, 3):
        loader = [batch_of(samples[:2]), batch_of(samples[2:])]
        got, _ = helper.evaluate(model, loader, mode, torch.device("cpu"), 7, SIZE_P, SUB, frozen, progress=False)
        cms[mode] = {k: cm.matrix.clone() for k, cm in got.items()}
    fixture["confusion"] = cms

    train = [sample(h, w, 200 + i) for i, (h, w) in enumerate(TRAIN_SIZES)]
    train2 = [sample(h, w, 300 + i) for i, (h, w) in enumerate(reversed(TRAIN_SIZES))]
    fixture["train_digests"] = [digests(train), digests(train2)]
    training = {}
    for mode in (1, 2, 3):
        model, frozen = models(21)
        params = helper.configure_stage(model, mode)
        opt = helper.make_optimizer(params, 1e-4)
        grads = first_step_gradients(model, opt)
        losses = []
        helper.train_one_epoch(
            model, [batch_of(train), batch_of(train2)], opt, mode, 0, 2, 1e-4, torch.device("cpu"), 7, SIZE_P, SUB,
            0.15, frozen if mode == 3 else None, progress=False,
            on_iteration=lambda i, lr, loss: losses.append(loss),
        )
        training[mode] = {"losses": losses, "gradients": grads}
    fixture["training"] = training
    torch.save(fixture, out)


if __name__ == "__main__":
    main(sys.argv[1])
