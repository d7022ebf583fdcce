"""GLNet parameters, forward shapes per mode, and gradients per training stage."""
import os

import pytest
import torch

import helper
import inference
from models import GLNet
from utils import amp
from models.glnet import (
    LocalCanvases, Maps, ensemble_local_half, ensemble_with_global, global2local, local2global_ensemble,
)
from utils.geometry import PatchGrid, coverage_template

# Every key of the authors' released checkpoints, with its shape (a fact about their files).
KEYS_TSV = os.path.join(os.path.dirname(__file__), "data", "glnet_state_dict_keys.tsv")


@pytest.fixture
def model(glnet):
    return glnet.eval()


def read_reference():
    ref = {}
    with open(KEYS_TSV) as f:
        for line in f:
            key, shape, dtype = line.rstrip("\n").split("\t")
            ref[key] = (() if shape == "()" else tuple(int(s) for s in shape.split("x")), dtype)
    return ref


def test_state_dict_matches_authors_checkpoints(model):
    ref = read_reference()
    ours = {
        "module." + k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()
    }
    assert len(ref) == 718
    assert ours == ref


def test_five_children_and_init():
    torch.manual_seed(1)
    m = GLNet(3)
    assert [n for n, _ in m.named_children()] == [
        "resnet_global", "resnet_local", "fpn_global", "fpn_local", "ensemble_conv"
    ]
    # FPN convs ~ N(0, 0.01) with zero bias (docs/MODEL.md section 1).
    w = m.fpn_local.smooth.weight
    assert abs(w.std().item() - 0.01) < 0.001 and abs(w.mean().item()) < 0.001
    assert torch.count_nonzero(m.fpn_global.toplayer_ext.bias) == 0
    assert m.fpn_global.classify.out_channels == 3 and m.ensemble_conv.out_channels == 3
    assert not hasattr(m.resnet_global, "fc") and not hasattr(m.resnet_global, "avgpool")


def test_backbone_strides(model):
    c = model.resnet_global(torch.rand(1, 3, 128, 96))
    assert [tuple(x.shape) for x in c] == [(1, 256, 32, 24), (1, 512, 16, 12), (1, 1024, 8, 6), (1, 2048, 4, 3)]


def test_backbone_is_torchvisions_resnet50():
    """Our ResNet-50 has torchvision's keys and, with the same weights (BN statistics
    made non-trivial), computes exactly what torchvision's ResNet-50 trunk computes."""
    torchvision = pytest.importorskip("torchvision")
    from models.resnet import ResNet50Features

    torch.manual_seed(3)
    tv = torchvision.models.resnet50(weights=None).eval()
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    ours = ResNet50Features().eval()
    tv_state = {k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    assert set(ours.state_dict()) == set(tv_state)
    ours.load_state_dict(tv_state, strict=True)
    x = torch.rand(2, 3, 96, 64)
    with torch.no_grad():
        c = ours(x)
        t = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        expected = []
        for layer in (tv.layer1, tv.layer2, tv.layer3, tv.layer4):
            t = layer(t)
            expected.append(t)
    for a, b in zip(c, expected):
        assert torch.equal(a, b)
    # random init is torchvision's, to the number, for the same seed
    torch.manual_seed(4)
    fresh = ResNet50Features()
    torch.manual_seed(4)
    tv_fresh = {k: v for k, v in torchvision.models.resnet50(weights=None).state_dict().items() if not k.startswith("fc.")}
    assert all(torch.equal(v, tv_fresh[k]) for k, v in fresh.state_dict().items())


def test_imagenet_weights_without_torchvision_is_a_clear_error(monkeypatch):
    import sys

    from models.resnet import imagenet_state_dict
    from utils.errors import UserError

    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision -> ImportError
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    with pytest.raises(UserError, match="needs torchvision"):
        imagenet_state_dict()


def _image(h, w):
    return (torch.rand(3, h, w) * 255).to(torch.uint8)


def _scores(model, mode, image, ig, size_p, sub_batch, frozen=None, backbone_batch=1):
    """inference.whole_scores of one image (the CPU's one patch per ResNet call by default)."""
    settings = inference.Settings(size_p, sub_batch, backbone_batch)
    inputs = inference.Inputs.of(inference.ImagePixels(image), ig, size_p)
    return inference.whole_scores(helper.STAGES[mode], inference.Models(model, frozen), inputs, settings)


def _local_pass(model, fglob, batches, grid, template):
    """Mode 3's first pass, as training and inference run it: the local branch on every patch
    with crops of `fglob`, its maps merged. Returns (merged maps, ps3, logits, local halves of
    the ensemble conv), the last three per patch."""
    canvases = LocalCanvases(fglob)
    ps3, outputs, halves = [], [], []
    with torch.no_grad():
        for index, patches in batches:
            for _, p3, out in model.local_patches(patches, fglob, grid, index, canvases):
                ps3.append(p3)
                outputs.append(out)
                halves.append(ensemble_local_half(model, p3))
    return canvases.finish(template), torch.cat(ps3), torch.cat(outputs), torch.cat(halves)


def test_mode1_shapes(model):
    with torch.no_grad():
        g = model.global_maps(torch.rand(2, 3, 64, 64))
    assert g.output.shape == (2, 7, 16, 16)
    assert g.ps3.shape == (2, 512, 16, 16)
    assert [tuple(x.shape[1:]) for x in g.ps0] == [(256, 2, 2), (256, 4, 4), (256, 8, 8), (256, 16, 16)]
    assert [x.shape[1] for x in g.ps2] == [128] * 4
    assert torch.equal(model(torch.zeros(1, 3, 64, 64)), model.global_maps(torch.zeros(1, 3, 64, 64)).output)


def test_mode2_shapes_and_context_is_used(model):
    grid = PatchGrid.for_size(160, 200, 128)
    image = _image(160, 200)
    with torch.no_grad():
        glob = model.global_maps(torch.rand(1, 3, 64, 64))
        index, patches = next(inference.patch_batches(image, grid, 3))
        ens, out, fmreg = global2local(model, patches, glob, grid, index)
        # different global context -> different local output
        glob2 = model.global_maps(torch.rand(1, 3, 64, 64))
        _, out2, _ = global2local(model, patches, glob2, grid, index)
    assert index == [0, 1, 2]
    assert ens.shape == out.shape == (3, 7, 32, 32)
    assert fmreg.ndim == 0 and fmreg >= 0
    assert not torch.equal(out, out2)


def test_mode2_patch_batching_does_not_change_results(model):
    grid = PatchGrid.for_size(160, 160, 128)
    image = _image(160, 160)
    with torch.no_grad():
        glob = model.global_maps(torch.rand(1, 3, 64, 64))
        whole = [global2local(model, p, glob, grid, i)[0] for i, p in inference.patch_batches(image, grid, 4)][0]
        parts = torch.cat([global2local(model, p, glob, grid, i)[0] for i, p in inference.patch_batches(image, grid, 1)])
    assert torch.allclose(whole, parts, atol=1e-5)


def test_mode3_shapes_and_split_ensemble(model):
    frozen = GLNet(7).eval()
    grid = PatchGrid.for_size(160, 200, 128)
    image = _image(160, 200)
    ig = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        fglob = frozen.global_maps(ig)
        tpl = coverage_template(grid)
        context, ps3, outputs, local_halves = _local_pass(model, fglob, inference.patch_batches(image, grid, 4), grid, tpl)
        glob = model.global_maps(ig, context)
        full = local2global_ensemble(model, glob.ps3, grid, range(len(grid)), ps3_local=ps3)
        halves = ensemble_with_global(model, local_halves, glob.ps3, grid, range(len(grid)))
    assert len(grid) == 4
    # canvases are sized like the frozen global maps
    assert [tuple(m.shape) for m in context.c] == [tuple(m.shape) for m in fglob.c]
    assert [tuple(m.shape) for m in context.ps2] == [tuple(m.shape) for m in fglob.ps2]
    assert outputs.shape == (4, 7, 32, 32) and ps3.shape == (4, 512, 32, 32)
    assert local_halves.shape == (4, 7, 32, 32)
    assert glob.output.shape == (1, 7, 16, 16)
    assert full.shape == (4, 7, 32, 32)
    assert torch.allclose(full, halves, atol=1e-5)


@pytest.mark.parametrize("mode", [1, 2, 3])
def test_predict_scores_shapes(model, mode):
    frozen = GLNet(7).eval() if mode == 3 else None
    s = _scores(model, mode, _image(160, 200), torch.rand(1, 3, 64, 64), 128, 3, frozen)
    assert s.global_.shape == (1, 7, 16, 16)
    if mode == 1:
        assert s.local is None and s.aggregated is None
    else:
        assert s.stride == 4  # starts 0, 32 and 0, 72 are multiples of 4
        assert s.local.shape == s.aggregated.shape == (7, 40, 50)
        assert torch.isfinite(s.aggregated).all()


def _batch(sizes, size_g=64):
    images = [_image(h, w) for h, w in sizes]
    labels = [torch.randint(0, 7, (h, w), dtype=torch.uint8) for h, w in sizes]
    return {
        "image": images,
        "label": labels,
        "image_global": torch.rand(len(sizes), 3, size_g, size_g),
        "label_global": torch.randint(0, 7, (len(sizes), size_g // 4, size_g // 4)),
    }


# Parameters each stage trains that its forward never uses, so they get no gradient:
# the context layers of fpn_global in mode 1, its plain layers in mode 3, ensemble_conv in mode 1.
PLAIN_GLOBAL = ("toplayer.", "latlayer1.", "latlayer2.", "latlayer3.") + tuple(
    f"smooth{k}_{j}." for k in range(1, 5) for j in (1, 2)
)


def _unused(mode, name):
    if mode == 1:
        return name.startswith("ensemble_conv") or (name.startswith("fpn_global.") and ("_ext" in name or name.startswith("fpn_global.smooth.")))
    if mode == 3:
        return name.startswith("fpn_global.") and name.removeprefix("fpn_global.").startswith(PLAIN_GLOBAL)
    return False


def _train_step(model, stage, batch, sub_batch, frozen=None):
    """One training batch through the stage's TrainStep (each micro-batch forward, then
    backward of its objective), as train_one_epoch runs it; returns the summed losses."""
    cfg = helper.Config(stage, torch.device("cpu"), 7, 128, sub_batch, 0.15, progress=False)
    step = helper.TrainStep(model, cfg, frozen)
    total = {}
    for micro in step.micro_batches(batch):
        result = step(micro)
        result.objective.backward()
        for k, v in result.losses.items():
            total[k] = total.get(k, 0.0) + v
    return total


@pytest.mark.parametrize("mode", [1, 2, 3])
def test_backward_per_stage(mode):
    torch.manual_seed(0)
    model = GLNet(7)
    stage = helper.STAGES[mode]
    frozen = GLNet(7).eval() if stage.frozen_from else None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    helper.configure_stage(model, stage)
    helper.set_train_mode(model, stage)
    out = _train_step(model, stage, _batch([(160, 160), (128, 200)]), 3, frozen)
    assert torch.isfinite(out["loss"])
    for name, p in model.named_parameters():
        part = name.split(".")[0]
        if part not in stage.trained:
            assert not p.requires_grad and p.grad is None, name
        elif _unused(mode, name):
            assert p.grad is None, name
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name
    # Frozen parts' BatchNorm statistics did not move during the forward passes.
    for name, v in model.state_dict().items():
        if name.split(".")[0] not in stage.trained:
            assert torch.equal(v, before[name]), name


@pytest.mark.parametrize("sizes", [[(160, 160)], [(160, 160), (128, 200), (144, 176)]])
def test_mode3_single_backward_equals_per_subbatch_backward(sizes):
    """The one-pass gradient of mode 3 (the local ps3 kept for the last image only, run
    again for the others) equals the original's backward per sub-batch with every ps3 kept."""
    torch.manual_seed(0)
    model = GLNet(7)
    frozen = GLNet(7).eval()
    stage = helper.STAGES[3]
    helper.configure_stage(model, stage)
    batch = _batch(sizes)
    # BatchNorm in eval so that the two forward passes are identical
    model.eval()
    _train_step(model, stage, batch, 2, frozen)
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    # The original's way: every patch's ps3 kept, then the global loss and each ensemble
    # loss backpropagate separately.
    passes = []
    for b, image in enumerate(batch["image"]):
        grid = PatchGrid.for_size(*image.shape[-2:], 128)
        with torch.no_grad():
            fglob = frozen.global_maps(batch["image_global"][b : b + 1])
        passes.append((grid, _local_pass(model, fglob, inference.patch_batches(image, grid, 2), grid,
                                         coverage_template(grid))))
    context = Maps.from_context([torch.cat(m) for m in zip(*(lp[0].context() for _, lp in passes))])
    glob = model.global_maps(batch["image_global"], context)
    helper.focal_loss(glob.output, batch["label_global"]).backward(retain_graph=True)
    for b, (grid, lp) in enumerate(passes):
        for index in inference.sub_batches(len(grid), 2):
            ens = local2global_ensemble(model, glob.ps3[b : b + 1], grid, index, ps3_local=lp[1][index])
            helper.focal_loss(ens, helper.patch_labels(batch["label"][b], grid, index)).backward(retain_graph=True)
    ref = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert ours.keys() == ref.keys()
    for n in ref:
        # equal up to float summation order: within 1e-4 of the tensor's largest gradient
        scale = ref[n].abs().max()
        assert scale > 0, n
        assert (ours[n] - ref[n]).abs().max() <= 1e-4 * scale, n


@pytest.mark.parametrize("mode", [2, 3])
@pytest.mark.parametrize("size, stride", [(240, 4), (228, 2)])
def test_coarse_canvases_equal_full_resolution(model, mode, size, stride, monkeypatch):
    # 240 px with 128 px patches: starts 0, 56, 112 (multiples of 4), so scores are
    # summed at 1/4; 228 px: starts 0, 50, 100 (even), summed at 1/2. Forcing the
    # full-resolution sum must give the very same result.
    frozen = GLNet(7).eval() if mode == 3 else None
    image, ig = _image(size, size), torch.rand(1, 3, 64, 64)
    grid = PatchGrid.for_size(size, size, 128)
    assert inference.score_grid(grid)[1] == stride
    fast = _scores(model, mode, image, ig, 128, 4, frozen)
    assert fast.stride == stride and fast.local.shape == (7, size // stride, size // stride)
    monkeypatch.setattr(inference, "score_grid", lambda g: (g, 1))
    full = _scores(model, mode, image, ig, 128, 4, frozen)
    assert full.stride == 1 and full.local.shape == (7, size, size)
    for name in ("local", "aggregated"):
        assert torch.equal(inference.upsample_canvas(getattr(fast, name), stride), getattr(full, name))


def test_score_grid_falls_back_when_unaligned():
    assert inference.score_grid(PatchGrid.for_size(2448, 2448, 508))[1] == 4
    assert inference.score_grid(PatchGrid.for_size(1224, 1224, 508))[1] == 2  # starts 0, 358, 716
    assert inference.score_grid(PatchGrid.for_size(360, 420, 128))[1] == 1  # start 77
    assert inference.score_grid(PatchGrid.for_size(250, 250, 126))[1] == 1  # patch not /4


def test_low_memory_paths_give_the_same_outputs(model):
    """Inference runs the local FPN patch by patch and merges maps as they come;
    the outputs must match the plain sub-batch computation. (oneDNN may pick other
    kernels for one sample than for several at these tiny sizes, so float rounding
    may differ; at 508 px patches we saw bitwise equality.)"""
    grid = PatchGrid.for_size(160, 200, 128)
    image = _image(160, 200)
    ig = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        glob = model.global_maps(ig)
        index, patches = next(inference.patch_batches(image, grid, 4))
        plain = global2local(model, patches, glob, grid, index)
        # mode 2 inference: the whole grid is this one sub-batch of 4 patches
        inputs = inference.Inputs(inference.ImagePixels(image), ig, grid)
        parts = list(inference.score_global2local(inference.Models(model), inputs, inference.Settings(128, 4)))
        assert [type(p).__name__ for p in parts] == ["GlobalScores", "PatchScores", "PatchScores"]
        assert [(p.output, p.index) for p in parts[1:]] == [("local", index), ("aggregated", index)]
        assert torch.allclose(plain[0], parts[2].logits, atol=1e-5) and torch.allclose(plain[1], parts[1].logits, atol=1e-5)
        # mode 3: merged canvases from per-patch merging == merging the sub-batch maps
        loc = model.local_maps(patches, glob, grid, index)
        context, ps3, outputs, _ = _local_pass(model, glob, iter([(index, patches)]), grid, coverage_template(grid))
    from utils.geometry import merge_all

    for got, maps in zip(context.context(), loc.context()):
        want = merge_all(maps, grid, got.shape[-2:], coverage_template(grid))
        assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(ps3, loc.ps3, atol=1e-5) and torch.allclose(outputs, loc.output, atol=1e-5)


@pytest.mark.parametrize("mode", [2, 3])
def test_backbone_patch_by_patch_gives_the_same_scores(model, mode):
    """On the CPU inference runs the local ResNet one patch at a time (and the mode-3
    ensemble one patch at a time); the scores must be those of whole sub-batches."""
    assert inference.backbone_batch(torch.device("cpu")) == 1
    assert inference.backbone_batch(torch.device("cuda")) is None
    frozen = GLNet(7, local=False, context=False).eval() if mode == 3 else None
    image, ig = _image(160, 200), torch.rand(1, 3, 64, 64)
    one = _scores(model, mode, image, ig, 128, 4, frozen, backbone_batch=1)
    whole = _scores(model, mode, image, ig, 128, 4, frozen, backbone_batch=None)
    for name in ("global_", "local", "aggregated"):
        a, b = getattr(one, name), getattr(whole, name)
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-5), name


def test_channels_last_models_give_the_same_scores(model):
    """CUDA runs the models in channels_last (models.build.tune_for_device); the code
    around the convolutions (crops, merges, concatenations) must not depend on the layout.
    Checked here on the CPU, where the layout is also accepted."""
    import copy

    frozen = GLNet(7, local=False, context=False).eval()
    image, ig = _image(160, 200), torch.rand(1, 3, 64, 64)
    ref = _scores(model, 3, image, ig, 128, 4, frozen)
    nhwc = copy.deepcopy(model).to(memory_format=torch.channels_last)
    fnhwc = copy.deepcopy(frozen).to(memory_format=torch.channels_last)
    assert nhwc.fpn_local.smooth.weight.is_contiguous(memory_format=torch.channels_last)
    got = _scores(nhwc, 3, image, ig, 128, 4, fnhwc)
    for name in ("global_", "local", "aggregated"):
        assert torch.allclose(getattr(got, name), getattr(ref, name), rtol=1e-4, atol=1e-4), name


def test_compile_flag_compiles_in_place_and_keeps_keys(model):
    """--compile: the ResNets and the global FPN are compiled in place (same state-dict
    keys), the scores stay those of eager mode, and an image with more patches compiles
    nothing new (no specialisation on patch indices). The 'eager' backend keeps the test fast."""
    import copy

    import torch._dynamo

    from models.build import tune_for_device

    m = copy.deepcopy(model)
    frozen = GLNet(7, local=False, context=False).eval()
    image, ig = _image(160, 200), torch.rand(1, 3, 64, 64)
    ref = _scores(m, 3, image, ig, 128, 4, frozen)
    keys = list(m.state_dict())
    torch._dynamo.reset()
    tune_for_device((m, frozen), torch.device("cpu"), compile_=True, compile_backend="eager")
    assert list(m.state_dict()) == keys
    for part in (m.resnet_global, m.resnet_local, m.fpn_global, frozen.resnet_global, frozen.fpn_global):
        assert part._compiled_call_impl is not None
    assert m.fpn_local._compiled_call_impl is None
    assert m.fpn_local.smooth.weight.is_contiguous()  # CPU: no layout change
    got = _scores(m, 3, image, ig, 128, 4, frozen)
    for name in ("global_", "local", "aggregated"):
        assert torch.allclose(getattr(got, name), getattr(ref, name), rtol=1e-5, atol=1e-6), name
    compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert compiled > 0
    # a wider image: 8 patches instead of 4, new patch indices, the same shapes
    assert len(PatchGrid.for_size(160, 300, 128)) == 8
    _scores(m, 3, _image(160, 300), torch.rand(1, 3, 64, 64), 128, 4, frozen)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled
    torch._dynamo.reset()


def test_bf16_autocast_runs_and_mostly_agrees(model):
    frozen = GLNet(7).eval()
    image, ig = _image(160, 160), torch.rand(1, 3, 64, 64)
    models, settings = inference.Models(model, frozen), inference.Settings(128, 4, 1)
    ref = inference.predict(helper.STAGES[3], models, inference.ImagePixels(image), ig, settings)
    with amp.autocast(torch.device("cpu"), "bf16"):
        low = inference.predict(helper.STAGES[3], models, inference.ImagePixels(image), ig, settings)
    for name in ("global", "local", "aggregated"):
        assert low[name].shape == ref[name].shape
        # random weights give near-ties, so not all pixels agree; most must
        assert (low[name] == ref[name]).float().mean() > 0.8, name
