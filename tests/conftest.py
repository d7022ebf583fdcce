"""Fixtures shared by the test modules: seeding, synthetic data sets, fresh random-init
models, and the command line run in this process."""
import contextlib
import copy
import io
import os
import shutil
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory):
    """mktemp(name) -> a new folder for a module-scoped fixture; every folder made through it
    is deleted when the module's last test is done (checkpoints are 300 MB each: kept to the
    end of the run, they would fill the disk)."""
    made = []

    def mktemp(name):
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield mktemp
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """make(**kwargs) -> (folder, summary) of a synthetic DeepGlobe-layout data set
    (dataset.synthetic.generate(folder, **kwargs)); one per distinct set of arguments for
    the whole session. Tests only read these folders."""
    from dataset.synthetic import generate

    made = {}

    def make(**kwargs):
        key = repr(sorted(kwargs.items()))
        if key not in made:
            root = tmp_path_factory.mktemp("synthetic")
            made[key] = (root, generate(root, **kwargs))
        return made[key]

    return make


@pytest.fixture(scope="session")
def _glnet_prototype():
    from models import GLNet

    torch.manual_seed(0)
    return GLNet(7)


@pytest.fixture
def glnet(_glnet_prototype):
    """A fresh copy of one seeded random-init GLNet(7), in train mode with every part
    trainable: what a test does to it cannot reach another test, whatever their order."""
    return copy.deepcopy(_glnet_prototype)


def run_cli(*argv):
    """Run train_deep_globe.py's entry point in this process; returns (exit code, stdout, stderr)."""
    import train_deep_globe

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = train_deep_globe.cli([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def load_state(path):
    """A checkpoint file's state dict, on the CPU."""
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def cli():
    """The command line in this process: cli(*argv) -> (exit code, stdout, stderr)."""
    return run_cli
