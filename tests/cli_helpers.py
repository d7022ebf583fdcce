"""Helpers shared by the tests that run the entry point (test_end_to_end, test_robustness)."""
import contextlib
import io

import torch

import train_deep_globe


def run_cli(*argv):
    """Run the entry point in this process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = train_deep_globe.cli([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def load_state(path):
    """A checkpoint file's state dict, on the CPU."""
    return torch.load(path, map_location="cpu", weights_only=True)
