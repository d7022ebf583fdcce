"""Several processes under torchrun (torch.distributed): who this process is, the process
group, and the few collective operations the runs need. Outside torchrun (WORLD_SIZE unset
or 1) every function here is a no-op and a run is exactly the single-process one.
"""
from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

from utils.errors import SharedError, UserError, one_line


@dataclass(frozen=True)
class Processes:
    """This process's place among the run's processes (torchrun's RANK, WORLD_SIZE, LOCAL_RANK)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """The process that writes the run's files (checkpoints, logs, metrics) and prints."""
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Processes":
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


SINGLE = Processes()


def start(procs: Processes, device: torch.device, timeout_s: float) -> torch.device:
    """Join the process group (NCCL for CUDA, gloo for the CPU); returns this process's
    device (cuda:LOCAL_RANK on GPUs). A process that waits longer than `timeout_s` for the
    others (one of them died) raises instead of hanging."""
    if not procs.active:
        return device
    if device.type == "cuda":
        if procs.local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {procs.local_rank}: only {torch.cuda.device_count()} CUDA device(s) here; "
                            "use --nproc_per_node <= the number of GPUs")
        device = torch.device("cuda", procs.local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return device


def stop(procs: Processes) -> None:
    if procs.active and dist.is_initialized():
        dist.destroy_process_group()


def any_true(procs: Processes, flag: bool, device: torch.device) -> bool:
    """Whether `flag` is true on any process (a collective: every process must call it)."""
    if not procs.active:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def shared_error(procs: Processes, line: str, code: int) -> SharedError:
    """Collective: the SharedError that every process raises for one error (the same one
    line and exit code as one process). The main process prints the line now and the
    processes wait for each other before any of them raises: torchrun's agent ends the
    others as soon as one process exits, which could otherwise cut the main process short
    before it said anything."""
    if procs.main:
        print(line, file=sys.stderr, flush=True)
    if procs.active:
        dist.barrier()
    return SharedError(line, code)


def raise_shared(procs: Processes, error: BaseException | None, device: torch.device) -> None:
    """Collective (every process calls it at the same point): return if no process met an
    error; otherwise raise on every process the shared_error with the line and exit code of
    the first (lowest-rank) process's error. In one process, `error` itself is raised."""
    if not procs.active:
        if error is not None:
            raise error
        return
    if not any_true(procs, error is not None, device):
        return
    said: list = [None] * procs.world
    dist.all_gather_object(said, one_line(error) if error is not None else None)
    line, code = next(s for s in said if s is not None)
    raise shared_error(procs, line, code) from error


def sum_(procs: Processes, tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over the processes (e.g. confusion matrices of their images)."""
    if procs.active:
        dist.all_reduce(tensor)
    return tensor


def merge_dicts(procs: Processes, part: dict) -> dict:
    """The union of every process's dict (keys taken by one process each, e.g. image ids),
    on every process; in one process, `part` itself."""
    if not procs.active:
        return part
    parts: list = [None] * procs.world
    dist.all_gather_object(parts, part)
    return {k: v for p in parts for k, v in p.items()}


def shard(procs: Processes, dataset: Dataset) -> Dataset:
    """Images rank, rank + world, ... of `dataset`: every image to exactly one process (no
    padding, unlike DistributedSampler: evaluation counts each pixel once)."""
    if not procs.active:
        return dataset
    shard = Subset(dataset, range(procs.rank, len(dataset), procs.world))
    for name in ("labels", "ids"):  # what the runs read of a dataset
        setattr(shard, name, getattr(dataset, name) if name == "labels" else
                [dataset.ids[i] for i in shard.indices])
    return shard
