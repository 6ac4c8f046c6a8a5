"""Processes for ``nllb-prune stats`` under ``torchrun``: expert-parallel groups x data parallelism over directions.

``torchrun --nproc-per-node N -m pruning stats ... --expert-parallel P`` starts ``world = N x nodes``
processes. They form ``world / P`` data-parallel groups of ``P`` consecutive ranks (so a group sits on
one node when ``P`` divides ``N``). Each group shares one model: every rank holds the dense part, all
router rows and ``1/P`` of the experts (:mod:`pruning.model.expert_parallel`), and the group's ranks
split the batches of the direction the group works on. Directions go out in rounds of one per group;
after each round the counters of every rank are summed (``all_reduce``) and rank 0 writes the file.

Backends: NCCL when the processes run on CUDA devices (``cuda:LOCAL_RANK``), gloo on CPU (the tests).
Without ``torchrun`` (``WORLD_SIZE`` unset) everything runs in this process and nothing is initialised.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from pruning.config import ConfigError
from pruning.errors import UserError

T = TypeVar("T")


@dataclass
class Context:
    """Where this process stands: its ranks, its groups and its device."""

    rank: int
    world: int
    ep_size: int
    device: torch.device
    ep_group: Any = None
    """The expert-parallel group of this process (None when ``ep_size`` is 1)."""
    owns_process_group: bool = False

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size

    @property
    def dp_size(self) -> int:
        return self.world // self.ep_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.ep_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over every process (returned on the collective device)."""
        return self._all_reduce(tensor, dist.ReduceOp.SUM)

    def all_reduce_peak(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise maximum over every process (for counters that merge by maximum)."""
        return self._all_reduce(tensor, dist.ReduceOp.MAX)

    def _all_reduce(self, tensor: torch.Tensor, op: Any) -> torch.Tensor:
        if not self.distributed:
            return tensor
        tensor = tensor.to(self._collective_device())
        dist.all_reduce(tensor, op=op)
        return tensor

    def all_reduce_max(self, value: int) -> int:
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=self._collective_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

    def agree(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and hand its result, or its user error, to every process.

        Every process raises the same :class:`UserError` instead of some waiting forever on the others.
        """
        if not self.distributed:
            return fn()
        payload: list[Any] = [None]
        if self.is_main:
            try:
                payload[0] = ("ok", fn())
            except UserError as exc:
                payload[0] = ("error", exc)
        dist.broadcast_object_list(payload, src=0)
        status, value = payload[0]
        if status == "error":
            raise value
        return value

    def close(self) -> None:
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()

    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def check_launch(expert_parallel: int) -> int:
    """The number of processes (``WORLD_SIZE``), after checking ``--expert-parallel`` fits it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and expert_parallel > 1:
        raise ConfigError(
            f"--expert-parallel {expert_parallel} shares a model over {expert_parallel} processes: start them "
            f"with torchrun --nproc-per-node {expert_parallel} -m pruning stats ..."
        )
    if world % expert_parallel:
        raise ConfigError(
            f"--expert-parallel {expert_parallel} must divide the number of processes ({world}): world = expert-parallel size x data-parallel size"
        )
    return world


def setup(*, expert_parallel: int, device: str) -> Context:
    """Join the processes ``torchrun`` started (if any) and build the expert-parallel groups."""
    world = check_launch(expert_parallel)
    if world == 1:
        from pruning.model.loading import resolve_device

        return Context(rank=0, world=1, ep_size=1, device=resolve_device(device))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = _process_device(device, local_rank)
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if target.type == "cuda" else "gloo"
        if target.type == "cuda":
            torch.cuda.set_device(target)
        dist.init_process_group(backend=backend)
    rank = dist.get_rank()
    ctx = Context(rank=rank, world=dist.get_world_size(), ep_size=expert_parallel, device=target, owns_process_group=owns)
    if expert_parallel > 1:
        # every process creates every group, in the same order (a torch.distributed rule)
        for group_index in range(ctx.dp_size):
            ranks = list(range(group_index * expert_parallel, (group_index + 1) * expert_parallel))
            group = dist.new_group(ranks) if expert_parallel < ctx.world else dist.group.WORLD
            if rank in ranks:
                ctx.ep_group = group
    return ctx


def _process_device(device: str, local_rank: int) -> torch.device:
    if device in ("auto", "cuda"):
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if device == "cuda":
            raise ConfigError("--device cuda: no CUDA device is visible to this process")
        return torch.device("cpu")
    target = torch.device(device)
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", local_rank)
    return target
