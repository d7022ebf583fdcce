"""Never lose a run, never crash on bad input (issue 6: atomic checkpoints, resume, one-line errors).

* Resume: 2 epochs straight (--num_workers 0) equal, bit for bit, 1 epoch + kill -9 in the middle
  of epoch 2's checkpoint write + --resume interrupted by SIGINT + the printed resume command
  (--num_workers 2): same weights, same log lines.
* Atomic writes: a writer killed mid-file leaves the previous file readable under its name.
* SIGINT/SIGTERM: the run stops at an iteration or epoch boundary, keeps what is saved, says
  how to resume, exits 130/143.
* A non-finite loss stops the run and keeps the last good checkpoint.
* Bad input: one `error:` line naming the file and the fix, exit code 2, no traceback.

Runs on the CPU on tiny synthetic data (64 px global images, 128 px patches, random init).
Interrupted runs are real subprocesses; a small wrapper (HOOKS below) makes them stop at an
exact point so that the signals and kills land where the test says.
"""
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import load_state, run_cli
from dataset.synthetic import generate
from utils.checkpoint import atomic_save, save_state_dict
from utils.io import remove_stale_temps

REPO = Path(__file__).resolve().parents[1]
FAST = ["--size_g", "64", "--size_p", "128", "--backbone_weights", "none", "--no_progress", "--device", "cpu"]
TASK = "g"

# Run the entry point in a subprocess with one hook (env ROBUSTNESS_HOOK) that stops the run at an
# exact point; ROBUSTNESS_MARKER is touched when the point is reached.
HOOKS = r'''
import io, os, signal, sys, time
import torch
import engine, helper, train_deep_globe
import utils.checkpoint as ck

hook, marker = os.environ["ROBUSTNESS_HOOK"], os.environ.get("ROBUSTNESS_MARKER")

def reached():
    open(marker, "w").close()

def wait_for_signal():
    """Block until the run's SIGINT/SIGTERM handler has seen a signal."""
    stop = signal.getsignal(signal.SIGTERM).__self__  # utils.run.GracefulStop
    deadline = time.time() + 300
    while stop.signum is None and time.time() < deadline:
        time.sleep(0.02)

if hook == "die_in_second_checkpoint_write":
    # kill -9 half-way through writing <task>.pth after epoch 2 (epoch 1's files are complete)
    real_save, real_ssd, calls = torch.save, ck.save_state_dict, []
    def dying_save(obj, f, *a, **k):
        buf = io.BytesIO()
        real_save(obj, buf, *a, **k)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        os.fsync(f.fileno())
        reached()
        os.kill(os.getpid(), signal.SIGKILL)
    def save_state_dict(model, path):
        calls.append(path)
        if len(calls) == 2:
            torch.save = dying_save
        real_ssd(model, path)
    ck.save_state_dict = save_state_dict
elif hook == "wait_in_first_step":
    # the signal arrives while the first training iteration of this process is running
    forward, steps = helper.TrainStep.forward, []
    def wrapped(*a, **k):
        out = forward(*a, **k)
        if not steps:
            reached()
            wait_for_signal()
        steps.append(1)
        return out
    helper.TrainStep.forward = wrapped
elif hook == "wait_in_validation":
    evaluate = engine.evaluate
    def wrapped(*a, **k):
        reached()
        wait_for_signal()
        return evaluate(*a, **k)
    engine.evaluate = wrapped
sys.exit(train_deep_globe.cli(sys.argv[1:]))
'''


def _spawn(args, hook=None, marker=None):
    """Start train_deep_globe.py (through HOOKS when `hook` is set) in a subprocess, in a
    process group of its own (signals go to the group, as a Ctrl-C in a terminal does)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if hook:
        env.update(ROBUSTNESS_HOOK=hook, ROBUSTNESS_MARKER=str(marker))
        cmd = [sys.executable, "-c", HOOKS, *map(str, args)]
    else:
        cmd = [sys.executable, str(REPO / "train_deep_globe.py"), *map(str, args)]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _signal_at(proc, marker, signum, timeout=300):
    """Send `signum` to the subprocess and its loader workers once it has touched `marker`;
    return (rc, out, err)."""
    deadline = time.time() + timeout
    while not Path(marker).exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (rc {proc.returncode}) before reaching the hook:\n{err[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail("the run never reached the hook")
        time.sleep(0.05)
    os.killpg(proc.pid, signum)
    return _finish(proc)


def _same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _epoch_lines(log_path):
    """The per-epoch lines of a .log without their wall-clock time."""
    lines = Path(log_path).read_text().splitlines()
    return [re.sub(r" time \S+$", "", x) for x in lines if x.startswith("epoch ")]


def _hardlink_copy(src, dst):
    """A cheap copy of a run folder (atomic writes replace files, never modify them)."""
    shutil.copytree(src, dst, copy_function=os.link)


@pytest.fixture(autouse=True)
def _drop_checkpoints(request):
    """Checkpoints are 300-550 MB each and pytest keeps its last temp folders: delete them."""
    folder = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    for p in folder.rglob("*.pth*") if folder else ():
        p.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def data(synthetic_data):
    return synthetic_data(n_train=2, n_val=1, n_test=1, size=160, seed=0)[0]


@pytest.fixture(scope="module")
def full_checkpoint(module_tmp):
    """A complete 7-class GLNet checkpoint in the authors' format."""
    from models import GLNet

    path = module_tmp("ckpt") / "full.pth"
    save_state_dict(GLNet(7), str(path))
    return path


def _run_args(data, root, *extra):
    return ["--data_path", data, "--model_path", root / "models", "--log_path", root / "runs",
            "--task_name", TASK, "--mode", 1, *FAST, *extra]


# ----------------------------------------------------------------------------- resume

@pytest.fixture(scope="module")
def chain(data, module_tmp):
    """A: 2 epochs straight. B: the same run killed (-9) while writing epoch 2's checkpoint,
    resumed and interrupted by SIGINT in its first iteration, then continued with the command
    it printed. batch_size 1: 2 iterations per epoch, so the shuffled order matters."""
    tmp = module_tmp("chain")
    a, b = tmp / "a", tmp / "b"
    res = {"a": a, "b": b}
    res["A"] = _finish(_spawn(_run_args(data, a, "--batch_size", 1, "--num_epochs", 2, "--num_workers", 0)))
    assert res["A"][0] == 0, res["A"][2][-3000:]

    b_args = _run_args(data, b, "--batch_size", 1, "--num_epochs", 2, "--num_workers", 2)
    proc = _spawn(b_args, "die_in_second_checkpoint_write", tmp / "b1.marker")
    res["B1"] = _finish(proc)
    res["B1_files"] = sorted(p.name for p in (b / "models").iterdir())
    # What the kill left under the final names (B3 overwrites them later).
    models = b / "models"
    resume, last = load_state(models / f"{TASK}.resume.pth"), load_state(models / f"{TASK}.pth")
    res["B1_saved"] = {
        "resume_epoch": resume["epoch"],
        "prefixed": all(k.startswith("module.") for k in last),
        "last_is_resume_model": _same_tensors({k.removeprefix("module."): v for k, v in last.items()}, resume["model"]),
        "best_is_last": _same_tensors(load_state(models / f"{TASK}.best.pth"), last),
    }
    del resume, last
    res["B1_log"] = _epoch_lines(b / "runs" / f"{TASK}.log")
    res["B1_resume_stat"] = os.stat(b / "models" / f"{TASK}.resume.pth")

    proc = _spawn([*b_args, "--resume"], "wait_in_first_step", tmp / "b2.marker")
    res["B2"] = _signal_at(proc, tmp / "b2.marker", signal.SIGINT)
    res["B2_resume_stat"] = os.stat(b / "models" / f"{TASK}.resume.pth")

    hint = res["B2"][2].strip().splitlines()[-1].strip()
    res["hint"] = hint
    cmd = shlex.split(hint)
    assert cmd[0] == "python" and cmd[-1] == "--resume", hint
    res["B3"] = _finish(subprocess.Popen([sys.executable, *cmd[1:]], cwd=os.getcwd(), stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True))
    assert res["B3"][0] == 0, res["B3"][2][-3000:]
    yield res
    shutil.rmtree(tmp, ignore_errors=True)


def test_kill_during_checkpoint_write_keeps_previous_file(chain):
    rc, out, err = chain["B1"]
    assert rc == -signal.SIGKILL, err[-2000:]
    assert "epoch 1/2" in out and "epoch 2/2" not in out
    # The final names hold complete files of epoch 1; the half-written one is a temp file.
    assert chain["B1_saved"] == {"resume_epoch": 1, "prefixed": True, "last_is_resume_model": True,
                                 "best_is_last": True}
    finals = {f"{TASK}.pth", f"{TASK}.best.pth", f"{TASK}.resume.pth"}
    temps = [n for n in chain["B1_files"] if n not in finals]
    assert len(temps) == 1 and re.fullmatch(re.escape(TASK) + r"\.pth\.\d+\.[0-9a-f]+\.tmp", temps[0]), chain["B1_files"]
    assert chain["B1_log"] == _epoch_lines(chain["a"] / "runs" / f"{TASK}.log")[:1]


def test_resumed_run_removes_the_stale_temp_file(chain):
    assert "left by an interrupted write" in chain["B2"][1]
    assert not [p for p in (chain["b"] / "models").iterdir() if p.name.endswith(".tmp")]


def test_sigint_stops_after_the_iteration_and_prints_the_resume_command(chain):
    rc, out, err = chain["B2"]
    assert rc == 130, err[-3000:]
    assert "resumed from" in out and "1 of 2 epochs done" in out
    assert "interrupted by SIGINT (epoch 2/2, after iteration 1 of 2)" in err
    assert "epochs 1..1 are saved in" in err and "continue with:" in err
    assert "Traceback" not in err
    # Nothing of the interrupted epoch was written.
    before, after = chain["B1_resume_stat"], chain["B2_resume_stat"]
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    hint = shlex.split(chain["hint"])
    assert hint[1].endswith("train_deep_globe.py") and hint.count("--resume") == 1
    assert hint[hint.index("--num_workers") + 1] == "2"


def test_resume_gives_the_same_weights_and_metrics_as_a_straight_run(chain):
    a, b = chain["a"], chain["b"]
    for name in (f"{TASK}.pth", f"{TASK}.best.pth"):
        assert _same_tensors(load_state(a / "models" / name), load_state(b / "models" / name)), name
    ra, rb = load_state(a / "models" / f"{TASK}.resume.pth"), load_state(b / "models" / f"{TASK}.resume.pth")
    assert ra["epoch"] == rb["epoch"] == 2 and ra["best"] == rb["best"]
    assert _same_tensors(ra["model"], rb["model"])
    sa, sb = ra["optimizer"]["state"], rb["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(_same_tensors(sa[k], sb[k]) for k in sa)
    lines_a = _epoch_lines(a / "runs" / f"{TASK}.log")
    assert len(lines_a) == 2
    assert _epoch_lines(b / "runs" / f"{TASK}.log") == lines_a
    log_b = (b / "runs" / f"{TASK}.log").read_text()
    assert log_b.count("resumed after epoch 1") == 2
    assert "epoch 2/2" in chain["B3"][1] and "Traceback" not in chain["B3"][2]


def test_resume_with_a_different_essential_arg_is_an_error(chain, data, tmp_path):
    _hardlink_copy(chain["b"], tmp_path / "b")
    base = _run_args(data, tmp_path / "b", "--num_workers", 0)
    for flag, value in (("--size_p", 256), ("--mode", 2), ("--n_class", 5), ("--batch_size", 2), ("--size_g", 128)):
        rc, out, err = run_cli(*base, flag, value, "--resume")
        assert rc == 2, (flag, err)
        assert err.startswith(f"error: --resume: {flag} {value} differs from the interrupted run"), err
        assert err.count("\n") == 1 and "another --task_name" in err


def test_resume_restores_the_args_not_given_again(chain, data, tmp_path):
    """Only the paths: epochs, batch size, sizes and the rest come from the resume file;
    the run is complete, so there is nothing to do."""
    _hardlink_copy(chain["b"], tmp_path / "b")
    models, runs = tmp_path / "b" / "models", tmp_path / "b" / "runs"
    rc, out, err = run_cli("--model_path", models, "--log_path", runs, "--task_name", TASK, "--device", "cpu",
                        "--num_workers", 0, "--no_progress", "--resume")
    assert rc == 0, err
    assert "size_g=64" in out and "batch_size=1" in out and "num_epochs=2" in out
    assert f"data_path={data} " in out
    assert "nothing to do: all 2 epochs are done" in out


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(chain, data, tmp_path):
    _hardlink_copy(chain["b"], tmp_path / "b")
    models = tmp_path / "b" / "models"
    before = load_state(models / f"{TASK}.pth")
    rc, out, err = run_cli(*_run_args(data, tmp_path / "b", "--num_workers", 0), "--resume",
                        "--num_epochs", 3, "--lr", 1e30)
    assert rc == 2, err
    assert "note: --num_epochs 3 replaces 2" in err and "note: --lr 1e+30 replaces" in err
    line = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "Traceback" not in err
    assert "non-finite loss nan at epoch 3, iteration 2 of 2 (focal_global nan): training stopped" in line[0], line[0]
    assert f"the weights of the last good epoch (2) are in {models / TASK}.pth" in line[0]
    assert _same_tensors(load_state(models / f"{TASK}.pth"), before)
    assert load_state(models / f"{TASK}.resume.pth")["epoch"] == 2
    assert "epoch 3/3" not in out


@pytest.mark.parametrize("mode", [2, 3])
def test_non_finite_loss_message_names_the_loss_parts(mode, monkeypatch):
    """Only the ensemble's loss turns NaN: the message says which part, and no step is taken.
    One 128 px image with 128 px patches: the first focal loss is the local (mode 2) or
    global (mode 3) one, the next the ensemble's."""
    import engine
    import helper
    from models import GLNet

    real_focal, calls = helper.focal_loss, []

    def focal(logits, target):
        calls.append(1)
        return real_focal(logits, target) * (float("nan") if len(calls) > 1 else 1.0)

    monkeypatch.setattr(helper, "focal_loss", focal)
    model = GLNet(7)
    frozen = GLNet(7).eval() if mode == 3 else None
    stage = helper.STAGES[mode]
    optimizer = helper.make_optimizer(helper.configure_stage(model, stage), 1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    g = torch.Generator().manual_seed(0)
    batch = {"image": [torch.randint(0, 255, (3, 128, 128), dtype=torch.uint8, generator=g)],
             "image_global": torch.rand(1, 3, 64, 64, generator=g),
             "label": [torch.randint(0, 7, (128, 128), dtype=torch.uint8, generator=g)],
             "label_global": torch.randint(0, 7, (1, 16, 16), generator=g)}
    with pytest.raises(engine.NonFiniteLoss) as e:
        cfg = helper.Config(stage, torch.device("cpu"), 7, 128, 2, num_epochs=1, lr=1e-3, progress=False)
        engine.train_one_epoch(helper.TrainStep(model, cfg, frozen), [batch], optimizer, 0)
    msg = str(e.value)
    assert msg.startswith("non-finite loss nan at epoch 1, iteration 1 of 1 ("), msg
    assert "focal_aggregated nan" in msg
    assert re.search(r"focal_global \d" if mode == 3 else r"focal_local \d.*fmreg \d", msg), msg
    params = {k: v for k, v in model.state_dict().items() if k in before and "running_" not in k}
    assert all(torch.equal(v, before[k]) for k, v in params.items())  # no optimizer step


# ----------------------------------------------------------------------------- signals

def test_sigterm_during_validation_saves_the_epoch_and_exits_143(data, tmp_path):
    proc = _spawn(_run_args(data, tmp_path, "--batch_size", 2, "--num_epochs", 3, "--num_workers", 2), "wait_in_validation",
                  tmp_path / "marker")
    rc, out, err = _signal_at(proc, tmp_path / "marker", signal.SIGTERM)
    assert rc == 143, err[-3000:]
    assert "SIGTERM: stopping after the current iteration" in err
    assert "interrupted by SIGTERM (after epoch 1); epochs 1..1 are saved in" in err
    assert err.strip().splitlines()[-1].strip().endswith("--resume")
    assert "Traceback" not in err
    assert load_state(tmp_path / "models" / f"{TASK}.resume.pth")["epoch"] == 1
    assert len(_epoch_lines(tmp_path / "runs" / f"{TASK}.log")) == 1


def test_sigterm_kills_loader_workers_too_and_still_exits_143(data, tmp_path):
    """SIGTERM to the whole group (a scheduler ending the job) in the first iteration: the
    workers die at once, the main process stops cleanly; no epoch done, so nothing to resume."""
    proc = _spawn(_run_args(data, tmp_path, "--batch_size", 2, "--num_epochs", 1, "--num_workers", 2),
                  "wait_in_first_step", tmp_path / "marker")
    rc, out, err = _signal_at(proc, tmp_path / "marker", signal.SIGTERM)
    assert rc == 143, err[-3000:]
    assert re.search(r"interrupted by SIGTERM \(epoch 1/1, (in|after) iteration 1 of 1\); no epoch was completed", err), err
    assert "Traceback" not in err and "error:" not in err
    assert not (tmp_path / "models" / f"{TASK}.resume.pth").exists()


def test_atomic_save_killed_mid_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "c.pth"
    old = {"w": torch.arange(10.0)}
    atomic_save(old, str(path))
    assert (path.stat().st_mode & 0o777) == (0o666 & ~_umask())  # not mkstemp's 0600
    script = (
        "import sys, time, torch\n"
        "from utils.checkpoint import atomic_save\n"
        "def slow(obj, f):\n"
        "    f.write(b'PK' + b'x' * 1000000); f.flush()\n"
        "    print('writing', flush=True); time.sleep(300)\n"
        "torch.save = slow\n"
        "atomic_save({'w': torch.zeros(3)}, sys.argv[1])\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.wait()
    assert _same_tensors(load_state(path), old)
    temps = [p for p in tmp_path.iterdir() if p != path]
    assert len(temps) == 1 and temps[0].name.startswith("c.pth.") and temps[0].stat().st_size > 1000000
    assert remove_stale_temps(str(path)) == [str(temps[0])]
    assert sorted(tmp_path.iterdir()) == [path]


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_prediction_write_failing_midway_keeps_the_old_file(tmp_path, monkeypatch):
    import engine

    path = tmp_path / "1_mask.png"
    engine.save_prediction(torch.zeros(8, 8, dtype=torch.int64), str(path))
    real_save = Image.Image.save

    def failing_save(self, fp, *a, **k):
        if hasattr(fp, "write"):
            fp.write(b"\x89PNG half")
        else:
            with open(fp, "wb") as f:
                f.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError):
        engine.save_prediction(torch.ones(8, 8, dtype=torch.int64), str(path))
    monkeypatch.setattr(Image.Image, "save", real_save)
    with Image.open(path) as im:
        assert im.size == (8, 8) and np.asarray(im.convert("RGB")).max() == 0


# ----------------------------------------------------------------------------- small images

def test_images_smaller_than_the_patch_are_padded(tmp_path, full_checkpoint):
    """100 x 120 images with 128 px patches: mode 2 trains (from a random global checkpoint)
    and evaluates, and the predictions have the true image size."""
    data = tmp_path / "data"
    generate(data, n_train=2, n_val=1, n_test=1, sizes=[(100, 120)], seed=1)
    (tmp_path / "m").mkdir()
    os.link(full_checkpoint, tmp_path / "m" / "g.pth")
    common = ["--data_path", data, "--model_path", tmp_path / "m", "--log_path", tmp_path / "r", "--mode", 2,
              "--batch_size", 2, "--sub_batch_size", 2, "--num_epochs", 1, "--num_workers", 0, "--path_g", "g.pth",
              "--path_g2l", "g2l.pth", *FAST]
    rc, out, err = run_cli(*common, "--task_name", "g2l")
    assert rc == 0, err
    assert "epoch 1/1" in out
    rc, out, err = run_cli(*common, "--task_name", "ev", "--evaluation", "--predictions_dir", tmp_path / "p")
    assert rc == 0, err
    assert "mIoU aggregated" in out
    preds = list((tmp_path / "p").iterdir())
    assert len(preds) == 1
    with Image.open(preds[0]) as im:
        assert im.size == (120, 100)


# ----------------------------------------------------------------------------- bad input

def _write_pair(split_dir, id_, size=(96, 96), label=None, label_size=None, image=True):
    """An RGB <id>_sat.jpg and an 'L' <id>_mask.png (or `label`, an array) in split_dir."""
    rng = np.random.default_rng(abs(hash(id_)) % 1000)
    (split_dir / "Sat").mkdir(parents=True, exist_ok=True)
    (split_dir / "Label").mkdir(parents=True, exist_ok=True)
    w, h = size
    if image:
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(split_dir / "Sat" / f"{id_}_sat.jpg")
    if label is not False:
        lw, lh = label_size or size
        arr = rng.integers(0, 7, (lh, lw), dtype=np.uint8) if label is None else label
        Image.fromarray(arr).save(split_dir / "Label" / f"{id_}_mask.png")


@pytest.fixture
def bad_data(tmp_path):
    """A valid two-split data set; tests break one file."""
    root = tmp_path / "data"
    for split in ("train", "crossvali"):
        for i in (1, 2):
            _write_pair(root / split, f"{split}{i}")
    return root


def _bad(tmp_path, data, *extra, workers=0):
    return run_cli("--data_path", data, "--model_path", tmp_path / "m", "--log_path", tmp_path / "r",
                "--num_epochs", 1, "--batch_size", 2, "--num_workers", workers, *FAST, *extra)


def _assert_one_error_line(result, *needles, code=2):
    rc, out, err = result
    assert rc == code, (rc, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and "Original" not in err and "DataLoader worker" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def test_data_path_missing(tmp_path):
    _assert_one_error_line(_bad(tmp_path, tmp_path / "nowhere"), "nowhere does not exist", "prepare_deep_globe")


def test_data_path_empty(tmp_path):
    (tmp_path / "empty").mkdir()
    _assert_one_error_line(_bad(tmp_path, tmp_path / "empty"), "has no train/ folder", "prepare_deep_globe")


def test_split_without_images(tmp_path, bad_data):
    for p in (bad_data / "crossvali" / "Sat").iterdir():
        p.unlink()
    _assert_one_error_line(_bad(tmp_path, bad_data), "no *_sat.jpg images in", "crossvali")


def test_image_without_label(tmp_path, bad_data):
    _write_pair(bad_data / "train", "lonely", label=False)
    _assert_one_error_line(_bad(tmp_path, bad_data), "image without label", "lonely_sat.jpg", "lonely_mask.png")


def test_label_without_image(tmp_path, bad_data):
    _write_pair(bad_data / "crossvali", "orphan", image=False)
    _assert_one_error_line(_bad(tmp_path, bad_data), "label without image", "orphan_mask.png")


def test_image_and_label_of_different_sizes(tmp_path, bad_data):
    _write_pair(bad_data / "crossvali", "odd", size=(96, 96), label_size=(96, 80))
    _assert_one_error_line(_bad(tmp_path, bad_data), "size mismatch", "96x96", "96x80", "odd_mask.png")


def test_rgb_mask_points_to_the_preparation_script(tmp_path, bad_data):
    rgb = np.zeros((96, 96, 3), np.uint8)
    rgb[:, :, 1] = 255
    _write_pair(bad_data / "crossvali", "colour", label=rgb)
    _assert_one_error_line(_bad(tmp_path, bad_data), "colour_mask.png", "colour mask", "python -m dataset.prepare_deep_globe")


def test_corrupt_image_is_found_before_training(tmp_path, bad_data):
    (bad_data / "crossvali" / "Sat" / "crossvali2_sat.jpg").write_bytes(b"not a jpeg at all")
    _assert_one_error_line(_bad(tmp_path, bad_data), "crossvali2_sat.jpg", "corrupt or truncated", "re-download")


def test_label_value_out_of_range_in_a_worker(tmp_path, bad_data):
    """Found by the loader in a worker process: still one clean line."""
    _write_pair(bad_data / "train", "train1", label=np.full((96, 96), 9, np.uint8))
    _assert_one_error_line(_bad(tmp_path, bad_data, workers=2), "train1_mask.png", "label value 9", "--n_class is 7")
    assert not (tmp_path / "m" / "fpn_deepglobe_global.pth").exists()


@pytest.mark.parametrize("kind", ["jpeg", "png"])
def test_truncated_file_in_a_worker(tmp_path, bad_data, kind):
    """The header is intact, the data is cut: found when the loader decodes it."""
    path = bad_data / "train" / ("Sat/train2_sat.jpg" if kind == "jpeg" else "Label/train2_mask.png")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    _assert_one_error_line(_bad(tmp_path, bad_data, workers=2), path.name, "corrupt or truncated")


def test_debug_shows_the_traceback(tmp_path):
    rc, out, err = _bad(tmp_path, tmp_path / "nowhere", "--debug")
    assert rc == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")


@pytest.mark.parametrize("flag, value", [("--size_g", 66), ("--size_p", 130), ("--size_g", 0), ("--size_p", -8)])
def test_sizes_must_be_positive_multiples_of_4(tmp_path, data, flag, value):
    _assert_one_error_line(_bad(tmp_path, data, flag, value), f"--{flag[2:]} must be a positive multiple of 4", str(value))


@pytest.mark.parametrize("mode, flag", [("1", "--size_g"), ("2", "--size_p")])
def test_training_sizes_of_32_or_less_are_refused(tmp_path, data, mode, flag):
    # the trained branch's last ResNet stage would be 1x1: BatchNorm fails on a batch of one
    _assert_one_error_line(_bad(tmp_path, data, "--mode", mode, flag, 32), f"{flag} must be more than 32", "BatchNorm")


@pytest.mark.parametrize("flag", ["--batch_size", "--sub_batch_size"])
@pytest.mark.parametrize("value", [0, -1])
def test_batch_sizes_must_be_at_least_1(tmp_path, data, flag, value):
    _assert_one_error_line(_bad(tmp_path, data, flag, value), f"{flag} must be at least 1")


def test_model_path_not_writable(tmp_path, data):
    (tmp_path / "a_file").write_text("x")
    rc, out, err = run_cli("--data_path", data, "--model_path", tmp_path / "a_file" / "sub", "--log_path",
                        tmp_path / "r", *FAST)
    _assert_one_error_line((rc, out, err), "--model_path", "a_file/sub", "is not a writable folder")


def test_log_path_not_writable(tmp_path, data):
    (tmp_path / "a_file").write_text("x")
    rc, out, err = run_cli("--data_path", data, "--model_path", tmp_path / "m", "--log_path", tmp_path / "a_file", *FAST)
    _assert_one_error_line((rc, out, err), "--log_path", "is not a writable folder")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(tmp_path, data):
    rc, out, err = _bad(tmp_path, data, "--device", "cuda")
    _assert_one_error_line((rc, out, err), "CUDA is not available", "--device cpu")


def test_device_name_that_is_not_a_device(tmp_path, data):
    _assert_one_error_line(_bad(tmp_path, data, "--device", "gpu0"), "'gpu0' is not a torch device")


def test_resume_without_a_resume_file(tmp_path, data):
    _assert_one_error_line(_bad(tmp_path, data, "--resume"), "no resume file", "fpn_deepglobe_global.resume.pth",
                           "without --resume")


def test_resume_file_that_is_damaged(tmp_path, data):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "fpn_deepglobe_global.resume.pth").write_bytes(b"PK\x03\x04 cut off")
    _assert_one_error_line(_bad(tmp_path, data, "--resume"), "cannot read", "resume.pth", "without --resume")


def test_backbone_weights_file_missing(tmp_path, data):
    _assert_one_error_line(run_cli("--data_path", data, "--model_path", tmp_path / "m", "--log_path", tmp_path / "r",
                                *FAST, "--backbone_weights", tmp_path / "r50.pth"),
                           "--backbone_weights", "r50.pth: no such file")


# ----------------------------------------------------------------------------- bad checkpoints

def _with_checkpoints(tmp_path, data, mode, **flags):
    """Mode `mode` with checkpoints in tmp_path; flags without a value are None."""
    flags = [x for k, v in flags.items() for x in ([f"--{k}"] if v is None else [f"--{k}", v])]
    return run_cli("--data_path", data, "--model_path", tmp_path, "--log_path", tmp_path / "r", "--mode", mode,
                *FAST, "--num_workers", 0, *flags)


def test_checkpoint_missing_names_the_flag(tmp_path, data):
    _assert_one_error_line(_with_checkpoints(tmp_path, data, 2, path_g="nope.pth"), "--path_g: checkpoint not found",
                           "nope.pth", "--mode 1 training")


def test_mode3_without_its_global_checkpoint(tmp_path, data, full_checkpoint):
    os.link(full_checkpoint, tmp_path / "g2l.pth")
    _assert_one_error_line(_with_checkpoints(tmp_path, data, 3, path_g2l="g2l.pth", path_g="gone.pth"),
                           "--path_g: checkpoint not found", "gone.pth")


def test_mode3_with_a_global_checkpoint_that_is_not_one(tmp_path, data, full_checkpoint):
    os.link(full_checkpoint, tmp_path / "g2l.pth")
    (tmp_path / "g.pth").write_bytes(b"\x00" * 100)
    _assert_one_error_line(_with_checkpoints(tmp_path, data, 3, path_g2l="g2l.pth", path_g="g.pth"),
                           "--path_g: cannot read checkpoint", "g.pth", "--mode 1 training")


def test_checkpoint_of_another_class_count(tmp_path, data):
    torch.save({"module.fpn_global.classify.bias": torch.zeros(5)}, tmp_path / "g.pth")
    _assert_one_error_line(_with_checkpoints(tmp_path, data, 2, path_g="g.pth"), "--path_g", "has 5 classes but --n_class is 7")


def test_checkpoint_lacking_the_parts_the_mode_needs(tmp_path, data, full_checkpoint):
    """Mode 2 evaluation needs the local branch; a global-only file lacks it."""
    state = load_state(full_checkpoint)
    torch.save({k: v for k, v in state.items() if "local" not in k}, tmp_path / "g2l.pth")
    _assert_one_error_line(_with_checkpoints(tmp_path, data, 2, path_g2l="g2l.pth", evaluation=None),
                           "--path_g2l", "missing keys", "resnet_local", "--mode 2 training")


def test_resume_file_keeps_the_fp16_grad_scaler_state(tmp_path):
    """--amp fp16: the GradScaler's scale (which adapts during training) is saved with each
    epoch and restored by --resume, so a resumed run does not restart from the initial scale."""
    import argparse

    from models import GLNet
    from utils import run

    args = argparse.Namespace(model_path=str(tmp_path), task_name="t", amp="fp16")
    model = GLNet(3, local=False, context=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    scaler.scale(torch.ones(()))
    scaler.update(new_scale=1234.0)  # as if training had lowered it
    files = run.RunFiles(str(tmp_path), str(tmp_path), "t")
    run.save_epoch(files, args, model, optimizer, 0, 0.5, -1.0, scaler)
    state = torch.load(files.resume, weights_only=False)
    fresh = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    epochs, best = run.restore_training(model, optimizer, state, "x", fresh)
    assert (epochs, best) == (1, 0.5)
    assert fresh.get_scale() == 1234.0
