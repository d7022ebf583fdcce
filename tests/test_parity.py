"""Today's code against a stored fixture of the code before the architecture rework (commit
7e34ebe; written by tests/data/make_parity_fixture.py): the same score canvases, TTA class maps,
confusion matrices, training losses and first-step gradients on small synthetic setups.

Bitwise or within tolerances
----------------------------
Float results depend on the CPU's kernels, not only on torch's version: oneDNN picks its
convolution code per CPU (avx512_core, avx512_core_bf16, amx, avx2, ...) and reductions follow
the thread count. The fixture stores the kernel fingerprint of the process that wrote it
(tests/kernel_fingerprint.py: digests of convolutions forward and backward, resizes, a matmul and
batch norm at the fixture's shapes, and the thread count). Where this process has the same
fingerprint and torch version, every comparison is bitwise. Anywhere else it is within the
tolerances below, each a margin over the largest difference measured on one machine (a 2-vCPU
VM, AMD EPYC with avx512_bf16, torch 2.14.1+cu130; the fixture written there natively, 2
threads) under four other kernel choices: native on 1 thread, AVX2 (ATEN_CPU_CAPABILITY=avx2
DNNL_MAX_CPU_ISA=AVX2) on 2 threads and on 1, and baseline (ATEN_CPU_CAPABILITY=default
DNNL_MAX_CPU_ISA=SSE41) on 1 thread. "Relative" is |difference| / |expected| for a number, and
for a tensor max |difference| / max |expected| (scores) or ||difference|| / ||expected||
(gradient samples; the norm of the whole gradient likewise):

| quantity | largest measured (kernels) | tolerance | a real change (conv +0.1%) |
|---|---|---|---|
| score canvases, each output of each image | 8.8e-6 (baseline) | SCORE_REL 1e-4 | 0.027-0.034 |
| TTA class maps, pixels that differ where the top two scores are apart by more than 2 SCORE_REL of the largest score | 0 | 0 | 32 pixels |
| confusion matrices, counts moved beyond 2 per pixel whose top two scores are that close | 0 | 0 | 280 |
| loss of iteration 1 | 6.4e-6 (baseline) | 2e-5 | 4.1e-5 (mode 1) to 0.026 |
| loss of iteration 2 (after one Adam step) | 7.7e-4 (AVX2) | 3e-3 | 1.2e-3 (mode 1) to 0.026 |
| first-step gradient of an FPN or ensemble tensor | 4.9e-4 (baseline) | GRAD_REL 2e-3 | about 5e-3 (mode 1) to 0.053 |
| first-step gradient of a ResNet tensor | 0.086 (baseline) | GRAD_RESNET_REL 0.25 | up to 0.095 |

The ResNets train with BatchNorm on the statistics of 2 images whose last maps are 2x2 (global
view) or 4x4 (patches): its backward amplifies rounding by orders of magnitude, so their gradients are
held to a loose bound and the FPN's (continuous to rounding) to a tight one. Weights after the
Adam steps are not compared: Adam's first steps are about lr * sign(gradient), so a gradient that
differs by rounding flips some steps, and sums of millions of weights drift far beyond rounding;
the loss of the second iteration sees the first step. Gradients are sampled at indices computed
in integer arithmetic (a float linspace rounds differently under other kernels and would pick
other elements).

`python tests/test_parity.py` prints the largest differences of this process against the fixture
(the calibration above), and whether it would compare bitwise; `--conv-change` prints them with
every convolution's output off by 0.1%. test_a_real_change_is_caught shows that the tolerances
fail for that change, and for a patch stride off by one.
"""
import hashlib
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

if __name__ == "__main__":  # run as a script: the project and tests/ on the path
    sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import engine
import helper
import inference
import utils.geometry
from dataset.deep_globe import image_views, label_views
from kernel_fingerprint import fingerprint
from models import GLNet

FIXTURE = Path(__file__).parent / "data" / "parity_7e34ebe.pt"
# the inputs of the fixture (tests/data/make_parity_fixture.py): image sizes and their seeds
EVAL_SIZES = [(160, 200), (228, 228), (100, 140)]  # seeds 100, 101, 102; the last one is padded
TRAIN_SIZES = [[(160, 160), (128, 200)], [(128, 200), (160, 160)]]  # seeds 200, 201 and 300, 301

# Tolerances of the comparisons under other kernels: margins over the largest differences
# measured (module docstring).
SCORE_REL = 1e-4
LOSS_REL = (2e-5, 3e-3)  # iteration 1; iteration 2, after one Adam step
GRAD_REL = 2e-3
GRAD_RESNET_REL = 0.25


def _digest(t):
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest(), tuple(t.shape), str(t.dtype)


def _sample(h, w, seed, ref):
    """A random image and label (the fixture's seeds), made into model inputs by today's code."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
    label = torch.randint(0, 7, (h, w), dtype=torch.uint8, generator=g)
    views = image_views(Image.fromarray(image.permute(1, 2, 0).numpy()), ref["size_g"], ref["size_p"])
    views.update(label_views(Image.fromarray(label.numpy()), ref["size_g"], ref["size_p"]))
    return {"raw_image": image, "raw_label": label, **views, "id": f"img{seed}"}


def _samples(ref, sizes, first_seed, digests):
    samples = [_sample(h, w, first_seed + i, ref) for i, (h, w) in enumerate(sizes)]
    # the very inputs the old code saw (its preprocessing included)
    assert [{k: _digest(v) for k, v in s.items() if isinstance(v, torch.Tensor)} for s in samples] == digests
    return samples


def load_reference():
    ref = torch.load(FIXTURE, weights_only=False)
    ref["eval_samples"] = _samples(ref, EVAL_SIZES, 100, ref["eval_digests"])
    ref["train_samples"] = [_samples(ref, sizes, seed, d)
                            for sizes, seed, d in zip(TRAIN_SIZES, (200, 300), ref["train_digests"])]
    ref["bitwise"] = ref["torch"] == torch.__version__ and ref["fingerprint"] == fingerprint()
    return ref


def models(seed):
    torch.manual_seed(seed)
    model = GLNet(7).eval()
    torch.manual_seed(seed + 1)
    frozen = GLNet(7, local=False, context=False).eval()
    return model, frozen


def batch_of(samples):
    out = {k: [s[k] for s in samples] for k in samples[0]}
    out["image_global"] = torch.stack(out["image_global"])
    out["label_global"] = torch.stack(out["label_global"])
    return out


def settings(ref, tta: bool = False) -> inference.Settings:
    return inference.Settings.for_device(torch.device("cpu"), ref["size_p"], ref["sub_batch"], tta=tta)


def scores_of(stage, eval_models, image, image_global, ref) -> inference.Scores:
    """The stage's whole-image scores of one image (3, H, W) uint8 and its global view (1, 3, g, g)."""
    inputs = inference.Inputs.of(inference.ImagePixels(image), image_global, ref["size_p"])
    return inference.whole_scores(stage, inference.Models(*eval_models), inputs, settings(ref))


# ----------------------------------------------------------------------------- comparisons
# Each check returns what differs (an empty list: the same) and records its largest measure
# in `worst`, so that the tests, the calibration and the real-change test share them.

def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.abs().max().item()
    diff = (got.double() - expected.double()).abs().max().item()
    return diff / scale if scale else diff


def _note(worst: dict, key: str, value: float) -> None:
    worst[key] = max(worst.get(key, 0.0), value)


def compare(got, expected, bitwise: bool, rel: float, what: str, worst: dict, key: str) -> list[str]:
    if expected is None:
        return [] if got is None else [f"{what}: expected none"]
    if got is None or got.shape != expected.shape or got.dtype != expected.dtype:
        return [f"{what}: got {None if got is None else (tuple(got.shape), got.dtype)}, "
                f"expected {(tuple(expected.shape), expected.dtype)}"]
    if bitwise:
        return [] if torch.equal(got, expected) else [f"{what}: not bitwise equal"]
    r = _relative(got, expected)
    _note(worst, key, r)
    return [] if r <= rel else [f"{what}: relative difference {r:.3g} > {rel:g}"]


def near_ties(scores: torch.Tensor, rel: float) -> torch.Tensor:
    """Where the top two of (C, ...) scores are within rel * 2 of the largest |score|: pixels whose
    class may flip by rounding alone."""
    top2 = scores.topk(2, dim=0).values
    return (top2[0] - top2[1]) <= 2 * rel * scores.abs().max()


def pixel_scores(s: inference.Scores, name: str, size) -> torch.Tensor:
    """An output's scores at full resolution, as `inference.predict` turns them into class maps."""
    if name == "global":
        return inference.upsample_global(s.global_, size)
    return inference.upsample_canvas(getattr(s, name), s.stride)


def check_scores(ref, eval_models, mode, bitwise, worst, images=(0, 1, 2)) -> list[str]:
    model, frozen = eval_models
    bad = []
    for i in images:
        s = ref["eval_samples"][i]
        got = scores_of(helper.STAGES[mode], eval_models, s["image"], s["image_global"][None], ref)
        exp = ref["scores"][(mode, i)]
        if got.stride != exp["stride"]:
            bad.append(f"mode {mode} image {i}: stride {got.stride}, expected {exp['stride']}")
            continue
        for name in ("global", "local", "aggregated"):
            bad += compare(getattr(got, "global_" if name == "global" else name), exp[name], bitwise, SCORE_REL,
                           f"mode {mode} image {i} {name}", worst, "score")
    return bad


def _tta_scores(eval_models, stage, s, ref) -> dict[str, torch.Tensor]:
    """The summed scores behind `inference.predict` with TTA's class maps (for the near ties)."""
    total = {}
    for flip in (False, True):
        for k in range(4):
            view = inference.dihedral(s["image"], k, flip)
            got = scores_of(stage, eval_models, view, inference.dihedral(s["image_global"][None], k, flip), ref)
            for name in stage.outputs:
                v = inference.undo_dihedral(pixel_scores(got, name, view.shape[-2:]), k, flip)
                total[name] = v if name not in total else total[name] + v
    return total


def check_tta(ref, eval_models, bitwise, worst) -> list[str]:
    model, frozen = eval_models
    s = ref["eval_samples"][0]
    got = inference.predict(helper.STAGES[3], inference.Models(model, frozen), inference.ImagePixels(s["image"]),
                            s["image_global"][None], settings(ref, tta=True))
    if got.keys() != ref["tta_mode3_image0"].keys():
        return [f"TTA outputs {sorted(got)}, expected {sorted(ref['tta_mode3_image0'])}"]
    if not bitwise:
        totals = _tta_scores(eval_models, helper.STAGES[3], s, ref)
    bad = []
    for name, exp in ref["tta_mode3_image0"].items():
        assert got[name].max() < 7  # the fixture stores the class maps as uint8
        differ = got[name].to(torch.uint8) != exp
        if not bitwise:
            differ &= ~near_ties(totals[name], SCORE_REL)
        _note(worst, "class_map_pixels", int(differ.sum()))
        if differ.any():
            bad.append(f"TTA {name}: {int(differ.sum())} pixels differ{'' if bitwise else ' beyond near ties'}")
    return bad


def check_confusion(ref, eval_models, mode, bitwise, worst) -> list[str]:
    model, frozen = eval_models
    stage, samples = helper.STAGES[mode], ref["eval_samples"]
    loader = [batch_of(samples[:2]), batch_of(samples[2:])]
    cfg = helper.Config(stage, torch.device("cpu"), 7, ref["size_p"], ref["sub_batch"], progress=False)
    cms, _ = engine.evaluate(model, loader, cfg, frozen)
    exp = ref["confusion"][mode]
    if cms.keys() != exp.keys():
        return [f"mode {mode}: outputs {sorted(cms)}, expected {sorted(exp)}"]
    ties = dict.fromkeys(exp, 0)
    if not bitwise:  # a pixel whose top two scores tie within rounding may move between two cells
        for s in samples:
            got = scores_of(stage, eval_models, s["image"], s["image_global"][None], ref)
            h, w = s["size"]
            for name in exp:
                ties[name] += int(near_ties(pixel_scores(got, name, s["image"].shape[-2:]), SCORE_REL)[..., :h, :w].sum())
    bad = []
    for name in exp:
        moved = int((cms[name].matrix - exp[name]).abs().sum())
        _note(worst, "confusion_beyond_ties", max(0, moved - 2 * ties[name]))
        if moved > 2 * ties[name]:
            bad.append(f"mode {mode} {name}: confusion matrices differ by {moved} counts ({ties[name]} near ties)")
    return bad


def training_run(ref, mode):
    """Two iterations of the stage's training: the losses and the first step's gradients."""
    model, frozen = models(21)
    stage = helper.STAGES[mode]
    opt = helper.make_optimizer(helper.configure_stage(model, stage), 1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    grads = {}

    def first_step(optimizer, args, kwargs):
        if not grads:
            grads.update({names[id(p)]: p.grad.detach().clone() for g in optimizer.param_groups for p in g["params"]
                          if p.grad is not None})

    opt.register_step_pre_hook(first_step)
    cfg = helper.Config(stage, torch.device("cpu"), 7, ref["size_p"], ref["sub_batch"], 0.15, num_epochs=2, lr=1e-4,
                        progress=False)
    step = helper.TrainStep(model, cfg, frozen if stage.frozen_from else None)
    losses = []
    train, train2 = ref["train_samples"]
    engine.train_one_epoch(step, [batch_of(train), batch_of(train2)], opt, 0,
                           on_iteration=lambda i, lr, loss: losses.append(loss))
    return losses, grads


def _gradient_sample(grad: torch.Tensor, n: int) -> torch.Tensor:
    """The fixture's sample of a gradient: n evenly spaced elements of it, flattened (indices in
    integer arithmetic, the same under every kernel)."""
    flat = grad.flatten()
    return flat[torch.arange(n, dtype=torch.int64) * (flat.numel() - 1) // max(n - 1, 1)].float()


def _l2_relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.double().norm().item()
    diff = (got.double() - expected.double()).norm().item()
    return diff / scale if scale else diff


def gradient_tolerance(name: str) -> tuple[str, float]:
    """(measure key, tolerance) of a trained tensor: the ResNets train with BatchNorm on batch
    statistics of 2 images, whose backward amplifies rounding (module docstring)."""
    return ("grad_resnet", GRAD_RESNET_REL) if name.startswith("resnet_") else ("grad", GRAD_REL)


def check_training(ref, mode, bitwise, worst) -> list[str]:
    losses, grads = training_run(ref, mode)
    exp = ref["training"][mode]
    bad = []
    if len(losses) != len(exp["losses"]):
        return [f"mode {mode}: {len(losses)} iterations, expected {len(exp['losses'])}"]
    for k, (a, b) in enumerate(zip(losses, exp["losses"])):
        r, tol = abs(a - b) / abs(b), LOSS_REL[k]
        if not bitwise:
            _note(worst, f"loss_{k + 1}", r)
        if (a != b) if bitwise else r > tol:
            bad.append(f"mode {mode} loss of iteration {k + 1}: {a!r}, expected {b!r} (relative difference {r:.3g})")
    if grads.keys() != exp["gradients"].keys():
        return bad + [f"mode {mode}: gradients of {len(grads)} tensors, expected {len(exp['gradients'])}"]
    for name, e in exp["gradients"].items():
        sample = _gradient_sample(grads[name], e["sample"].numel())
        norm = grads[name].double().norm().item()
        if bitwise:
            if not torch.equal(sample, e["sample"]) or norm != e["norm"]:
                bad.append(f"mode {mode} gradient of {name}: not bitwise equal")
            continue
        key, tol = gradient_tolerance(name)
        r = max(_l2_relative(sample, e["sample"]), abs(norm - e["norm"]) / e["norm"] if e["norm"] else norm)
        _note(worst, key, r)
        if r > tol:
            bad.append(f"mode {mode} gradient of {name}: relative difference {r:.3g} > {tol:g}")
    return bad


# ----------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def ref():
    return load_reference()


@pytest.fixture(scope="module")
def eval_models():
    return models(11)


def _report(bad: list[str], ref) -> str:
    how = "bitwise (same kernel fingerprint)" if ref["bitwise"] else "within tolerances (other kernels)"
    return f"compared {how}; {len(bad)} differences:\n" + "\n".join(bad[:20])


@pytest.mark.parametrize("mode", [1, 2, 3])
def test_scores_are_unchanged(ref, eval_models, mode):
    bad = check_scores(ref, eval_models, mode, ref["bitwise"], {})
    assert not bad, _report(bad, ref)


def test_tta_predictions_are_unchanged(ref, eval_models):
    bad = check_tta(ref, eval_models, ref["bitwise"], {})
    assert not bad, _report(bad, ref)


@pytest.mark.parametrize("mode", [1, 2, 3])
def test_confusion_matrices_are_unchanged(ref, eval_models, mode):
    bad = check_confusion(ref, eval_models, mode, ref["bitwise"], {})
    assert not bad, _report(bad, ref)


@pytest.mark.parametrize("mode", [1, 2, 3])
def test_training_losses_and_gradients_are_unchanged(ref, mode):
    bad = check_training(ref, mode, ref["bitwise"], {})
    assert not bad, _report(bad, ref)


def test_a_real_change_is_caught(ref, eval_models, monkeypatch):
    """The tolerances are tight enough: every convolution's output off by 0.1% fails the scores and
    the training checks (mode 1); a patch stride off by one fails the scores of mode 2."""
    conv2d = F.conv2d
    with monkeypatch.context() as m:
        m.setattr(F, "conv2d", lambda *a, **k: conv2d(*a, **k) * 1.001)
        assert check_scores(ref, eval_models, 1, False, {})
        assert check_training(ref, 1, False, {})
    starts = utils.geometry.patch_starts

    def off_by_one(length, patch):  # the interior starts of a side, one pixel more per step
        s = starts(length, patch)
        return [t + i for i, t in enumerate(s[:-1])] + s[-1:]

    with monkeypatch.context() as m:  # image 1 (228 px sides) has patches at 0, 50, 100: 0, 51, 100
        m.setattr(utils.geometry, "patch_starts", off_by_one)
        assert check_scores(ref, eval_models, 2, False, {}, images=[1])


def test_the_fingerprint_sees_the_thread_count():
    """Reductions follow the thread count: a fixture written on 2 threads is not bitwise on 1."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fingerprint()
        torch.set_num_threads(2)
        two = fingerprint()
    finally:
        torch.set_num_threads(threads)
    assert one["threads"] == 1 and two["threads"] == 2 and one != two


def calibrate(conv_change: bool = False) -> None:
    """Prints this process's largest differences against the fixture (tolerance measures);
    with `conv_change`, those of the real change test_a_real_change_is_caught makes."""
    if conv_change:
        conv2d = F.conv2d
        F.conv2d = lambda *a, **k: conv2d(*a, **k) * 1.001
    reference = load_reference()
    worst, bad = {}, []
    pair = models(11)
    for mode in (1, 2, 3):
        bad += check_scores(reference, pair, mode, False, worst)
        bad += check_confusion(reference, pair, mode, False, worst)
        bad += check_training(reference, mode, False, worst)
    bad += check_tta(reference, pair, False, worst)
    print(f"fingerprint matches the fixture's: {reference['bitwise']}; threads {torch.get_num_threads()}, "
          f"ATen {torch.backends.cpu.get_cpu_capability()}")
    for key, value in sorted(worst.items()):
        print(f"{key}\t{value:.3g}")
    print("\n".join(bad) if bad else "within every tolerance")


if __name__ == "__main__":
    calibrate(conv_change="--conv-change" in sys.argv[1:])
