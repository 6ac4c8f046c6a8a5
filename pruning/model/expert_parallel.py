"""Expert parallelism: every rank of a group holds the dense model, ALL router rows and a shard of the experts.

Dimension legend: T tokens on this rank, K = 2 choices, R router rows of a layer (its kept experts),
D d_model, P ranks in the expert-parallel group, N assignments this rank sends, M assignments it receives.

A :class:`ExpertParallelDispatch` plugs into :class:`pruning.model.moe.MoeLayer` through its ``dispatch``
attribute (the layer's ``forward`` is unchanged). Each rank routes its own tokens with the full router
(so routing, and the statistics observed on it, are the single-process ones), then:

1. sorts its assignments by router row (rows are sharded contiguously, so this also groups them by
   owner rank), keeping token order within a row, exactly as the single-process dispatch does;
2. ``all_gather`` of the per-row assignment counts [R] (every rank learns how many rows it receives from
   every other, per expert);
3. ``all_to_all_single`` of the token vectors [N, D] to the owners (uneven splits);
4. each owner runs its experts once per source rank's segment, the way the model's single-process
   dispatch would (per-expert loop or grouped GEMM): the same rows and GEMM shapes a single process
   runs on that rank's batch, so the outputs are bitwise the single-process ones (checked on CPU);
5. ``all_to_all_single`` of the expert outputs back to the source ranks, which weight them by the combine
   weights and add them into the output (two terms per token: the order of addition cannot change them).

``all_to_all_single`` with uneven splits and ``all_gather`` are supported by NCCL and by gloo (checked on
torch 2.13 with gloo on CPU, which is how the tests run it), so the same code runs on GPUs and in tests.

Use :func:`load_expert_parallel_model` to build such a model from a checkpoint: it loads only this
rank's experts (through :func:`pruning.model.loading.load_model` with an expert subset), then gives
every MoE layer the full router and this dispatch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pruning.checkpoint import keymap
from pruning.checkpoint.reader import open_checkpoint
from pruning.checkpoint.torch_zip import CheckpointError
from pruning.model.build import ExpertSelection, NllbMoeForPruning, full_selection
from pruning.model.moe import TOP_K, Observer, Router, Routing, StackedExperts


def shard_bounds(num_rows: int, world: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of router rows owned by each of ``world`` ranks: contiguous, sizes differ by <= 1."""
    if world < 1 or num_rows < world:
        raise CheckpointError(f"expert parallelism over {world} ranks needs at least {world} experts in every MoE layer, got {num_rows}")
    base, extra = divmod(num_rows, world)
    bounds, start = [], 0
    for rank in range(world):
        stop = start + base + (1 if rank < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def shard_selection(held: ExpertSelection, *, rank: int, world: int) -> ExpertSelection:
    """The experts ``rank`` keeps of each MoE layer: its contiguous shard of the layer's held experts."""
    out: ExpertSelection = {}
    for key, experts in held.items():
        start, stop = shard_bounds(len(experts), world)[rank]
        out[key] = list(experts[start:stop])
    return out


@dataclass
class ExpertParallelDispatch:
    """A ``Dispatch`` (see :mod:`pruning.model.moe`) exchanging assignments inside ``group``.

    ``bounds[p]`` = ``[start, stop)`` router rows whose experts rank ``p`` of the group holds; the layer's
    ``experts`` given to :meth:`__call__` are this rank's shard, local index = row - start.

    ``local`` mirrors the single-process dispatch the model would use, shape for shape:
    ``"loop"`` (:func:`sorted_loop_dispatch`: dispatched assignments only, one expert call per
    segment) or ``"grouped"`` (:func:`grouped_mm_dispatch`: all T*K assignments, dropped ones weighted
    0, one grouped GEMM per source segment). Either way each expert sees exactly the rows, in the order
    and the GEMM shapes, it would see in one process, so the outputs equal the single-process ones.
    """

    group: Any
    """The expert-parallel process group (``None`` = the default group)."""
    bounds: list[tuple[int, int]]
    local: str = "loop"

    def __call__(self, x: torch.Tensor, routing: Routing, experts: StackedExperts, observe: Optional[Observer] = None) -> torch.Tensor:
        """As a single-process dispatch; ``observe`` gets the outputs that come back from their owners."""
        rank, world = dist.get_rank(self.group), dist.get_world_size(self.group)
        num_rows = routing.probs.shape[1]
        mine = self.bounds[rank]
        if experts.num_experts != mine[1] - mine[0] or self.bounds[-1][1] != num_rows:
            raise RuntimeError(
                f"expert-parallel rank {rank} holds {experts.num_experts} experts for rows {mine} of {num_rows}: the layer was not sharded with these bounds"
            )
        grouped = self.local == "grouped"
        # this rank's assignments, sorted by router row (= by owner), token order kept within a row
        flat_row = routing.expert_idx.reshape(-1)  # [T*K]
        flat_token = torch.arange(x.shape[0], device=x.device).repeat_interleave(TOP_K)  # [T*K]
        flat_k = torch.arange(TOP_K, device=x.device).repeat(x.shape[0])  # [T*K]
        flat_weight = (routing.weights * routing.dispatched).reshape(-1)  # [T*K]
        flat_kept = routing.dispatched.reshape(-1)  # [T*K]
        if not grouped:  # the loop dispatch runs only the dispatched assignments
            flat_row, flat_token, flat_k, flat_weight = (t[flat_kept] for t in (flat_row, flat_token, flat_k, flat_weight))
            flat_kept = flat_kept[flat_kept]
        order = torch.argsort(flat_row, stable=True)
        flat_token, flat_weight = flat_token[order], flat_weight[order]  # [N]
        row_counts = torch.bincount(flat_row, minlength=num_rows)  # [R]

        # every rank's per-row counts: [P, R]
        gathered = [torch.empty_like(row_counts) for _ in range(world)]
        dist.all_gather(gathered, row_counts, group=self.group)
        counts = torch.stack(gathered).cpu()  # [P, R]
        send_splits = [int(counts[rank, a:b].sum()) for a, b in self.bounds]
        recv_splits = [int(counts[src, mine[0] : mine[1]].sum()) for src in range(world)]

        received = x.new_empty(sum(recv_splits), x.shape[1])  # [M, D]
        dist.all_to_all_single(received, x[flat_token].contiguous(), output_split_sizes=recv_splits, input_split_sizes=send_splits, group=self.group)
        run = _run_segment_grouped if grouped else _run_segment_loop
        results = torch.empty_like(received)  # [M, D]
        start = 0
        for per_expert in counts[:, mine[0] : mine[1]].tolist():  # one source rank's segment, by local expert
            stop = start + sum(per_expert)
            if stop > start:
                results[start:stop] = run(received[start:stop], per_expert, experts)
            start = stop
        returned = x.new_empty(flat_token.shape[0], x.shape[1])  # [N, D]
        dist.all_to_all_single(returned, results, output_split_sizes=send_splits, input_split_sizes=recv_splits, group=self.group)
        if observe is not None:
            kept = flat_kept[order]  # [N]
            observe(routing, flat_row[order][kept], flat_token[kept], flat_k[order][kept], returned[kept])
        weight = flat_weight[:, None].to(returned.dtype)  # [N, 1]
        if grouped:  # as grouped_mm_dispatch: exact zeros for dropped assignments
            contribution = torch.where(weight > 0, returned * weight, torch.zeros((), dtype=returned.dtype, device=x.device))
        else:
            contribution = returned * weight
        out = torch.zeros_like(x)  # [T, D]
        out.index_add_(0, flat_token, contribution)
        return out


def _run_segment_loop(rows: torch.Tensor, per_expert: list[int], experts: StackedExperts) -> torch.Tensor:
    """``rows`` [n, D] grouped by local expert (``per_expert`` rows each): one expert call per group."""
    out = torch.empty_like(rows)
    start = 0
    for local, n in enumerate(per_expert):
        if n:
            out[start : start + n] = experts.expert_forward(local, rows[start : start + n])
            start += n
    return out


def _run_segment_grouped(rows: torch.Tensor, per_expert: list[int], experts: StackedExperts) -> torch.Tensor:
    """The same rows through two grouped GEMMs over the shard's stacked weights (as grouped_mm_dispatch)."""
    counts = torch.tensor(per_expert, device=rows.device)  # [E_shard]
    offsets = torch.cumsum(counts, 0).to(torch.int32)  # [E_shard] group ends
    row_expert = torch.repeat_interleave(torch.arange(len(per_expert), device=rows.device), counts)  # [n]
    h = torch._grouped_mm(rows, experts.fc1_weight.transpose(1, 2), offs=offsets)  # [n, F]
    h = F.relu(h + experts.fc1_bias[row_expert])
    y = torch._grouped_mm(h, experts.fc2_weight.transpose(1, 2), offs=offsets)  # [n, D]
    return y + experts.fc2_bias[row_expert]


def load_expert_parallel_model(
    path: str | Path,
    *,
    group: Any = None,
    device: str | torch.device = "cpu",
    dtype: Any = None,
    dispatch: str = "auto",
    progress: bool = False,
) -> NllbMoeForPruning:
    """This rank's part of an expert-parallel model: dense weights, full routers, a shard of the experts.

    ``group`` is the expert-parallel process group (``None``: the default group); rank ``p`` of it holds
    the ``p``-th contiguous shard of every MoE layer's experts. Works for full and pruned checkpoints
    (the shards split the experts the checkpoint holds). ``dispatch`` is chosen as by ``load_model``
    (``auto``: grouped GEMM where supported) and each rank's own experts run the same way. The model is for inference: every MoE layer
    exchanges tokens with the other ranks of ``group``, so all of them must run the same forward calls.
    """
    from pruning.model.loading import load_model

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    reader = open_checkpoint(path)
    held = reader.present_experts() or full_selection(reader.topology)
    model = load_model(path, device, dtype, experts=shard_selection(held, rank=rank, world=world), dispatch=dispatch, progress=progress)
    install_full_routers(model, reader, held=held, group=group, local=getattr(model, "dispatch_name", "loop"))
    return model


def install_full_routers(model: NllbMoeForPruning, reader: Any, *, held: ExpertSelection, group: Any, local: str = "loop") -> None:
    """Give every MoE layer a router with the rows of all ``held`` experts and an expert-parallel dispatch."""
    world = dist.get_world_size(group)
    routers: dict[tuple[str, int], torch.Tensor] = {}
    for entry in reader.entries():
        slot = keymap.parse_router_key(entry.name)
        if slot is not None:
            routers[slot] = entry.tensor.load()  # [R, D]
    for side, layer, moe in model.moe_layers():
        experts = held[(side, layer)]
        weight = routers.get((side, layer))
        if weight is None or weight.shape[0] != len(experts):
            got = "no router" if weight is None else f"a router with {weight.shape[0]} rows"
            raise CheckpointError(f"{reader.path}: {side} layer {layer} has {got}, expected {len(experts)} rows")
        device = moe.router.weight.device
        router = Router(d_model=weight.shape[1], expert_ids=experts, capacity_fraction=moe.router.capacity_fraction)
        router = router.to(device)
        with torch.no_grad():
            router.weight.copy_(weight.to(device=device, dtype=torch.float32))
        router.weight.requires_grad_(False)
        moe.router = router
        moe.dispatch = ExpertParallelDispatch(group=group, bounds=shard_bounds(len(experts), world), local=local)
