"""--evaluation --split (issue 14): the paper's figures are on test, so any split with labels
can be scored, under its own metrics file; a split without labels gives predictions and a
note; eval_deep_globe.sh takes SPLIT=."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from models import GLNet
from utils.checkpoint import save_state_dict

REPO = Path(__file__).resolve().parents[1]
FAST = ["--size_g", 64, "--size_p", 128, "--device", "cpu", "--no_progress", "--num_workers", 0]


@pytest.fixture(scope="module")
def setup(synthetic_data, module_tmp):
    """crossvali/ (2 labelled images), test/ = a copy of crossvali/ with its labels, and
    unlabelled/ = the same images without Label/; a random-init global checkpoint."""
    src, _ = synthetic_data(n_train=1, n_val=2, n_test=0, size=160, seed=4)
    root = module_tmp("splits")
    data = root / "data"
    shutil.copytree(src / "crossvali", data / "crossvali")
    shutil.copytree(src / "crossvali", data / "test")
    shutil.copytree(src / "crossvali" / "Sat", data / "train" / "Sat")  # unlabelled train/
    models = root / "models"
    models.mkdir()
    save_state_dict(GLNet(7, local=False, context=False), str(models / "g.pth"))
    return {"data": data, "models": models, "logs": root / "runs", "root": root}


def _eval(setup, cli, *extra):
    return cli("--mode", 1, "--evaluation", "--data_path", setup["data"], "--model_path", setup["models"],
               "--log_path", setup["logs"], "--path_g", "g.pth", "--task_name", "t", *FAST, *extra)


def test_test_split_with_labels_scores_as_crossvali_and_files_coexist(setup, cli):
    rc, out, err = _eval(setup, cli)  # default: crossvali
    assert rc == 0, err
    rc, out_test, err = _eval(setup, cli, "--split", "test")
    assert rc == 0, err
    assert "IoU on test (2 images)" in out_test and "test: mIoU global" in out_test
    crossvali = json.loads((setup["logs"] / "t.crossvali.metrics.json").read_text())
    test = json.loads((setup["logs"] / "t.test.metrics.json").read_text())
    # the same images in both splits: the very same scores, in two files side by side
    assert test == crossvali
    assert (setup["logs"] / "t.evaluation.test.args.json").is_file()
    assert (setup["logs"] / "t.evaluation.crossvali.args.json").is_file()


def test_split_without_labels_gives_predictions_and_a_note(setup, cli, tmp_path):
    preds = tmp_path / "preds"
    rc, out, err = _eval(setup, cli, "--split", "train", "--predictions_dir", preds, "--task_name", "u")
    assert rc == 0, err
    assert "train/ has no Label/ folder: predictions only" in err
    assert sorted(p.name for p in preds.iterdir()) == sorted(
        f.replace("_sat.jpg", "_mask.png") for f in os.listdir(setup["data"] / "train" / "Sat"))
    assert not (setup["logs"] / "u.train.metrics.json").exists()


def test_split_without_labels_and_nowhere_to_write_is_one_error(setup, cli):
    rc, out, err = _eval(setup, cli, "--split", "train", "--task_name", "v")
    assert rc == 2
    assert err.strip().count("\n") == 0 and "no train/Label/ folder" in err and "--predictions_dir" in err


def test_test_flag_still_predicts_without_scoring(setup, cli, tmp_path):
    rc, out, err = _eval(setup, cli, "--test", "--predictions_dir", tmp_path / "p", "--task_name", "w")
    assert rc == 0, err
    assert len(list((tmp_path / "p").iterdir())) == 2
    assert not (setup["logs"] / "w.test.metrics.json").exists()  # --test writes predictions only


def test_split_is_for_evaluation_only(setup, cli):
    rc, out, err = cli("--mode", 1, "--split", "test", "--data_path", setup["data"], *FAST)
    assert rc == 2 and "--split chooses what --evaluation predicts" in err


def test_eval_script_takes_split(setup):
    env = dict(os.environ, PYTHON=sys.executable, SPLIT="test", MODE="1", DATA_PATH=str(setup["data"]),
               MODEL_PATH=str(setup["models"]), LOG_PATH=str(setup["root"] / "script_runs"), PATH_G="g.pth",
               SIZE_G="64", SIZE_P="128", DEVICE="cpu", NUM_WORKERS="0", TASK_NAME="s")
    proc = subprocess.run([str(REPO / "eval_deep_globe.sh"), "--no_progress"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (setup["root"] / "script_runs" / "s.test.metrics.json").is_file()
