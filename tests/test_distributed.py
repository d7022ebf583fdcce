"""Several processes (torch.distributed, gloo on the CPU, 2 processes): gradients are
synchronised exactly once per optimizer step in every mode, even when the processes cut their
batches into different numbers of micro-batches; torchrun runs of train_deep_globe.py write
their files once and score evaluation exactly as one process does."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
# rank 0: one 160 x 160 image (4 patches of 128 px: 2 sub-batches of 2); rank 1: one 128 x 200
# image (2 patches: 1 sub-batch) -> in mode 2 the ranks run 2 and 1 micro-batches per step.
RANK_SIZES = [[(160, 160)], [(128, 200)]]


def _batch(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    return {
        "image": [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes],
        "label": [torch.randint(0, 7, (h, w), dtype=torch.uint8, generator=g) for h, w in sizes],
        "image_global": torch.rand(len(sizes), 3, 64, 64, generator=g),
        "label_global": torch.randint(0, 7, (len(sizes), 16, 16), generator=g),
    }


def _worker(rank, world, store, mode, synchronise, out):
    import engine
    import helper
    from models.build import random_models

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        stage = helper.STAGES[mode]
        # the same initial weights everywhere (seed 0; DDP also broadcasts rank 0's)
        model, frozen = random_models(7, stage, torch.device("cpu"), evaluation=False)
        optimizer = helper.make_optimizer(helper.configure_stage(model, stage), 1e-3)
        cfg = helper.Config(stage, torch.device("cpu"), 7, 128, 2, num_epochs=1, progress=False)
        step = helper.TrainStep(model, cfg, frozen)
        forward = engine.wrap_distributed(step) if synchronise else step
        batches = [_batch(RANK_SIZES[rank], 10 * rank + k) for k in range(2)]  # different images per rank
        engine.train_one_epoch(step, batches, optimizer, 0, forward=forward)
        torch.save({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _train_two_ranks(tmp_path, mode, synchronise):
    out = tmp_path / f"params_{mode}_{synchronise}"
    mp.spawn(_worker, args=(2, str(tmp_path / f"store_{mode}_{synchronise}"), mode, synchronise, str(out)), nprocs=2)
    return torch.load(f"{out}.0"), torch.load(f"{out}.1")


@pytest.mark.parametrize("mode", [1, 2, 3, 4])  # 4: local only, mode 2's uneven micro-batches
def test_every_rank_holds_the_same_weights_after_two_steps(tmp_path, mode):
    a, b = _train_two_ranks(tmp_path, mode, synchronise=True)
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("mode", [2, 4])
def test_without_synchronisation_the_ranks_differ(tmp_path, mode):
    """The check above can fail: the same two steps without the DDP wrapper leave each rank
    with weights of its own images."""
    a, b = _train_two_ranks(tmp_path, mode, synchronise=False)
    assert any(not torch.equal(a[name], b[name]) for name in a)


# ----------------------------------------------------------------------------- --sync_bn

SYNC_STEPS = 3


def _pair_batches(same: bool):
    """SYNC_STEPS batches of two images (mode 1 reads their global views and labels), in
    float64; with `same`, the two images of a batch are one image twice."""
    batches = []
    for k in range(SYNC_STEPS):
        b = _batch([(64, 64), (64, 64)], 100 + k)
        b["image_global"] = b["image_global"].double()
        if same:
            b = {key: [v[0], v[0]] if isinstance(v, list) else v[:1].repeat(2, *[1] * (v.dim() - 1))
                 for key, v in b.items()}
        batches.append(b)
    return batches


def _half(batch, r):
    """Image r of a two-image batch, as a batch of one."""
    return {k: v[r : r + 1] for k, v in batch.items()}


def _train_mode1(model, batches, device, forward_of=None):
    """Mode-1 steps with plain SGD: its update is linear in the gradient, so that float
    noise in the gradients stays noise in the weights (Adam would scale it up where the
    gradient is about zero)."""
    import engine
    import helper

    stage = helper.STAGES[1]
    optimizer = torch.optim.SGD(helper.configure_stage(model, stage), lr=0.01)
    cfg = helper.Config(stage, device, 7, 128, 2, num_epochs=1, progress=False)
    step = helper.TrainStep(model, cfg)
    engine.train_one_epoch(step, batches, optimizer, 0, forward=forward_of(step) if forward_of else None)
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _sync_bn_worker(rank, world, store, device_name, sync_bn, same, out):
    """Process `rank` of 2: image `rank` of every batch, batch 1, DDP (engine.wrap_distributed),
    BatchNorm converted to SyncBatchNorm when `sync_bn` (as train_deep_globe.py --sync_bn)."""
    import engine
    from models import GLNet

    device = torch.device("cpu")
    if device_name == "cuda":  # both processes on GPU 0 when there is one (gloo takes CUDA tensors)
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = GLNet(7)
        if sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        params = _train_mode1(model.to(device, torch.float64), [_half(b, rank) for b in _pair_batches(same)], device,
                              engine.wrap_distributed)
        torch.save(params, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("device, sync_bn, same, equal", [
    ("cpu", False, False, False),
    ("cpu", False, True, True),
    pytest.param("cuda", True, False, True,
                 marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="SyncBatchNorm needs CUDA")),
])
def test_two_processes_of_one_image_against_one_process_of_two(tmp_path, device, sync_bn, same, equal):
    """Mode 1, three steps: 2 processes x batch 1 against 1 process x batch 2 on the same
    images, compared within float tolerance.
    - With --sync_bn (SyncBatchNorm, GPUs only), the weights agree.
    - Without it, each process's BatchNorm normalises its one image alone: the weights
      differ (the comparison can fail) ...
    - ... except when both images are the same image, whose statistics are those of the
      pair: then they agree, which checks on the CPU everything but SyncBatchNorm (the
      averaged gradients equal those of the two-image batch).
    In float64: at these tiny sizes (64 px global views, a 2 x 2 last ResNet stage whose
    BatchNorm sees 4 values per channel) float32 rounding alone changes some gradients by
    tens of percent between a batch of one image and the same image twice."""
    from models import GLNet

    torch.manual_seed(0)
    dev = torch.device(device)
    one = _train_mode1(GLNet(7).to(dev, torch.float64), _pair_batches(same), dev)
    out = tmp_path / "params"
    mp.spawn(_sync_bn_worker, args=(2, str(tmp_path / "store"), device, sync_bn, same, str(out)), nprocs=2)
    two = torch.load(f"{out}.0")
    assert two.keys() == one.keys() and len(one) > 0
    worst = max(float((two[k] - one[k]).abs().max()) for k in one)
    print(f"largest difference: {worst:.3g}")
    assert all(torch.allclose(two[k], one[k], rtol=1e-6, atol=1e-9) for k in one) == equal, worst


# ----------------------------------------------------------------------------- torchrun

def _torchrun(*args, nproc=2, script=REPO / "train_deep_globe.py", env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


# (--mode, its checkpoint flag, training-only flags): mode 1, and the local-only stage trained
# on the foreground box
TORCHRUN_STAGES = {"global": ("1", "--path_g", []), "local": ("local", "--path_local", ["--crop_foreground"])}


@pytest.fixture(scope="module", params=sorted(TORCHRUN_STAGES))
def torchrun_runs(synthetic_data, module_tmp, request):
    """One stage through the whole command line under torchrun: training, then evaluation by
    2 processes and by 1."""
    mode, checkpoint_flag, train_only = TORCHRUN_STAGES[request.param]
    data, _ = synthetic_data(n_train=2, n_val=3, n_test=0, size=160, seed=8)
    root = module_tmp("torchrun")
    common = ["--data_path", data, "--model_path", root / "models", "--log_path", root / "runs", "--mode", mode,
              "--size_g", 64, "--size_p", 128, "--backbone_weights", "none", "--no_progress", "--device", "cpu",
              "--num_workers", 0, checkpoint_flag, "g.pth"]
    train = _torchrun(*common, "--task_name", "g", "--num_epochs", 1, "--batch_size", 1, *train_only)
    assert train.returncode == 0, train.stderr[-3000:]
    evaluation = _torchrun(*common, "--task_name", "ev2", "--evaluation", "--predictions_dir", root / "p2")
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    from conftest import run_cli

    single = run_cli(*common, "--task_name", "ev1", "--evaluation", "--predictions_dir", root / "p1")
    assert single[0] == 0, single[2]
    return {"root": root, "train": train, "evaluation": evaluation, "cropped": "--crop_foreground" in train_only}


def test_torchrun_training_writes_its_files_once(torchrun_runs):
    root = torchrun_runs["root"]
    lines = (root / "runs" / "g.log").read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("epoch 1/1 "), lines
    assert torchrun_runs["train"].stdout.count("epoch 1/1 ") == 1  # printed by one process
    assert sorted(p.name for p in (root / "models").iterdir()) == ["g.best.pth", "g.pth", "g.resume.pth"]
    args = json.loads((root / "runs" / "g.train.args.json").read_text())
    assert args["processes"] == 2 and args["batch_size"] == 1 and args["global_batch_size"] == 2
    assert args["crop_foreground"] is torchrun_runs["cropped"]


def test_torchrun_evaluation_scores_as_one_process(torchrun_runs):
    root = torchrun_runs["root"]
    two = json.loads((root / "runs" / "ev2.crossvali.metrics.json").read_text())
    one = json.loads((root / "runs" / "ev1.crossvali.metrics.json").read_text())
    assert two == one
    # every image predicted once, the same masks
    names = sorted(p.name for p in (root / "p1").iterdir())
    assert len(names) == 3 and sorted(p.name for p in (root / "p2").iterdir()) == names
    for name in names:
        assert (root / "p1" / name).read_bytes() == (root / "p2" / name).read_bytes(), name


# train_deep_globe.py with one change: the main process sends itself SIGTERM right after it
# saved the first epoch (the other process gets no signal).
SIGTERM_AFTER_FIRST_SAVE = f"""
import os, signal, sys
sys.path.insert(0, {str(REPO)!r})
import engine, train_deep_globe
real_save = engine.save_epoch
def save_epoch(*a, **k):
    out = real_save(*a, **k)
    os.kill(os.getpid(), signal.SIGTERM)
    return out
engine.save_epoch = save_epoch
sys.exit(train_deep_globe.cli(sys.argv[1:]))
"""


def test_torchrun_stop_on_one_process_stops_all_and_resume_continues(synthetic_data, tmp_path):
    """SIGTERM reaching one process after epoch 1: both stop at that epoch's end (one resume
    file, one message); --resume under torchrun then ends with the weights of a run that
    was never stopped."""
    from conftest import load_state

    data, _ = synthetic_data(n_train=4, n_val=1, n_test=0, size=160, seed=9)
    common = ["--data_path", data, "--model_path", tmp_path / "models", "--log_path", tmp_path / "runs", "--mode", 1,
              "--size_g", 64, "--size_p", 128, "--backbone_weights", "none", "--no_progress", "--device", "cpu",
              "--num_workers", 0, "--batch_size", 1, "--num_epochs", 2]
    straight = _torchrun(*common, "--task_name", "a")
    assert straight.returncode == 0, straight.stderr[-3000:]
    hook = tmp_path / "stop_after_first_save.py"
    hook.write_text(SIGTERM_AFTER_FIRST_SAVE)
    stopped = _torchrun(*common, "--task_name", "b", script=hook)
    assert stopped.returncode != 0
    assert stopped.stderr.count("interrupted by SIGTERM (after epoch 1)") == 1, stopped.stderr[-3000:]
    assert load_state(tmp_path / "models" / "b.resume.pth")["epoch"] == 1
    assert len((tmp_path / "runs" / "b.log").read_text().splitlines()) == 1
    # the same stopped run (a copy, task c) resumed by one process instead of two
    import shutil

    shutil.copy(tmp_path / "models" / "b.resume.pth", tmp_path / "models" / "c.resume.pth")
    epoch1 = load_state(tmp_path / "models" / "b.pth")
    from conftest import run_cli

    rc, out, err = run_cli(*common, "--task_name", "c", "--resume")
    assert rc == 0, err[-3000:]
    assert "resumed from" in out and "1 of 2 epochs done" in out
    assert "note: the interrupted run had 2 process(es), this one has 1: from epoch 2 on" in err
    assert "an optimizer step sees 1 image(s) instead of 2" in err
    lines = (tmp_path / "runs" / "c.log").read_text().splitlines()
    assert len(lines) == 2 and lines[1].startswith("epoch 2/2 "), lines
    args = json.loads((tmp_path / "runs" / "c.train.args.json").read_text())
    assert args["processes"] == 1 and args["global_batch_size"] == 1
    assert load_state(tmp_path / "models" / "c.resume.pth")["processes"] == 1
    c = load_state(tmp_path / "models" / "c.pth")
    assert any(not torch.equal(c[k], epoch1[k]) for k in c)  # epoch 2 trained on
    resumed = _torchrun(*common, "--task_name", "b", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("resumed from") == 1  # said once, by the main process
    assert "note: the interrupted run had" not in resumed.stderr  # as many processes as before
    a, b = load_state(tmp_path / "models" / "a.pth"), load_state(tmp_path / "models" / "b.pth")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for p in (tmp_path / "models").glob("*.pth"):
        p.unlink()


def test_torchrun_a_killed_process_ends_the_run_and_resume_continues(synthetic_data, tmp_path):
    """kill -9 of one of two processes mid-training: torchrun's agent stops the other at
    once (well within the 60 s allowed here; --dist_timeout bounds any wait otherwise) and
    --resume continues from the last saved epoch."""
    import signal
    import time

    data, _ = synthetic_data(n_train=4, n_val=1, n_test=0, size=160, seed=9)
    common = ["--data_path", data, "--model_path", tmp_path / "models", "--log_path", tmp_path / "runs", "--mode", 1,
              "--size_g", 64, "--size_p", 128, "--backbone_weights", "none", "--no_progress", "--device", "cpu",
              "--num_workers", 0, "--batch_size", 1, "--task_name", "k"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "train_deep_globe.py"), *map(str, common), "--num_epochs", "100"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    log = tmp_path / "runs" / "k.log"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.is_file() and log.read_text().strip()):
        time.sleep(0.5)
    assert log.is_file() and log.read_text().strip(), "no epoch finished"
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(max(workers, key=int)), signal.SIGKILL)
    t0 = time.time()
    _, err = proc.communicate(timeout=120)
    assert time.time() - t0 < 60 and proc.returncode != 0
    assert "SIGKILL" in err
    def epochs():
        return [line for line in log.read_text().splitlines() if line.startswith("epoch ")]

    done = len(epochs())
    resumed = _torchrun(*common, "--num_epochs", done + 1, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(epochs()) == done + 1 and epochs()[-1].startswith(f"epoch {done + 1}/{done + 1} ")
    for p in (tmp_path / "models").glob("*.pth"):
        p.unlink()


def test_sync_bn_refusals(synthetic_data, cli, tmp_path):
    """--sync_bn is refused where it could not work: mode 2 (a different number of forwards
    per process) and CPU processes (torch's SyncBatchNorm needs GPUs); one line each."""
    data, _ = synthetic_data(n_train=2, n_val=1, n_test=0, size=160, seed=8)
    common = ["--data_path", data, "--model_path", tmp_path / "m", "--log_path", tmp_path / "r", "--size_g", 64,
              "--size_p", 128, "--backbone_weights", "none", "--no_progress", "--device", "cpu", "--num_workers", 0,
              "--sync_bn"]
    rc, out, err = cli("--mode", 2, *common)
    assert rc == 2 and "--sync_bn: mode 2" in err and err.strip().count("\n") == 0
    two = _torchrun("--mode", 1, *common)
    assert two.returncode != 0 and "--sync_bn needs CUDA devices" in two.stderr


# train_deep_globe.py with one change: right after the main process saved the first epoch, it
# cuts the image named by GLNET_TEST_TRUNCATE to two thirds (the header still reads), so that
# in epoch 2 exactly one process finds it damaged while loading.
TRUNCATE_AFTER_FIRST_SAVE = f"""
import os, sys
sys.path.insert(0, {str(REPO)!r})
import engine, train_deep_globe
real_save = engine.save_epoch
def save_epoch(*a, **k):
    out = real_save(*a, **k)
    path = os.environ["GLNET_TEST_TRUNCATE"]
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) * 2 // 3])
    return out
engine.save_epoch = save_epoch
sys.exit(train_deep_globe.cli(sys.argv[1:]))
"""


def _processes(*args, script=REPO / "train_deep_globe.py", env=None, nproc=2, timeout=600):
    """The processes that torchrun would start (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
    MASTER_PORT in their environment), started here so that each one's exit code and output
    can be seen: [(exit code, stdout, stderr)] by rank. All are killed after `timeout` s."""
    import socket
    import tempfile
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs, files = [], []
    try:
        for rank in range(nproc):
            penv = dict(os.environ, OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                        LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **(env or {}))
            out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
            files.append((out, err))
            procs.append(subprocess.Popen([sys.executable, str(script), *map(str, args)], cwd=REPO, env=penv, text=True,
                                          stdout=out, stderr=err))
        deadline = time.time() + timeout
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.time()))
        results = []
        for p, (out, err) in zip(procs, files):
            out.seek(0)
            err.seek(0)
            results.append((p.returncode, out.read(), err.read()))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for out, err in files:
            out.close()
            err.close()


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def test_a_bad_image_found_by_one_process_stops_all_with_one_line(synthetic_data, tmp_path):
    """An image that only the second of two processes loads (in epoch 2 of a 2-image set) is
    damaged: both processes stop before the forward of that iteration (no hang in the
    gradient all-reduce), each exits with the code one process exits with, the main process
    prints the one line one process prints, and epoch 1 stays saved as the resume file."""
    import shutil

    from torch.utils.data import DistributedSampler

    from conftest import load_state

    src, _ = synthetic_data(n_train=2, n_val=1, n_test=0, size=160, seed=9)
    sampler = DistributedSampler(range(2), num_replicas=2, rank=1, shuffle=True, seed=0)
    sampler.set_epoch(1)
    (second,) = list(sampler)  # the image process 1 loads in epoch 2 (ids are sorted by name)
    hook = tmp_path / "truncate_after_first_save.py"
    hook.write_text(TRUNCATE_AFTER_FIRST_SAVE)
    results = {}
    for nproc in (1, 2):
        root = tmp_path / str(nproc)
        data = root / "data"
        shutil.copytree(src, data)
        image = sorted((data / "train" / "Sat").iterdir())[second]
        args = ["--data_path", data, "--model_path", root / "models", "--log_path", root / "runs", "--mode", 1,
                "--size_g", 64, "--size_p", 128, "--backbone_weights", "none", "--no_progress", "--device", "cpu",
                "--num_workers", 0, "--batch_size", 1, "--num_epochs", 2, "--task_name", "t", "--dist_timeout", 300]
        done = _processes(*args, script=hook, env={"GLNET_TEST_TRUNCATE": str(image)}, nproc=nproc)
        results[nproc] = [(rc, err.replace(str(data), "DATA")) for rc, _, err in done]
        assert load_state(root / "models" / "t.resume.pth")["epoch"] == 1
        assert len((root / "runs" / "t.log").read_text().splitlines()) == 1
    [(rc, err)] = results[1]
    assert rc == 2 and len(_error_lines(err)) == 1, err[-3000:]
    line = _error_lines(err)[0]
    assert "corrupt or truncated" in line and "DATA/train/Sat/" in line
    (rc0, err0), (rc1, err1) = results[2]
    assert (rc0, rc1) == (2, 2), (err0[-2000:], err1[-2000:])
    assert _error_lines(err0) == [line] and _error_lines(err1) == [], (err0[-2000:], err1[-2000:])


def test_evaluation_a_bad_image_in_one_share_stops_all_with_one_line(synthetic_data, cli, tmp_path):
    """Evaluation of 3 images by 2 processes, one image per batch (shares of 2 and 1): the
    second image of the first process's share is damaged, when the second process's share
    is done; both stop with the exit code and the line of one process. Under torchrun the
    line is there once (printed before any process exits, so that torchrun's agent, which
    ends the others when one exits, cannot cut it off)."""
    import shutil

    src, _ = synthetic_data(n_train=1, n_val=3, n_test=0, size=160, seed=8)
    data = tmp_path / "data"
    shutil.copytree(src, data)
    image = sorted((data / "crossvali" / "Sat").iterdir())[2]  # image 2: process 0's second batch
    raw = image.read_bytes()
    image.write_bytes(raw[: len(raw) * 2 // 3])
    args = ["--data_path", data, "--model_path", tmp_path / "m", "--log_path", tmp_path / "r", "--mode", 1,
            "--size_g", 64, "--size_p", 128, "--backbone_weights", "none", "--no_progress", "--device", "cpu",
            "--num_workers", 0, "--batch_size", 1, "--evaluation", "--path_g", "g.pth"]
    from models import GLNet
    from utils.checkpoint import save_state_dict

    (tmp_path / "m").mkdir()
    save_state_dict(GLNet(7), str(tmp_path / "m" / "g.pth"))
    rc, _, err = cli(*args)
    assert rc == 2 and len(_error_lines(err)) == 1 and "corrupt or truncated" in err, err
    (rc0, _, err0), (rc1, _, err1) = _processes(*args)
    assert (rc0, rc1) == (2, 2), (err0[-2000:], err1[-2000:])
    assert _error_lines(err0) == _error_lines(err) and _error_lines(err1) == [], (err0[-2000:], err1[-2000:])
    run = _torchrun(*args)
    assert run.returncode != 0 and _error_lines(run.stderr) == _error_lines(err), run.stderr[-3000:]


# train_deep_globe.py whose loss is NaN on the process of rank 1 only.
NAN_ON_RANK_1 = f"""
import os, sys
sys.path.insert(0, {str(REPO)!r})
import helper, train_deep_globe
real_focal = helper.focal_loss
if os.environ.get("RANK") == "1":
    helper.focal_loss = lambda *a, **k: real_focal(*a, **k) * float("nan")
sys.exit(train_deep_globe.cli(sys.argv[1:]))
"""


def test_a_non_finite_loss_on_one_process_stops_all_with_one_line(synthetic_data, tmp_path):
    """The loss of the second process is NaN: both stop at that iteration, exit 2, nothing is
    saved, and the main process says once what one process would say, naming the other."""
    data, _ = synthetic_data(n_train=2, n_val=1, n_test=0, size=160, seed=9)
    hook = tmp_path / "nan_on_rank_1.py"
    hook.write_text(NAN_ON_RANK_1)
    (rc0, _, err0), (rc1, _, err1) = _processes(
        "--data_path", data, "--model_path", tmp_path / "models", "--log_path", tmp_path / "runs", "--mode", 1,
        "--size_g", 64, "--size_p", 128, "--backbone_weights", "none", "--no_progress", "--device", "cpu",
        "--num_workers", 0, "--batch_size", 1, "--num_epochs", 1, "--task_name", "n", script=hook)
    assert (rc0, rc1) == (2, 2), (err0[-2000:], err1[-2000:])
    [line] = _error_lines(err0)
    assert line.startswith("error: non-finite loss on another process (here ") and "epoch 1, iteration 1 of 1" in line
    assert "training stopped; no epoch was saved" in line
    assert _error_lines(err1) == [], err1[-2000:]
    assert not (tmp_path / "models" / "n.resume.pth").exists()
