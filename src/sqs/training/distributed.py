"""Which process am I: the one rank helper (trainer, pipelines, CLI), and joining a torchrun group.

Under `torchrun` every process runs the same command; rank 0 alone writes files and prints.
`rank_world` reads the process group once it exists; before that (and after it is torn
down, when the CLI prints an error) `is_rank0` falls back on torchrun's RANK variable.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from sqs.core import resolve_device
from sqs.io import ConfigError


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process in its process group; (0, 1) outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_rank0() -> bool:
    """True for the process that writes and prints: rank 0 of the group, or of torchrun's RANK
    when no group is (or is no longer) initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def init_distributed(device: str | None = "auto") -> bool:
    """Under torchrun (WORLD_SIZE > 1), join the process group from the environment:
    NCCL when this run uses CUDA, gloo on CPU. Returns True if this call initialised it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    dev = resolve_device(device)  # a device that does not exist: one DeviceError line listing those that do
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return True


def same_start(start: int, run_dir: os.PathLike | str) -> None:
    """Every rank must resume a run from the step rank 0 chose. Ranks on a node that does not see
    the run folder (a node-local runs folder under multi-node torchrun) would start from step 0
    and train different steps than rank 0; so every rank compares, and every rank raises the
    same ConfigError, rather than hang in a collective or train a wrong model."""
    rank, world = rank_world()
    if world <= 1:
        return
    starts: list = [None] * world
    dist.all_gather_object(starts, int(start))
    check_same_start(starts, run_dir)


def check_same_start(starts: list[int], run_dir: os.PathLike | str) -> None:
    """ConfigError naming the ranks whose start differs from rank 0's (see `same_start`)."""
    odd = [r for r, s in enumerate(starts) if s != starts[0]]
    if odd:
        raise ConfigError(f"{run_dir}: rank 0 resumes at step {starts[0]} but rank(s) "
                          f"{', '.join(f'{r} at step {starts[r]}' for r in odd)}: their node does not see the run "
                          "folder rank 0 writes; under torchrun on several nodes --runs-dir must be one shared "
                          "folder at the same path on every node (docs/scale-out.md)")


def finish_distributed(initialised: bool) -> None:
    """Leave the process group if `init_distributed` joined it (its return value)."""
    if initialised and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
