"""helper.STAGES and the training step built on it: the checkpoints each run loads
(docs/MODEL.md section 1), mode-3 training keeping per-patch maps for one image only, and
the step under DistributedDataParallel (one process, gloo, CPU)."""
import copy
import dataclasses

import pytest
import torch
import torch.distributed as dist

import engine
import helper
from models import GLNet

# docs/MODEL.md section 1, "What each run loads": (mode, evaluation) -> flags, trained/evaluated
# model first, then the frozen global model.
SPEC_LOADS = {
    (1, False): [], (1, True): ["path_g"],
    (2, False): ["path_g"], (2, True): ["path_g2l"],
    (3, False): ["path_g2l", "path_g"], (3, True): ["path_l2g", "path_g"],
    (4, False): [], (4, True): ["path_local"],  # local only (section 9): from ImageNet, evaluated from its own file
}


@pytest.mark.parametrize("mode, evaluation", list(SPEC_LOADS))
def test_checkpoints_each_run_loads(mode, evaluation):
    assert helper.STAGES[mode].checkpoints(evaluation) == SPEC_LOADS[(mode, evaluation)]
    # a resumed training run takes its model from the resume file: only mode 3's frozen model is loaded
    assert helper.STAGES[mode].checkpoints(False, resuming=True) == (["path_g"] if mode == 3 else [])


def test_stage_defaults_are_the_papers():
    # section 6: 120 epochs at 5e-5 for modes 1 and 3, 50 epochs at 2e-5 for mode 2
    # (mode 4, local only, has no schedule in the paper: it takes mode 2's, that of the local branch)
    assert [(s.epochs, s.lr) for s in helper.STAGES.values()] == [(120, 5e-5), (50, 2e-5), (120, 5e-5), (50, 2e-5)]
    assert helper.STAGES[2].trained == ("resnet_local", "fpn_local", "ensemble_conv")
    assert helper.STAGES[1].trained == helper.STAGES[3].trained == ("resnet_global", "fpn_global", "ensemble_conv")


def _batch(sizes, size_g=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "image": [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes],
        "label": [torch.randint(0, 7, (h, w), dtype=torch.uint8, generator=g) for h, w in sizes],
        "image_global": torch.rand(len(sizes), 3, size_g, size_g, generator=g),
        "label_global": torch.randint(0, 7, (len(sizes), size_g // 4, size_g // 4), generator=g),
    }


def _cfg(mode, sub_batch=2):
    return helper.Config(helper.STAGES[mode], torch.device("cpu"), 7, 128, sub_batch, num_epochs=1, lr=1e-4,
                         progress=False)


@pytest.mark.parametrize("keep, expected", [(1, [False, False, True]), (3, [True, True, True])])
def test_mode3_training_keeps_per_patch_maps_of_one_image_only(glnet, monkeypatch, keep, expected):
    """The local ps3 of every patch (512 channels at 1/4 of the patch) is the large per-image
    cost of mode 3; a batch of three images keeps it for one image at a time, unless
    --keep_patch_maps asks for more (then nothing runs twice)."""
    kept, again = [], []
    real_pass, real_again = helper._local_pass, helper._ps3_again

    def local_pass(*a, **k):
        context, outputs, ps3 = real_pass(*a, **k)
        kept.append(ps3 is not None)
        return context, outputs, ps3

    def recompute(*a, **k):
        again.append(1)
        return real_again(*a, **k)

    monkeypatch.setattr(helper, "_local_pass", local_pass)
    monkeypatch.setattr(helper, "_ps3_again", recompute)
    frozen = GLNet(7, local=False, context=False).eval()
    helper.configure_stage(glnet, helper.STAGES[3])
    cfg = dataclasses.replace(_cfg(3), keep_patch_maps=keep)
    step = helper.TrainStep(glnet, cfg, frozen).train()
    for micro in step.micro_batches(_batch([(160, 160), (128, 200), (144, 176)])):
        step(micro).objective.backward()
    assert kept == expected  # one local pass per image, ps3 kept for the last `keep` ones
    assert len(again) == expected.count(False)  # the others run their local branch again
    assert glnet.ensemble_conv.weight.grad is not None and glnet.resnet_global.conv1.weight.grad is not None


def test_train_step_module_modes(glnet):
    """step.train() puts trained parts in train mode, frozen ones (and the frozen model) in eval."""
    frozen = GLNet(7, local=False, context=False)
    step = helper.TrainStep(glnet, _cfg(3), frozen).train()
    assert glnet.resnet_global.training and glnet.fpn_global.training and glnet.ensemble_conv.training
    assert not glnet.resnet_local.training and not glnet.fpn_local.training and not frozen.training
    step.eval()
    assert not glnet.resnet_global.training


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _two_copies(glnet, mode):
    """Two identical models set up for the stage (and its frozen model, and one batch)."""
    stage = helper.STAGES[mode]
    frozen = GLNet(7, local=False, context=False).eval() if stage.frozen_from else None
    helper.configure_stage(glnet, stage)
    return glnet, copy.deepcopy(glnet), frozen, _batch([(160, 160), (128, 200)])


def _step_grads(model, mode, frozen, batch, scaler=None, wrap=None):
    """The gradients of one batch through the stage's TrainStep (wrapped by `wrap`)."""
    step = helper.TrainStep(model, _cfg(mode), frozen, scaler).train()
    model.eval()  # BatchNorm in eval: every run sees the same statistics
    engine.accumulate(step, batch, step.cfg.confusion_matrices(), wrap(step) if wrap else None)
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", [1, 2, 3])
def test_train_step_under_distributed_data_parallel(glnet, process_group, mode):
    """DistributedDataParallel wraps the TrainStep: each micro-batch is one forward of the
    wrapper and one backward of its objective, and the gradients are those of the step
    alone (one process: the all-reduced mean is the gradient itself)."""
    from torch.nn.parallel import DistributedDataParallel

    plain, wrapped, frozen, batch = _two_copies(glnet, mode)
    ref = _step_grads(plain, mode, frozen, batch)
    # trained parameters that a stage's forward does not use (e.g. mode 1's context layers)
    got = _step_grads(wrapped, mode, frozen, batch,
                      wrap=lambda step: DistributedDataParallel(step, find_unused_parameters=True))
    assert ref.keys() == got.keys() and len(ref) > 0
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-7, msg=n)


class _TimesEight:
    """A stand-in for torch.amp.GradScaler: scale() multiplies by 8."""

    def scale(self, loss):
        return loss * 8.0


@pytest.mark.parametrize("mode", [1, 2, 3])
def test_fp16_loss_scale_is_applied_once(glnet, mode):
    """With a GradScaler the step scales its objective itself (mode 3: also the ensemble
    losses whose gradients it sums); train_one_epoch does not scale again. The gradients
    are 8x those of the unscaled step, not 64x."""
    first, second, frozen, batch = _two_copies(glnet, mode)
    grads = [_step_grads(first, mode, frozen, batch), _step_grads(second, mode, frozen, batch, _TimesEight())]
    plain, scaled = grads
    assert plain.keys() == scaled.keys() and plain
    for n in plain:
        torch.testing.assert_close(scaled[n], 8 * plain[n], rtol=1e-4, atol=1e-6, msg=n)
