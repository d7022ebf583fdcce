"""Smoke runs of the benchmark scripts (benchmarks/bench_*.py) in subprocesses, at tiny sizes
on the CPU: they exit 0, print their table and append a JSON line with the expected keys to
the --results file (under tmp_path, never the repository's benchmarks/results/)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["--image_size", "160", "--size_g", "64", "--size_p", "128", "--device", "cpu", "--threads", "1"]
RECORD_KEYS = {"benchmark", "date", "command", "machine", "config", "results"}
MACHINE_KEYS = {"platform", "cpu", "torch", "device", "device_name", "threads", "git"}


def _run(script, *args):
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *map(str, args)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _records(path):
    lines = Path(path).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    for r in records:
        assert RECORD_KEYS <= r.keys()
        assert MACHINE_KEYS <= r["machine"].keys()
    return records


@pytest.mark.parametrize("script", ["bench_inference.py", "bench_train.py", "bench_inria_eval.py"])
def test_help(script):
    out = _run(script, "--help")
    assert "--image_size" in out and "--results" in out and "--precision" in out


def test_inference_in_process(tmp_path):
    results = tmp_path / "inference.jsonl"
    out = _run("bench_inference.py", "--mode", 3, "--n_images", 1, "--warmup", 0, "--sub_batch_size", 2, *TINY,
               "--results", results)
    assert "s/image" in out and "peak RSS MiB" in out
    (r,) = _records(results)
    assert r["benchmark"] == "inference"
    assert r["config"]["mode"] == 3 and r["config"]["image_size"] == [160, 160] and r["config"]["threads"] == 1
    res = r["results"]
    for key in ("seconds_per_image", "images_per_second", "load_seconds_per_image", "peak_rss_mib",
                "timed_peak_rss_mib", "rss_end_mib", "cuda_max_allocated_mib"):
        assert key in res
    assert res["seconds_per_image"] > 0 and res["images_per_second"] > 0
    assert res["peak_rss_mib"] > 0 and res["cuda_max_allocated_mib"] is None
    assert len(res["per_image_seconds"]) == 1


def test_inference_eval_cli(tmp_path):
    results = tmp_path / "inference.jsonl"
    out = _run("bench_inference.py", "--eval_cli", "--mode", 1, "--n_images", 1, "--num_workers", 0,
               "--data", "random", *TINY, "--results", results)
    assert "wall s" in out and "child peak RSS MiB" in out
    assert "crossvali: 1 images in" in out  # the evaluation's own output is passed through
    (r,) = _records(results)
    assert r["benchmark"] == "inference_cli" and r["config"]["eval_cli"] is True
    res = r["results"]
    for key in ("wall_seconds", "seconds_per_image", "evaluate_seconds", "child_peak_rss_mib", "tree_peak_pss_mib"):
        assert key in res
    assert res["wall_seconds"] > res["evaluate_seconds"] > 0
    assert res["child_peak_rss_mib"] > 0


def test_inria_eval(tmp_path):
    # the Inria defaults (mode 3, 2 classes, a TIFF tile, the whole --evaluation process) at a tiny size
    results = tmp_path / "inria.jsonl"
    out = _run("bench_inria_eval.py", *TINY, "--num_workers", 0, "--sub_batch_size", 2, "--results", results)
    assert "wall s" in out and "child peak RSS MiB" in out and "crossvali: 1 images in" in out
    (r,) = _records(results)
    c = r["config"]
    assert r["benchmark"] == "inference_cli" and c["mode"] == 3 and c["n_class"] == 2 and c["n_images"] == 1
    assert c["image_format"] == "tif" and c["image_size"] == [160, 160] and c["size_p"] == 128
    assert r["results"]["wall_seconds"] > r["results"]["evaluate_seconds"] > 0


def test_train_modes_1_and_3(tmp_path):
    results = tmp_path / "train.jsonl"
    out = _run("bench_train.py", "--mode", 1, 3, "--iters", 1, "--warmup", 0, "--batch_size", 1,
               "--sub_batch_size", 2, *TINY, "--results", results)
    assert "s/iter" in out and "peak RSS MiB" in out
    records = _records(results)
    assert [r["config"]["mode"] for r in records] == [1, 3]
    for r in records:
        assert r["benchmark"] == "train" and r["config"]["batch_size"] == 1
        res = r["results"]
        for key in ("seconds_per_iter", "images_per_second", "peak_rss_mib", "timed_peak_rss_mib",
                    "cuda_max_allocated_mib", "trainable_params"):
            assert key in res
        assert res["seconds_per_iter"] > 0 and len(res["per_iter_seconds"]) == 1


def test_coarse_to_fine_help():
    out = _run("bench_coarse_to_fine.py", "--help")
    assert "--epochs_fine" in out and "--epochs_global" in out and "--results" in out
