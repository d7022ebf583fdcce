"""End to end on a tiny synthetic data set: mode 1 training, mode 2
from its checkpoint, mode 3 from both, evaluation of mode 3 and a TTA test-split prediction,
all through `train_deep_globe.cli` in this process (`--help` in a subprocess), on the CPU with
random-init backbones, 64 px global images and 128 px patches.
"""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import load_state
from dataset.classes import DEEPGLOBE

REPO = Path(__file__).resolve().parents[1]
N_KEYS = 718  # entries of the authors' state dict (docs/MODEL.md section 1, reference key list)
KEYS_TSV = REPO / "tests" / "data" / "glnet_state_dict_keys.tsv"  # key, shape (AxB or ()), dtype
GLOBAL_PARTS = ("resnet_global", "fpn_global")
LOCAL_PARTS = ("resnet_local", "fpn_local")
# (H, W) of train (2), crossvali (2), test (1) images: mixed sizes, none square. With 128 px
# patches a side of 144..176 px gets 2 patches (overlap >= 80) and a side of 128 one patch, so
# 4 + 2 patches for training, 4 + 2 for validation and 2 for the (8-fold TTA) test image.
SIZES = [(176, 144), (128, 176), (144, 160), (160, 128), (128, 176)]


def _part(key):
    """'module.resnet_local.layer1.0.conv1.weight' -> 'resnet_local'."""
    assert key.startswith("module."), key
    return key.split(".")[1]


@pytest.fixture(scope="module")
def run(module_tmp, synthetic_data, cli):
    """The whole pipeline, once; each test below checks one aspect of what it left behind
    (the fixture itself checks that every run exits 0)."""
    root = module_tmp("e2e")
    models, logs, preds = root / "models", root / "runs", root / "preds"
    data, summary = synthetic_data(n_train=2, n_val=2, n_test=1, sizes=SIZES, seed=5)
    common = [
        "--data_path", data, "--model_path", models, "--log_path", logs, "--n_class", 7,
        "--backbone_weights", "none", "--num_workers", 0, "--no_progress", "--device", "cpu",
        "--size_g", 64, "--size_p", 128, "--batch_size", 2, "--sub_batch_size", 3,
        "--path_g", "g.pth", "--path_g2l", "g2l.pth", "--path_l2g", "l2g.pth",
    ]
    steps = {
        "mode1": ["--mode", 1, "--task_name", "g", "--num_epochs", 2],
        "mode2": ["--mode", 2, "--task_name", "g2l", "--num_epochs", 1],
        "mode3": ["--mode", 3, "--task_name", "l2g", "--num_epochs", 1],
        "eval3": ["--mode", 3, "--task_name", "l2g_eval", "--evaluation"],
        "test3": ["--mode", 3, "--task_name", "l2g_test", "--test", "--tta", "--predictions_dir", preds],
    }
    results, states = {}, {}
    for name, extra in steps.items():
        results[name] = cli(*common, *extra)
        assert results[name][0] == 0, f"{name} failed:\n{results[name][2]}\n{results[name][1][-3000:]}"
        if name.startswith("mode"):  # snapshot: later runs do not overwrite, but be sure
            task = extra[3]
            states[name] = load_state(models / f"{task}.pth")
    return {"root": root, "data": data, "models": models, "logs": logs, "preds": preds,
            "summary": summary, "results": results, "states": states}


def _reference_keys():
    ref = {}
    for line in KEYS_TSV.read_text().splitlines():
        key, shape, dtype = line.split("\t")
        ref[key] = (() if shape == "()" else tuple(int(x) for x in shape.split("x")), dtype)
    return ref


def test_checkpoints_in_the_original_format(run):
    models = run["models"]
    reference = _reference_keys()
    assert len(reference) == N_KEYS
    for task in ("g", "g2l", "l2g"):
        for suffix in (".pth", ".best.pth", ".resume.pth"):
            assert (models / f"{task}{suffix}").is_file(), task + suffix
        state = load_state(models / f"{task}.pth")
        assert len(state) == N_KEYS
        assert all(k.startswith("module.") for k in state)
        # Names, shapes and dtypes of the authors' file, key by key.
        assert {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()} == reference
        # A few spelled out.
        assert state["module.fpn_local.smooth2_1.weight"].shape == (256, 512, 3, 3)
        assert state["module.fpn_global.toplayer_ext.weight"].shape == (256, 4096, 1, 1)
        assert state["module.ensemble_conv.weight"].shape == (7, 1024, 3, 3)
    # No stray temporary files from the atomic writes.
    assert not [p.name for p in models.iterdir() if "tmp" in p.name]


def _changed(a, b, parts):
    """Keys of `parts` whose tensors differ between two state dicts."""
    return {k for k in a if _part(k) in parts and not torch.equal(a[k], b[k])}


def _params(state, parts):
    """Parameter keys (not BatchNorm buffers) of `parts`."""
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    return {k for k in state if _part(k) in parts and not k.endswith(buffers)}


def test_mode2_changes_only_local_parts_and_ensemble(run):
    g, g2l = run["states"]["mode1"], run["states"]["mode2"]
    assert set(g) == set(g2l)
    # Frozen: the global branch, BatchNorm statistics included, is bitwise the mode 1 one.
    assert _changed(g, g2l, GLOBAL_PARTS) == set()
    # Trained: every parameter of the local branch and of the ensemble conv moved.
    trained = _params(g2l, LOCAL_PARTS + ("ensemble_conv",))
    assert _changed(g, g2l, LOCAL_PARTS + ("ensemble_conv",)) >= trained
    # The local BatchNorm layers ran in train mode: their statistics moved too.
    assert not torch.equal(g["module.resnet_local.bn1.running_mean"], g2l["module.resnet_local.bn1.running_mean"])


def test_mode3_changes_only_global_parts_and_ensemble(run):
    g2l, l2g = run["states"]["mode2"], run["states"]["mode3"]
    assert _changed(g2l, l2g, LOCAL_PARTS) == set()
    changed = _changed(g2l, l2g, GLOBAL_PARTS + ("ensemble_conv",))
    # The global branch trains through its local-context path (section 2): the *_ext layers,
    # `smooth` and `classify`, and the backbone below them.
    for layer in ("toplayer_ext", "latlayer3_ext", "smooth1_1_ext", "smooth4_2_ext", "smooth", "classify"):
        assert f"module.fpn_global.{layer}.weight" in changed, layer
    assert _params(l2g, ("resnet_global", "ensemble_conv")) <= changed
    assert "module.resnet_global.bn1.running_mean" in changed


def test_mode1_trains_global_branch_from_scratch_init(run):
    # Mode 1 uses the plain global path: its layers moved away from the FPN init (bias 0).
    g = run["states"]["mode1"]
    for layer in ("toplayer", "latlayer1", "smooth4_2", "classify"):
        assert g[f"module.fpn_global.{layer}.bias"].abs().sum() > 0, layer
    # The context (_ext) layers are unused in mode 1 and keep their zero bias.
    assert torch.equal(g["module.fpn_global.toplayer_ext.bias"], torch.zeros(256))


def test_metrics_json_structure(run):
    path = run["logs"] / "l2g_eval.crossvali.metrics.json"
    metrics = json.loads(path.read_text())
    assert set(metrics) == {"global", "local", "aggregated"}
    for name, m in metrics.items():
        assert set(m) == {"iou", "miou"}, name
        assert len(m["iou"]) == 7
        assert all(x is None or (isinstance(x, float) and 0.0 <= x <= 1.0) for x in m["iou"]), m["iou"]
        assert isinstance(m["miou"], float) and 0.0 <= m["miou"] <= 1.0
        # The reported mIoU: classes 1..6, a class without pixels (null) counted as 0.
        assert m["miou"] == pytest.approx(sum(x or 0.0 for x in m["iou"][1:]) / 6)


def test_evaluation_reproduces_the_validation_score_of_training(run):
    # Evaluating the saved mode-3 checkpoint on crossvali gives the scores its training run
    # logged after its last epoch (same weights, same frozen global model, same images).
    line = (run["logs"] / "l2g.log").read_text().splitlines()[-1]
    metrics = json.loads((run["logs"] / "l2g_eval.crossvali.metrics.json").read_text())
    for name in ("global", "local", "aggregated"):
        logged = float(re.search(rf"val_{name} ([0-9.]+)", line).group(1))
        assert metrics[name]["miou"] == pytest.approx(logged, abs=1e-4), name


def test_predictions_for_every_test_image(run):
    test_ids = run["summary"]["splits"]["test"]
    assert test_ids
    palette = {tuple(int(v) for v in c) for c in DEEPGLOBE.palette}
    written = sorted(p.name for p in run["preds"].iterdir())
    assert written == sorted(f"{i}_mask.png" for i in test_ids)
    for img_id in test_ids:
        with Image.open(run["data"] / "test" / "Sat" / f"{img_id}_sat.jpg") as im:
            size = im.size
        with Image.open(run["preds"] / f"{img_id}_mask.png") as pred:
            assert pred.mode == "RGB"
            assert pred.size == size  # full resolution, (W, H)
            colours = np.unique(np.asarray(pred).reshape(-1, 3), axis=0)
        assert {tuple(int(v) for v in c) for c in colours} <= palette
    # The test image is not square, so a TTA undo that swapped sides would show here.
    assert size[0] != size[1]


def test_tensorboard_events_and_text_logs(run):
    logs = run["logs"]
    for task, epochs in (("g", 2), ("g2l", 1), ("l2g", 1)):
        assert list((logs / task).glob("events.out.tfevents.*")), task
        lines = (logs / f"{task}.log").read_text().splitlines()
        assert len(lines) == epochs, lines
        for e, line in enumerate(lines, 1):
            assert line.startswith(f"epoch {e}/{epochs} "), line
            assert math.isfinite(float(re.search(r"loss (\S+)", line).group(1)))
    # The effective arguments are written next to the logs.
    args = json.loads((logs / "g2l.train.args.json").read_text())
    assert args["mode"] == 2 and args["num_epochs"] == 1 and args["size_p"] == 128


def test_help_lists_every_flag():
    proc = subprocess.run(
        [sys.executable, str(REPO / "train_deep_globe.py"), "--help"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    original = ["--n_class", "--data_path", "--model_path", "--log_path", "--task_name", "--mode",
                "--evaluation", "--batch_size", "--sub_batch_size", "--size_g", "--size_p", "--path_g",
                "--path_g2l", "--path_l2g", "--lamb_fmreg"]
    new = ["--num_epochs", "--lr", "--device", "--num_workers", "--seed", "--predictions_dir", "--test",
           "--tta", "--backbone_weights", "--resume", "--no_progress", "--debug", "--amp", "--compile"]
    flags = set(re.findall(r"(--[a-z_0-9]+)", proc.stdout))
    assert set(original) <= flags, set(original) - flags
    assert set(new) <= flags, set(new) - flags
    # Every default is visible in --help, e.g. the original's 508 px and lamb 0.15.
    assert "default: 508" in proc.stdout and "default: 0.15" in proc.stdout
    # ... and none is shown as "None" (mode-dependent ones say what they are in words)
    assert "default: None" not in proc.stdout and "default: 120 for modes 1 and 3" in proc.stdout
