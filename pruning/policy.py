"""Treatment of pruned experts, chosen at export: ``nllb-prune export --policy drop|skip|substitute|merge``.

Dimension legend: E experts per MoE layer of the unpruned model, D d_model, P pruned experts of a
layer, L MoE layers of a side (statistics rows).

* ``drop`` (default; the pruning paper's): a pruned expert's router row is removed, so the softmax and
  the top-2 choice run over the kept experts alone. Nothing here is used.
* ``skip``: every router row is kept, so routing is the unpruned model's; an assignment to a pruned
  expert contributes nothing (the token keeps only its kept expert's weighted output, not renormalised;
  a token with both choices pruned passes the layer on its residual alone), as fairseq's expert output
  masking does to whole tokens in training. Needs no statistics. Stored as ``substitute`` with zero
  vectors (``constant_outputs`` of zeros, [P, D]), so every loader serves it unchanged.
* ``substitute``: every router row is kept, so routing is the unpruned model's; an assignment to a
  pruned expert p contributes ``weight * (1 - eom) * mean_output[p]``, where ``mean_output[p] =
  out_sum[p] / routed[p]`` is p's mean raw output (before the combine weight and the EOM scaling) over
  the statistics' tokens (``nllb-prune stats --expert-outputs``). An expert the statistics never
  routed a token to gets the zero vector (listed in the manifest as ``never_routed``). The vectors are
  stored as ``{side}.layers.{n}.ffn.constant_outputs`` [P, D] in the export's dtype: no expert weights.
* ``merge``: each pruned expert p is folded into the kept expert k(p) it co-activates with most
  (``coact`` counts: tokens sent to both); when the statistics have no co-activation counts, when p
  never co-activates with a kept expert, or on a tie, the kept expert (among the tied ones) whose
  router row is nearest to p's by cosine similarity is taken (lowest id on an exact tie). The manifest
  records k(p) and which rule chose it (``by``: ``coact``, ``coact+router`` for a tie broken by the
  router, ``router``). Kept weights become ``W_k' = (f_k W_k + sum_{p->k} f_p W_p) / (f_k + sum f_p)``
  for fc1/fc2 weights and biases, f = routing frequency (``routed`` counts when collected with
  ``--expert-outputs``, else ``top1 + top2``); when all of a group's f are 0, W_k is kept as is.
  p's router row is kept and routes to k(p) (the merged expert receives its group's tokens, as in
  MC-SMoE), so a token whose two choices both map to k gets ``(w1 + w2) * k(x)``.

Statistics are summed, per side, over the statistics file's directions that the export serves:
encoder counters over the directions whose source is an exported source language, decoder counters
over those whose target is an exported target language (an index of one list for every direction: all
directions of the file).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch

from pruning.data.directions import ANY_DIRECTION, SHORT_SIDE, Side, split_direction
from pruning.errors import UserError
from pruning.manifest import DROP, LayerExperts, constant_outputs_key, layer_name
from pruning.model.moe import ExtraRows
from pruning.topology import Topology

SKIP = "skip"


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    """What a treatment of pruned experts needs and keeps: the one table every check reads."""

    name: str
    keeps_router_rows: bool
    """The pruned experts' router rows stay (their tokens still choose them)."""
    needs_statistics: bool
    """``--stats``: a statistics file of the unpruned model."""
    needs_expert_outputs: bool
    """... collected with ``--expert-outputs`` (mean outputs)."""
    needs_pruned_weights: bool
    """The pruned experts' own weights are read (folded into kept ones)."""


POLICY_TABLE: dict[str, PolicySpec] = {
    spec.name: spec
    for spec in (
        PolicySpec(DROP, keeps_router_rows=False, needs_statistics=False, needs_expert_outputs=False, needs_pruned_weights=False),
        PolicySpec(SKIP, keeps_router_rows=True, needs_statistics=False, needs_expert_outputs=False, needs_pruned_weights=False),
        PolicySpec("substitute", keeps_router_rows=True, needs_statistics=True, needs_expert_outputs=True, needs_pruned_weights=False),
        PolicySpec("merge", keeps_router_rows=True, needs_statistics=True, needs_expert_outputs=False, needs_pruned_weights=True),
    )
}
POLICIES = tuple(POLICY_TABLE)
NEEDS_STATISTICS = frozenset(name for name, spec in POLICY_TABLE.items() if spec.needs_statistics)

RouterRows = Callable[[Side, int], torch.Tensor]
"""``(side, layer)`` -> the unpruned router [E, D] (row e = expert e), loaded when first needed."""


class PolicyError(UserError):
    """A ``--policy`` request cannot be met: unknown policy, missing or unsuitable statistics."""


def check_policy(policy: str, stats: Optional[str | Path]) -> None:
    """The policy is known and has the statistics it needs (before any heavy work)."""
    spec = policy_spec(policy)
    if spec.needs_statistics and not stats:
        raise PolicyError(
            f"--policy {policy} needs --stats FILE: a routing statistics file of the unpruned model "
            "(from `nllb-prune stats`" + (", collected with --expert-outputs" if spec.needs_expert_outputs else "") + ")"
        )


def policy_spec(policy: str) -> PolicySpec:
    if policy not in POLICY_TABLE:
        raise PolicyError(f"--policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    return POLICY_TABLE[policy]


# ---- plan ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class LayerPolicy:
    """What one MoE layer keeps and how its pruned experts are treated."""

    kept: list[int]
    """Original ids of the experts with weights (router rows 0..len-1)."""
    extra: ExtraRows
    """Router rows of the pruned experts and what serves each."""
    constants: Optional[torch.Tensor] = None
    """[P, D] float64 mean outputs of the substituted rows (their order in ``extra``); None for merge."""
    frequency: Optional[torch.Tensor] = None
    """[E] float64 routing frequency f (merge)."""
    record: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The manifest's entry for this layer."""

    def folds(self) -> dict[int, list[int]]:
        """Kept id -> pruned ids folded into it (merge)."""
        out: dict[int, list[int]] = {}
        for pruned, target in zip(self.extra.ids, self.extra.to):
            if target is not None:
                out.setdefault(target, []).append(pruned)
        return out

    def fold_coefficients(self, kept: int) -> list[tuple[int, float]]:
        """``[(expert id, f / total)]`` of kept expert ``kept`` and the experts folded into it (kept first)."""
        group = [kept, *self.folds().get(kept, [])]
        if self.frequency is None or len(group) == 1:
            return [(kept, 1.0)]
        f = [float(self.frequency[e]) for e in group]
        total = sum(f)
        if total <= 0:
            return [(kept, 1.0)]
        return [(e, fe / total) for e, fe in zip(group, f)]


@dataclasses.dataclass
class PolicyPlan:
    name: str
    layers: dict[tuple[Side, int], LayerPolicy]
    record: dict[str, Any]
    """The manifest's ``policy`` entry."""

    def extra_rows(self) -> dict[tuple[Side, int], ExtraRows]:
        return {slot: layer.extra for slot, layer in self.layers.items() if layer.extra.ids}

    def config_entry(self) -> dict[str, Any]:
        """What ``config.json`` carries for the remote-code loader (``pruned_routing``)."""
        return {
            "policy": self.name,
            "layers": {name: {"rows": entry["rows"], "to": entry["to"]} for name, entry in self.record["layers"].items()},
        }


def served_counters(stats: Any, directions: Sequence[str], *, what: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, list[str]]]:
    """``({"enc"|"dec": {counter: sum}}, {"enc"|"dec": directions summed})`` over the directions an export serves.

    ``directions``: the export's direction keys (``"src-tgt"``, or ``"*"`` for any direction). Only the
    counters that every summed direction has are summed.
    """
    pairs = [split_direction(d) for d in directions if d != ANY_DIRECTION]
    every = ANY_DIRECTION in directions
    wanted = {"enc": {s for s, _ in pairs}, "dec": {t for _, t in pairs}}
    sums: dict[str, dict[str, torch.Tensor]] = {}
    used: dict[str, list[str]] = {}
    for side, langs in wanted.items():
        position = 0 if side == "enc" else 1
        chosen = [d for d in stats.directions if side in stats.counters[d] and (every or split_direction(d)[position] in langs)]
        if not chosen:
            role = "source" if side == "enc" else "target"
            known = ", ".join(stats.directions[:20]) + (" ..." if len(stats.directions) > 20 else "")
            raise PolicyError(
                f"{what} has no {'encoder' if side == 'enc' else 'decoder'} statistics for the exported {role} language(s) "
                f"{', '.join(sorted(langs)) or '(any)'}: it has directions {known or '(none)'}; collect statistics for them"
            )
        names = set.intersection(*(set(stats.counters[d][side]) for d in chosen))
        sums[side] = {name: sum(stats.counters[d][side][name].double() for d in chosen) for name in sorted(names)}
        used[side] = chosen
    return sums, used


def plan_policy(
    name: str,
    *,
    union: LayerExperts,
    stats: Any,
    directions: Sequence[str],
    topology: Topology,
    router: RouterRows,
    stats_info: Optional[Mapping[str, Any]] = None,
) -> PolicyPlan:
    """Per MoE layer, the pruned experts' treatment under policy ``name`` (not ``drop``).

    ``union``: the experts the export keeps per layer; ``stats``: a :class:`RoutingStats` of the
    unpruned model; ``directions``: the export's direction keys; ``stats_info``: recorded as is (file
    name and sha256).
    """
    if not policy_spec(name).keeps_router_rows:
        raise PolicyError(
            f"plan_policy is for the policies that keep router rows ({', '.join(n for n, s in POLICY_TABLE.items() if s.keeps_router_rows)}), got {name!r}"
        )
    if name == SKIP:
        return _plan_skip(union, topology=topology)
    what = f"statistics file {stats_info.get('file')}" if stats_info and stats_info.get("file") else "the statistics"
    topology.check_same_routing(stats.topology, what=what)
    counters, used = served_counters(stats, directions, what=what)
    if name == "substitute":
        lacking = sorted({"routed", "out_sum"} - set(counters["enc"]) | {"routed", "out_sum"} - set(counters["dec"]))
        if lacking:
            raise PolicyError(
                f"--policy substitute needs the expert-output counters {lacking} (each expert's mean output), which {what} "
                "lacks for the exported directions: collect it with `nllb-prune stats ... --expert-outputs`"
            )
    frequency_source = "routed" if all("routed" in counters[s] for s in counters) else "top1+top2"
    layers: dict[tuple[Side, int], LayerPolicy] = {}
    for _, side, layer in topology.iter_moe_layers():
        short = SHORT_SIDE[side]
        row = topology.moe_layers(side).index(layer)
        c = {key: value[row] for key, value in counters[short].items()}  # [E] / [E, D] / [E, E]
        kept = sorted(union[(side, layer)])
        if name == "substitute":
            layers[(side, layer)] = substitute_layer(kept, routed=c["routed"], out_sum=c["out_sum"], num_experts=topology.num_experts)
        else:
            frequency = c["routed"] if frequency_source == "routed" else c["top1"] + c["top2"]
            layers[(side, layer)] = merge_layer(
                kept, frequency=frequency, coact=c.get("coact"), router=lambda s=side, n=layer: router(s, n), num_experts=topology.num_experts
            )
    record: dict[str, Any] = {
        "name": name,
        "statistics": {**dict(stats_info or {}), "directions": used},
        "layers": {layer_name(side, layer): lp.record for (side, layer), lp in layers.items()},
    }
    if name == "merge":
        record["frequency"] = frequency_source
    return PolicyPlan(name, layers, record)


def _plan_skip(union: LayerExperts, *, topology: Topology) -> PolicyPlan:
    """``skip``: substitute layers whose vectors are zeros (no statistics, no router read)."""
    layers: dict[tuple[Side, int], LayerPolicy] = {}
    zeros = torch.zeros(topology.num_experts, topology.d_model, dtype=torch.float64)  # [E, D]
    for _, side, layer in topology.iter_moe_layers():
        lp = substitute_layer(sorted(union[(side, layer)]), routed=torch.zeros(topology.num_experts), out_sum=zeros, num_experts=topology.num_experts)
        lp.record = {"rows": lp.record["rows"], "to": lp.record["to"]}
        layers[(side, layer)] = lp
    record = {"name": SKIP, "layers": {layer_name(side, layer): lp.record for (side, layer), lp in layers.items()}}
    return PolicyPlan(SKIP, layers, record)


def substitute_layer(kept: Sequence[int], *, routed: torch.Tensor, out_sum: torch.Tensor, num_experts: int) -> LayerPolicy:
    """Every pruned expert's row kept, served by its mean output ``out_sum / routed`` (zero if never routed)."""
    pruned = [e for e in range(num_experts) if e not in set(kept)]
    routed = routed.double()  # [E]
    means = out_sum.double()[pruned] / routed[pruned].clamp(min=1)[:, None]  # [P, D]
    never = [p for p in pruned if routed[p] <= 0]
    means[[i for i, p in enumerate(pruned) if routed[p] <= 0]] = 0.0
    extra = ExtraRows(tuple(pruned), (None,) * len(pruned))
    record = {"rows": pruned, "to": [None] * len(pruned), "never_routed": never}
    return LayerPolicy(list(kept), extra, constants=means, record=record)


def merge_layer(
    kept: Sequence[int],
    *,
    frequency: torch.Tensor,
    coact: Optional[torch.Tensor],
    router: Callable[[], torch.Tensor],
    num_experts: int,
) -> LayerPolicy:
    """Fold each pruned expert into the kept expert it co-activates with most (else: nearest router row)."""
    kept = list(kept)
    pruned = [e for e in range(num_experts) if e not in set(kept)]
    rows: Optional[torch.Tensor] = None  # [E, D] loaded on first need
    to: list[int] = []
    by: list[str] = []
    for p in pruned:
        candidates, rule = kept, "router"
        if coact is not None:
            counts = coact.double()[p, kept]  # [kept]
            best = float(counts.max())
            if best > 0:
                candidates = [k for k, n in zip(kept, counts.tolist()) if n == best]
                rule = "coact" if len(candidates) == 1 else "coact+router"
        if len(candidates) == 1:
            to.append(candidates[0])
        else:
            if rows is None:
                rows = router().double()
            similarity = torch.nn.functional.cosine_similarity(rows[p][None, :], rows[candidates], dim=-1)  # [candidates]
            to.append(candidates[int(similarity.argmax())])
        by.append(rule)
    extra = ExtraRows(tuple(pruned), tuple(to))
    record = {"rows": pruned, "to": to, "by": by}
    return LayerPolicy(kept, extra, frequency=frequency.double(), record=record)


def merge_tensor(parts: Iterable[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """``sum_i c_i * T_i`` in fp32 (``c`` from :meth:`LayerPolicy.fold_coefficients`), one tensor at a time."""
    out: Optional[torch.Tensor] = None
    for coefficient, tensor in parts:
        term = tensor.float() * coefficient
        out = term if out is None else out.add_(term)
    if out is None:
        raise ValueError("merge_tensor needs at least one tensor")
    return out


# ---- in memory ---------------------------------------------------------------------------------------
def apply_policy(model: Any, plan: PolicyPlan) -> Any:
    """A new :class:`NllbMoeForPruning` from ``model`` (holding every expert of ``plan``) with the plan applied.

    The in-memory counterpart of an export made with the same plan (same weights in ``model``'s dtype).
    """
    from pruning.model.build import build_empty_model

    weight = model.model.shared.weight
    experts = {slot: lp.kept for slot, lp in plan.layers.items()}
    out = build_empty_model(model.config, experts=experts, extra_rows=plan.extra_rows(), dtype=weight.dtype, device=weight.device)
    source = dict(model.model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, param in out.model.named_parameters(remove_duplicate=True):
            if ".ffn." in name and any(name.startswith(f"{side}.layers.{layer}.ffn.") for side, layer in plan.layers):
                continue
            param.copy_(source[name])
        for (side, layer), lp in plan.layers.items():
            full, moe = model.moe_layer(side, layer), out.moe_layer(side, layer)
            row_of = {e: i for i, e in enumerate(full.router_ids)}
            local = {e: i for i, e in enumerate(full.expert_ids)}
            moe.router.weight.copy_(full.router.weight[[row_of[e] for e in moe.router_ids]])
            for i, k in enumerate(lp.kept):
                for dest in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"):
                    stacked = getattr(full.experts, dest)
                    merged = merge_tensor((c, stacked[local[e]]) for e, c in lp.fold_coefficients(k))
                    getattr(moe.experts, dest)[i].copy_(merged)
            if moe.constant_outputs is not None and lp.constants is not None:
                moe.constant_outputs.copy_(lp.constants)
    out.tie_weights()
    out.set_dispatch(getattr(model, "dispatch_name", "auto"))
    out.tokenizer = getattr(model, "tokenizer", None)
    out.eval()
    return out


def constant_tensors(plan: PolicyPlan) -> dict[str, torch.Tensor]:
    """``{canonical name: [P, D] float64}`` of the substitute layers' constant outputs."""
    return {constant_outputs_key(side, layer): lp.constants for (side, layer), lp in plan.layers.items() if lp.constants is not None and lp.constants.shape[0]}
