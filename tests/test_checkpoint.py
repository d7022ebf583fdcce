"""Checkpoint I/O: the authors' prefixed format, unprefixed files, clear errors."""
import pytest
import torch

from models import GLNet
from utils.checkpoint import global_keys, load_checkpoint, read_state_dict, save_state_dict
from utils.errors import UserError


@pytest.fixture(scope="module")
def saved(module_tmp):
    torch.manual_seed(3)
    m = GLNet(7)
    path = module_tmp("ckpt") / "g.pth"
    save_state_dict(m, str(path))
    return m, path


def _equal(a, b, select=lambda k: True):
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if select(k))


def test_saved_file_is_prefixed_plain_state_dict(saved):
    _, path = saved
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert len(raw) == 718
    assert all(k.startswith("module.") for k in raw)
    assert "module.fpn_local.classify.weight" in raw


def test_round_trip_prefixed(saved):
    m, path = saved
    other = GLNet(7)
    assert not _equal(m, other)
    load_checkpoint(other, str(path))
    assert _equal(m, other)


def test_round_trip_unprefixed(saved, tmp_path):
    m, _ = saved
    path = tmp_path / "plain.pth"
    torch.save(m.state_dict(), path)
    other = GLNet(7)
    load_checkpoint(other, str(path))
    assert _equal(m, other)


def test_global_keys_only(saved):
    m, path = saved
    torch.manual_seed(9)
    other = GLNet(7)
    local_before = {k: v.clone() for k, v in other.state_dict().items() if "local" in k}
    load_checkpoint(other, str(path), global_keys)
    assert _equal(m, other, lambda k: "local" not in k)
    # ensemble_conv has no 'local' in its name: it comes from the global file too
    assert torch.equal(other.ensemble_conv.weight, m.ensemble_conv.weight)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in local_before.items())


def test_global_keys_from_a_global_only_file(saved, tmp_path):
    # A file that lacks the local branch is enough for a global load, not for a full one.
    m, _ = saved
    path = tmp_path / "global_only.pth"
    torch.save({"module." + k: v for k, v in m.state_dict().items() if "local" not in k}, path)
    load_checkpoint(GLNet(7), str(path), global_keys)
    with pytest.raises(UserError, match="missing keys"):
        load_checkpoint(GLNet(7), str(path))


def test_wrong_class_count(saved):
    _, path = saved
    with pytest.raises(UserError, match="has 7 classes but --n_class is 2"):
        load_checkpoint(GLNet(2), str(path))


def test_unexpected_and_missing_keys_are_named(saved, tmp_path):
    m, _ = saved
    state = {"module." + k: v for k, v in m.state_dict().items()}
    state["module.extra.weight"] = torch.zeros(1)
    del state["module.fpn_local.smooth.bias"]
    path = tmp_path / "odd.pth"
    torch.save(state, path)
    with pytest.raises(UserError) as e:
        load_checkpoint(GLNet(7), str(path))
    msg = str(e.value)
    assert "fpn_local.smooth.bias" in msg and "extra.weight" in msg and "\n" not in msg


def test_truncated_file(saved, tmp_path):
    _, path = saved
    data = path.read_bytes()
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError, match="cannot read checkpoint"):
        read_state_dict(str(bad))


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "notes.pth"
    bad.write_text("hello")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_checkpoint(GLNet(7), str(bad))
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(GLNet(7), str(tmp_path / "missing.pth"))


def test_atomic_save_leaves_no_temp_files(saved, tmp_path):
    m, _ = saved
    path = tmp_path / "a.pth"
    save_state_dict(m, str(path))
    save_state_dict(m, str(path))  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pth"]


def test_legacy_format_file_loads(saved, tmp_path):
    # The authors' checkpoints predate torch's zip format.
    m, _ = saved
    path = tmp_path / "legacy.pth"
    torch.save({"module." + k: v for k, v in m.state_dict().items()}, path, _use_new_zipfile_serialization=False)
    other = GLNet(7)
    load_checkpoint(other, str(path))
    assert _equal(m, other)
    # as evaluation loads it: built on meta, tensors assigned (no memory map for this format)
    with torch.device("meta"):
        meta = GLNet(7, local=False, context=False)
    load_checkpoint(meta, str(path), global_keys, assign=True)
    assert _equal(meta, m, lambda k: k in meta.state_dict())


def test_global_only_model_takes_global_keys_of_a_full_file(saved):
    m, path = saved
    g = GLNet(7, local=False)
    assert g.resnet_local is None and g.fpn_local is None
    load_checkpoint(g, str(path), global_keys)
    assert _equal(m, g, lambda k: "local" not in k)


def test_plain_global_network_loads_from_a_full_file(saved):
    """GLNet(local=False, context=False) (mode-1 evaluation, the frozen model of mode 3)
    has only the plain global parts; a full file's other keys are skipped, not unexpected."""
    m, path = saved
    g = GLNet(7, local=False, context=False)
    keys = set(g.state_dict())
    assert g.ensemble_conv is None and not hasattr(g.fpn_global, "smooth")
    assert not any(k.split(".")[1].endswith("_ext") for k in keys if k.startswith("fpn_global."))
    assert {k for k in m.state_dict() if k.startswith("resnet_global.")} <= keys
    assert "fpn_global.classify.weight" in keys and "fpn_global.smooth4_2.bias" in keys
    load_checkpoint(g, str(path), global_keys)
    assert _equal(g, m, lambda k: k in keys)
    g.eval()
    m.eval()
    with torch.no_grad():
        x = torch.rand(1, 3, 64, 64)
        assert torch.equal(g(x), m(x))
        with pytest.raises(ValueError, match="context"):
            g.global_maps(x, m.global_maps(x))
    # a file lacking one of its keys still fails
    state = {k: v for k, v in torch.load(path, weights_only=True).items() if k != "module.fpn_global.toplayer.bias"}
    bad = path.parent / "no_toplayer.pth"
    torch.save(state, bad)
    with pytest.raises(UserError, match="missing keys.*fpn_global.toplayer.bias"):
        load_checkpoint(GLNet(7, local=False, context=False), str(bad), global_keys)


def test_assign_loads_into_a_meta_model(saved, tmp_path):
    """assign=True: a model built on the meta device takes the file's tensors (memory-mapped
    for zip files); nothing stays on meta and the values are the file's."""
    m, path = saved
    with torch.device("meta"):
        meta = GLNet(7)
    load_checkpoint(meta, str(path), assign=True)
    assert all(t.device.type == "cpu" for t in meta.state_dict().values())
    assert _equal(meta, m)
    # parameters stay parameters, with gradients allowed as before
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in meta.parameters())
    with torch.device("meta"):
        partial = GLNet(7)
    with pytest.raises(ValueError, match="every key"):
        load_checkpoint(partial, str(path), global_keys, assign=True)


def test_channels_last_and_other_dtypes_load_as_plain_fp32(saved, tmp_path):
    """A model trained in channels_last (CUDA) saves plain NCHW tensors; a file that holds
    channels_last or float64 tensors anyway loads by assignment as plain float32, like a
    copy into the model would."""
    m, _ = saved
    nhwc = GLNet(7, local=False, context=False).to(memory_format=torch.channels_last)
    assert not nhwc.fpn_global.smooth1_1.weight.is_contiguous()
    path = tmp_path / "nhwc.pth"
    save_state_dict(nhwc, str(path))
    assert all(v.is_contiguous() for v in torch.load(path, weights_only=True).values())

    odd = tmp_path / "odd.pth"
    state = {}
    for k, v in m.state_dict().items():
        if v.dim() == 4:
            v = v.to(memory_format=torch.channels_last)
        elif v.is_floating_point():
            v = v.double()
        state["module." + k] = v
    torch.save(state, odd)
    with torch.device("meta"):
        meta = GLNet(7)
    load_checkpoint(meta, str(odd), assign=True)
    for k, v in meta.state_dict().items():
        assert v.is_contiguous() and v.dtype == m.state_dict()[k].dtype, k
    assert _equal(meta, m)
