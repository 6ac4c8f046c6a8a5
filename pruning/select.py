"""Expert selection: a metric, a strategy and a granularity turn routing statistics into an expert index.

Strategies (how many experts each MoE layer keeps):

* ``per-layer`` ("fixed per layer"): the same count in every encoder MoE layer and the same count in
  every decoder MoE layer, the experts with the highest scores.
* ``global`` (the paper's "global threshold"): normalise each layer's scores to sum 1, keep the
  ``min_per_layer`` best experts of every layer, then raise a common threshold t = 0.001, 0.002, ...
  until the experts whose cumulative normalised score (best first, the mandatory ones left out) is
  below t, plus the mandatory ones, reach the requested count. If the last step overshoots, layers
  are filled in order (encoder first), each with its best candidates, until the count is reached:
  the same rule as the companion code (naver/nllb-pruning). With an encoder budget (``--enc-dec``
  or ``--enc-keep``) the threshold runs on the encoder's and on the decoder's layers separately
  (the companion code meant to do that, but slices its 12x128 tensor at row 768 and so thresholds
  all layers twice). We compute in float64 with t = k/1000; the companion code uses float32, so a
  result may differ when an expert's cumulative score is within float32 rounding of a threshold.
* ``budget``: the most experts whose pruned model fits ``--budget-gb`` (decimal GB, 10^9 bytes) at
  ``--dtype``, allocated by the global threshold.

How many experts (per direction's model): ``--ratio r`` (share pruned, default 0.8), ``--keep N`` or
``--budget-gb G``; split between encoder and decoder by ``--enc-dec a:b`` (default 3:1) or
``--enc-keep M``; ``--enc-dec none`` puts no split (per-layer: the same count in every MoE layer;
global: one threshold over all layers).
Rounding: ``per-layer`` needs whole per-layer counts at exactly a:b, so it keeps the largest total not
above the request that splits so (``--ratio 0.8`` of 1,536 asks for at most 307.2 and keeps 288 =
6 x 36 + 6 x 12). ``global``/``budget`` keep floor(request), the encoder getting floor(N * a/(a+b))
and the decoder the rest. Each MoE layer keeps at least ``--min-per-layer`` (4) experts, else error.

Granularity (what one entry of the index is selected from):

* ``global``: one list for every direction; encoder scores from every direction with a real source,
  decoder scores from every direction with a real target;
* ``pair``: one entry per direction ``src-tgt`` from that direction's statistics;
* ``lang``: one entry per language, its encoder experts from the directions it is the source of
  (``lang-*``, including the paper's aggregate ``lang-X``), its decoder experts from those it is the
  target of (``*-lang``, including ``X-lang``).

Scores of several directions are aggregated by ``--aggregate tokens`` (sum counters, then score; the
default) or ``mean`` (unweighted mean of per-direction scores), see :mod:`metrics.aggregate`.
A data-free metric (``router_distinct``, :mod:`metrics.router`) scores the router rows of
``--router-model CKPT`` instead: the same scores for every entry, the statistics only name the entries;
without statistics it gives one list (``--granularity global``).
Ties are broken by expert id (lower first), so a selection is deterministic.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from metrics import AGGREGATIONS, aggregate_metric, compute_metric, get_metric, metric_names
from metrics.router import data_free_hint, needs_router_rows
from pruning.config import DTYPE_CHOICES
from pruning.data.directions import SHORT_SIDE, SIDES, Side, split_direction
from pruning.errors import UserError
from pruning.index import DEFAULT_MIN_PER_LAYER, ExpertIndex, IndexKind, layer_counts
from pruning.stats.counters import RoutingStats
from pruning.topology import Topology, bytes_for, gib

STRATEGIES: tuple[str, ...] = ("per-layer", "global", "budget")
GRANULARITIES: tuple[str, ...] = ("global", "pair", "lang")
DEFAULT_RATIO = 0.8
THRESHOLD_STEPS = 1000
"""The global threshold is searched at t = k / THRESHOLD_STEPS, k = 1, 2, ... (steps of 0.001)."""
GB = 10**9
ANY_LANGUAGE = "X"


class SelectionError(UserError):
    """A selection request cannot be met: bad counts, missing statistics, unknown languages."""


# ---- options ---------------------------------------------------------------------------------------
# Option groups, each a dataclass whose fields are flags (and config keys); a command's config inherits
# the groups it offers: select = KeepOptions + GranularityOptions + the metric; compare-metrics and
# stability reuse them the same way.
@dataclass
class KeepOptions:
    """How many experts each direction's model keeps, and how they are spread over the layers."""

    strategy: str = field(
        default="per-layer",
        metadata={"help": "per-layer (fixed count per layer), global (threshold) or budget (most experts that fit --budget-gb)", "choices": STRATEGIES},
    )
    ratio: float | None = field(
        default=None, metadata={"help": f"share of experts to prune (default {DEFAULT_RATIO} when neither --keep nor --budget-gb is given)"}
    )
    keep: int | None = field(default=None, metadata={"help": "experts to keep per direction's model (encoder + decoder)"})
    budget_gb: float | None = field(default=None, metadata={"help": "memory budget of one direction's pruned model, in GB (10^9 bytes) at --dtype"})
    dtype: str = field(default="bf16", metadata={"help": "dtype for --budget-gb and the summary: bf16, fp16 or fp32", "choices": DTYPE_CHOICES})
    enc_dec: str = field(default="3:1", metadata={"help": "encoder:decoder split of the kept experts, e.g. 3:1, or none (no split)"})
    enc_keep: int | None = field(default=None, metadata={"help": "encoder experts to keep (overrides --enc-dec)"})
    min_per_layer: int = field(default=DEFAULT_MIN_PER_LAYER, metadata={"help": "fewest experts any MoE layer keeps"})

    def validate_keep(self) -> None:
        _choice("--strategy", self.strategy, STRATEGIES)
        given = [flag for flag, value in (("--ratio", self.ratio), ("--keep", self.keep), ("--budget-gb", self.budget_gb)) if value is not None]
        if len(given) > 1:
            raise SelectionError(f"give one of --ratio, --keep, --budget-gb, not {' and '.join(given)}")
        if self.strategy == "budget" and self.budget_gb is None:
            raise SelectionError("--strategy budget needs --budget-gb (the memory budget in GB)")
        if self.ratio is not None and not 0 <= self.ratio < 1:
            raise SelectionError(f"--ratio is the share of experts pruned and must be in [0, 1), got {self.ratio}")
        if self.keep is not None and self.keep < 1:
            raise SelectionError(f"--keep must be a positive number of experts, got {self.keep}")
        if self.budget_gb is not None and not self.budget_gb > 0:
            raise SelectionError(f"--budget-gb must be positive, got {self.budget_gb}")
        if self.min_per_layer < 1:
            raise SelectionError(f"--min-per-layer must be at least 1, got {self.min_per_layer}")
        parse_enc_dec(self.enc_dec)
        bytes_for(0, self.dtype)


@dataclass
class GranularityOptions:
    """What one entry of the index is selected from, and how directions are combined."""

    granularity: str = field(default="lang", metadata={"help": "global (one list), pair (per direction) or lang (per language)", "choices": GRANULARITIES})
    langs: list[str] = field(default_factory=list, metadata={"help": "languages for --granularity lang, comma-separated (default: all in the statistics)"})
    pairs: list[str] = field(default_factory=list, metadata={"help": "directions src-tgt for --granularity pair, comma-separated (default: all)"})
    aggregate: str = field(
        default="tokens",
        metadata={"help": "combine directions by tokens (sum counters, then score) or mean (of per-direction scores)", "choices": AGGREGATIONS},
    )

    def validate_granularity(self) -> None:
        _choice("--granularity", self.granularity, GRANULARITIES)
        _choice("--aggregate", self.aggregate, AGGREGATIONS)
        if self.langs and self.granularity != "lang":
            raise SelectionError(f"--langs is for --granularity lang, not {self.granularity}")
        if self.pairs and self.granularity != "pair":
            raise SelectionError(f"--pairs is for --granularity pair, not {self.granularity}")


@dataclass
class SelectOptions(GranularityOptions, KeepOptions):
    """What to select; each field is a flag of ``nllb-prune select`` and a key of ``conf/select.yaml``."""

    metric: str = field(default="importance", metadata={"help": f"expert score, higher = keep: {', '.join(metric_names())}"})
    router_model: str = field(
        default="", metadata={"help": "checkpoint whose router rows a data-free metric (router_distinct) scores; unpruned, either layout"}
    )

    def validate(self) -> None:
        get_metric(self.metric)
        if needs_router_rows(self.metric) and not self.router_model:
            raise SelectionError(data_free_hint(self.metric))
        self.validate_keep()
        self.validate_granularity()
        if self.granularity == "lang" and self.strategy != "per-layer" and self.enc_keep is None and parse_enc_dec(self.enc_dec) is None:
            raise SelectionError(
                f"--strategy {self.strategy} with --granularity lang needs an encoder:decoder split (--enc-dec or "
                f"--enc-keep): a direction combines one language's encoder experts with another's decoder experts, "
                f"so its total is only fixed when each side's count is"
            )

    @classmethod
    def from_groups(cls, groups: object, *, metric: str) -> "SelectOptions":
        """The selection that an object carrying the keep and granularity groups means, for ``metric``."""
        names = [f.name for f in dataclasses.fields(KeepOptions)] + [f.name for f in dataclasses.fields(GranularityOptions)]
        return cls(metric=metric, **{name: getattr(groups, name) for name in names})


def parse_enc_dec(text: str) -> tuple[int, int] | None:
    """``"3:1"`` -> ``(3, 1)``; ``"none"`` -> ``None`` (no encoder budget)."""
    if text.strip().lower() in ("none", "", "joint"):
        return None
    parts = text.split(":")
    try:
        a, b = (int(p) for p in parts)
    except ValueError:
        raise SelectionError(f"--enc-dec must look like 3:1 (encoder:decoder) or none, got {text!r}") from None
    if a < 1 or b < 1:
        raise SelectionError(f"--enc-dec parts must be positive, got {text!r}")
    return a, b


# ---- how many experts ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class KeepPlan:
    """Experts kept by one direction's model."""

    total: int
    """Encoder + decoder experts."""
    encoder: int | None
    """Encoder experts; ``None`` when one threshold runs over both sides."""
    decoder: int | None
    per_layer: tuple[int, int] | None
    """(encoder, decoder) experts per MoE layer, for the per-layer strategy."""
    notes: tuple[str, ...] = ()


def budget_experts(topology: Topology, *, budget_gb: float, dtype: str = "bf16") -> int:
    """The most experts whose pruned model (:meth:`Topology.pruned_params`) fits ``budget_gb`` GB at ``dtype``."""
    budget = budget_gb * GB
    if bytes_for(topology.pruned_params(0), dtype) > budget:
        need = bytes_for(topology.pruned_params(0), dtype) / GB
        raise SelectionError(f"--budget-gb {budget_gb}: the model without any expert already needs {need:.2f} GB at {dtype}")
    per_expert = bytes_for(topology.pruned_params(1) - topology.pruned_params(0), dtype)
    n = int((budget - bytes_for(topology.pruned_params(0), dtype)) // per_expert)
    n = min(n, topology.num_total_experts)
    while n > 0 and bytes_for(topology.pruned_params(n), dtype) > budget:  # guard against float rounding
        n -= 1
    while n < topology.num_total_experts and bytes_for(topology.pruned_params(n + 1), dtype) <= budget:
        n += 1
    return n


def plan_keep(topology: Topology, options: SelectOptions) -> KeepPlan:
    """Turn ``--ratio``/``--keep``/``--budget-gb`` and ``--enc-dec``/``--enc-keep`` into counts (see the module docstring)."""
    n_enc, n_dec = (len(topology.moe_layers(s)) for s in SIDES)
    total = topology.num_total_experts
    flag: tuple[str, str]  # (flag, value) that sized the request, for messages
    if options.keep is not None:
        requested, flag = float(options.keep), ("`--keep`", str(options.keep))
    elif options.budget_gb is not None:
        requested = float(budget_experts(topology, budget_gb=options.budget_gb, dtype=options.dtype))
        flag = ("`--budget-gb`", f"{options.budget_gb:g}")
    else:
        ratio = DEFAULT_RATIO if options.ratio is None else options.ratio
        requested, flag = (1 - ratio) * total, ("`--ratio`", f"{ratio:g}")
    if requested > total:
        raise SelectionError(f"{flag[0]} {flag[1]} asks for {requested:g} experts, but the model has {total}")
    split = parse_enc_dec(options.enc_dec)
    m = options.min_per_layer
    if options.strategy == "per-layer":
        return _plan_per_layer(topology, requested=requested, flag=flag, split=split, enc_keep=options.enc_keep, min_per_layer=m)
    n = int(math.floor(requested + 1e-9))
    if options.enc_keep is not None:
        enc, dec = options.enc_keep, n - options.enc_keep
    elif split is not None:
        enc = (n * split[0]) // (split[0] + split[1])
        dec = n - enc
    else:
        if n < m * (n_enc + n_dec):
            raise SelectionError(
                f"{flag[0]} must leave at least {m} experts per layer, but {flag[1]} leaves {n} for "
                f"{n_enc + n_dec} MoE layers (at least {m * (n_enc + n_dec)} needed)"
            )
        return KeepPlan(n, None, None, None)
    for side, count, layers in (("encoder", enc, n_enc), ("decoder", dec, n_dec)):
        if count < m * layers:
            raise SelectionError(
                f"{flag[0]} must leave at least {m} experts per layer, but {flag[1]} leaves {count} for the {layers} "
                f"{side} MoE layers (at least {m * layers} needed)"
            )
        if count > layers * topology.num_experts:
            raise SelectionError(f"{flag[0]} {flag[1]}: the {side} would keep {count} experts, but it has {layers * topology.num_experts}")
    return KeepPlan(n, enc, dec, None)


def _plan_per_layer(
    topology: Topology,
    *,
    requested: float,
    flag: tuple[str, str],
    split: tuple[int, int] | None,
    enc_keep: int | None,
    min_per_layer: int,
) -> KeepPlan:
    n_enc, n_dec = (len(topology.moe_layers(s)) for s in SIDES)
    first = {s: topology.moe_layers(s)[0] for s in SIDES}
    e = topology.num_experts
    notes: list[str] = []
    if enc_keep is not None:
        n = int(math.floor(requested + 1e-9))
        dec_keep = n - enc_keep
        if enc_keep % n_enc or dec_keep % n_dec or dec_keep < 0:
            raise SelectionError(
                f"--strategy per-layer keeps the same count in every layer of a side, so --enc-keep {enc_keep} must be "
                f"a multiple of {n_enc} (encoder MoE layers) and the {dec_keep} decoder experts left of "
                f"{flag[0]} {flag[1]} a multiple of {n_dec}"
            )
        per_enc, per_dec = enc_keep // n_enc, dec_keep // n_dec
    else:
        a, b = split if split is not None else (n_enc, n_dec)  # none: the same count in every MoE layer
        # per-layer counts (p*m, q*m) with p*n_enc : q*n_dec = a : b exactly, m as large as fits
        g = math.gcd(a * n_dec, b * n_enc)
        p, q = a * n_dec // g, b * n_enc // g
        unit = p * n_enc + q * n_dec
        raw_enc, raw_dec = math.floor(requested * p / unit + 1e-9), math.floor(requested * q / unit + 1e-9)
        _check_min(flag, {"encoder": raw_enc, "decoder": raw_dec}, first, min_per_layer)
        mult = int(math.floor(requested / unit + 1e-9))
        per_enc, per_dec = p * mult, q * mult
        kept = per_enc * n_enc + per_dec * n_dec
        if kept != round(requested, 6):
            ratio = f"{a}:{b}" if split is not None else "the same count in every layer"
            notes.append(
                f"{flag[0]} {flag[1]} asks for {requested:g} experts; per-layer counts at {ratio} must be whole, so {kept} are kept "
                f"({per_enc} per encoder layer, {per_dec} per decoder layer)"
            )
    _check_min(flag, {"encoder": per_enc, "decoder": per_dec}, first, min_per_layer)
    for side, count in (("encoder", per_enc), ("decoder", per_dec)):
        if count > e:
            raise SelectionError(f"{flag[0]} {flag[1]} would keep {count} experts per {side} layer, but a layer has {e}")
    enc, dec = per_enc * n_enc, per_dec * n_dec
    return KeepPlan(enc + dec, enc, dec, (per_enc, per_dec), tuple(notes))


def _check_min(flag: tuple[str, str], per_layer: dict[str, int], first: dict[Side, int], min_per_layer: int) -> None:
    for side, count in per_layer.items():
        if count < min_per_layer:
            raise SelectionError(
                f"{flag[0]} must leave at least {min_per_layer} experts per layer, but {flag[1]} leaves {count} in {side} layer {first[side]}"  # type: ignore[index]
            )


# ---- strategies on one score matrix ------------------------------------------------------------------
def keep_order(scores: torch.Tensor) -> torch.Tensor:
    """Per layer, expert indices from the most to the least worth keeping; ties: lower id first.

    ``scores`` [L, E] -> long [L, E].
    """
    values = scores.detach().to(torch.float64).cpu().numpy()
    if not np.isfinite(values).all():
        raise SelectionError("expert scores contain NaN or infinite values")
    order = np.argsort(-values, axis=1, kind="stable")  # stable: equal scores keep id order
    return torch.from_numpy(order)


def select_per_layer(scores: torch.Tensor, *, per_layer: int | Sequence[int]) -> torch.Tensor:
    """Keep the ``per_layer`` best experts of each layer: bool mask [L, E]."""
    n_layers, n_experts = scores.shape
    counts = [per_layer] * n_layers if isinstance(per_layer, int) else list(per_layer)
    if len(counts) != n_layers or any(not 0 <= k <= n_experts for k in counts):
        raise SelectionError(f"per-layer counts {counts} do not fit {n_layers} layers of {n_experts} experts")
    order = keep_order(scores)  # [L, E]
    mask = torch.zeros(n_layers, n_experts, dtype=torch.bool)
    for layer, k in enumerate(counts):
        mask[layer, order[layer, :k]] = True
    return mask


def select_global_threshold(
    scores: torch.Tensor,
    *,
    keep: int,
    min_per_layer: int = DEFAULT_MIN_PER_LAYER,
    steps: int = THRESHOLD_STEPS,
    what: str = "scores",
) -> torch.Tensor:
    """The paper's global threshold over the layers of ``scores`` [L, E] (>= 0): bool mask [L, E], ``keep`` True."""
    n_layers, n_experts = scores.shape
    if not min_per_layer * n_layers <= keep <= n_layers * n_experts:
        raise SelectionError(
            f"{what}: the global threshold keeps between {min_per_layer * n_layers} ({min_per_layer} per layer) and "
            f"{n_layers * n_experts} experts of {n_layers} layers, asked for {keep}"
        )
    values = scores.detach().to(torch.float64).cpu().numpy()  # [L, E]
    if not np.isfinite(values).all():
        raise SelectionError(f"{what}: expert scores contain NaN or infinite values")
    if (values < 0).any():
        layer = int(np.nonzero((values < 0).any(1))[0][0])
        raise SelectionError(f"{what}: the global threshold normalises scores to sum 1 and needs them >= 0; layer {layer} has negative ones")
    sums = values.sum(1, keepdims=True)  # [L, 1]
    if (sums <= 0).any():
        layer = int(np.nonzero(sums[:, 0] <= 0)[0][0])
        raise SelectionError(f"{what}: every expert of layer {layer} scores 0; the global threshold cannot rank them")
    normalised = values / sums  # [L, E], each row sums to 1
    order = np.argsort(-normalised, axis=1, kind="stable")  # [L, E], best first, ties by id
    ranked = np.take_along_axis(normalised, order, axis=1)  # [L, E]
    m = min_per_layer
    cumulative = np.cumsum(ranked[:, m:], axis=1)  # [L, E-m], mandatory experts left out
    # smallest threshold t = k/steps whose candidates (cumulative < t) plus the mandatory ones reach `keep`
    flat = np.sort(cumulative, axis=None)
    thresholds = np.arange(1, steps + 1) / steps  # [steps]
    reached = m * n_layers + np.searchsorted(flat, thresholds, side="left") >= keep  # [steps]
    t = thresholds[int(np.argmax(reached))] if reached.any() else np.inf
    mask = np.zeros((n_layers, n_experts), dtype=bool)
    mask[np.arange(n_layers)[:, None], order[:, :m]] = True
    remaining = keep - m * n_layers
    for layer in range(n_layers):  # overshoot: layers in order, each its best candidates (the companion code's rule)
        take = min(int((cumulative[layer] < t).sum()), remaining)
        mask[layer, order[layer, m : m + take]] = True
        remaining -= take
    if remaining:
        raise SelectionError(f"{what}: the global threshold found only {keep - remaining} of {keep} experts")  # unreachable
    return torch.from_numpy(mask)


# ---- granularity ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Unit:
    """One entry of the index and the directions whose statistics feed each of its sides."""

    key: str
    sources: dict[str, list[str]]
    """``{"enc": [directions], "dec": [directions]}``; a side may be empty for a language entry."""


def plan_units(stats: RoutingStats, options: SelectOptions) -> list[Unit]:
    """The index entries to select, with their statistics (see the module docstring)."""
    has = {side: [d for d in stats.directions if side in stats.counters[d]] for side in ("enc", "dec")}
    if options.granularity == "global":
        sources = {
            "enc": [d for d in has["enc"] if split_direction(d)[0] != ANY_LANGUAGE],
            "dec": [d for d in has["dec"] if split_direction(d)[1] != ANY_LANGUAGE],
        }
        for side, dirs in sources.items():
            if not dirs:
                raise SelectionError(f"the statistics have no {'encoder' if side == 'enc' else 'decoder'} counters")
        return [Unit("*", sources)]
    if options.granularity == "pair":
        real = [d for d in stats.directions if ANY_LANGUAGE not in split_direction(d)]
        wanted = list(options.pairs) or [d for d in real if d in has["enc"] and d in has["dec"]]
        if not wanted:
            raise SelectionError(
                "--granularity pair needs statistics of single directions, but these only hold per-language aggregates "
                f"({', '.join(stats.directions[:4])} ...); use --granularity lang"
            )
        units = []
        for d in wanted:
            split_direction(d)
            if d not in stats.counters:
                raise SelectionError(f"direction {d!r} is not in the statistics; {_known('directions', real)}")
            missing = [s for s in ("enc", "dec") if d not in has[s]]
            if missing:
                raise SelectionError(f"direction {d!r} has no {'/'.join(missing)} statistics; {_known('directions', real)}")
            units.append(Unit(d, {"enc": [d], "dec": [d]}))
        return units
    pairs = [(d, *split_direction(d)) for d in stats.directions]
    sources_of = {
        lang: {"enc": [d for d, s, _ in pairs if s == lang and d in has["enc"]], "dec": [d for d, _, t in pairs if t == lang and d in has["dec"]]}
        for lang in sorted({x for _, s, t in pairs for x in (s, t)} - {ANY_LANGUAGE})
    }
    known = sorted(lang for lang, src in sources_of.items() if src["enc"] or src["dec"])
    wanted = list(options.langs) or known
    unknown = [lang for lang in wanted if lang not in known]
    if unknown:
        raise SelectionError(f"language(s) {', '.join(unknown)} have no statistics; {_known('languages', known)}")
    return [Unit(lang, sources_of[lang]) for lang in wanted]


def _known(what: str, keys: Sequence[str], limit: int = 20) -> str:
    more = f" ... ({len(keys)} in all)" if len(keys) > limit else ""
    return f"the statistics have {what}: {', '.join(keys[:limit])}{more}"


# ---- the whole selection -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Selection:
    """The result of :func:`select_experts`: the index and how it was sized."""

    index: ExpertIndex
    plan: KeepPlan
    topology: Topology
    dtype: str

    def layer_count_ranges(self) -> dict[tuple[Side, int], tuple[int, int]]:
        """(fewest, most) experts kept in each MoE layer over the index entries that hold that side."""
        out: dict[tuple[Side, int], tuple[int, int]] = {}
        for ids in self.index.entries.values():
            for key, count in layer_counts(ids, self.topology).items():
                if count == 0:
                    continue  # a language entry without this side
                low, high = out.get(key, (count, count))
                out[key] = (min(low, count), max(high, count))
        return out

    def summary(self) -> list[str]:
        """A few lines for the terminal: counts per layer, params and memory of one direction's model."""
        entries = len(self.index.entries)
        what = {"all": "one list for every direction", "pair": f"{entries} direction(s)", "lang": f"{entries} language(s)"}[self.index.kind]
        lines = [f"index: {what}"]
        lines.extend(f"note: {n}" for n in self.plan.notes)
        per_layer = []
        for (side, layer), (low, high) in self.layer_count_ranges().items():
            per_layer.append(f"{SHORT_SIDE[side]}{layer}:{low if low == high else f'{low}-{high}'}")
        lines.append("experts kept per MoE layer: " + " ".join(per_layer))
        params = self.topology.pruned_params(self.plan.total)
        nbytes = bytes_for(params, self.dtype)
        split = f" ({self.plan.encoder} encoder + {self.plan.decoder} decoder)" if self.plan.encoder is not None else ""
        lines.append(
            f"per direction: {self.plan.total} of {self.topology.num_total_experts} experts{split}, "
            f"{params / 1e9:.2f}B params, {nbytes / GB:.1f} GB ({gib(nbytes):.1f} GiB) at {self.dtype}"
        )
        return lines


def select_experts(stats: RoutingStats | None, options: SelectOptions, *, expect_topology: Topology | None = None) -> Selection:
    """Select the experts to keep from ``stats`` as ``options`` say; see the module docstring.

    ``stats`` may be None only for a data-free metric with ``--granularity global``.
    """
    options.validate()
    fixed = _router_scores(stats, options)  # {"enc": [L_enc, E], "dec": [L_dec, E]} or None
    topology = stats.topology if stats is not None else fixed.topology  # type: ignore[union-attr]
    if expect_topology is not None:
        expect_topology.check_same_routing(topology, what="the statistics")
    if stats is not None:
        stats.validate()
    plan = plan_keep(topology, options)
    units = plan_units(stats, options) if stats is not None else [Unit("*", {"enc": ["router"], "dec": ["router"]})]
    kind: IndexKind = {"global": "all", "pair": "pair", "lang": "lang"}[options.granularity]  # type: ignore[assignment]
    entries: dict[str, list[int]] = {}
    for unit in tqdm(units, desc="select", unit=kind, disable=len(units) < 50 or None):
        scores = {
            side: fixed.scores[side]
            if fixed is not None
            else aggregate_metric(options.metric, [(f"{d}/{side}", stats.counters[d][side]) for d in dirs], how=options.aggregate)  # type: ignore[arg-type, union-attr]
            for side, dirs in unit.sources.items()
            if dirs
        }
        entries[unit.key] = _select_unit(scores, plan, options, topology, what=f"{unit.key}")
    return Selection(ExpertIndex.from_entries(kind, entries), plan, topology, options.dtype)


def _select_unit(scores: dict[str, torch.Tensor], plan: KeepPlan, options: SelectOptions, topology: Topology, *, what: str) -> list[int]:
    """Global ids kept for one entry from its per-side scores (``{"enc": [L_enc, E], "dec": [L_dec, E]}``)."""
    return _global_ids(select_masks(scores, plan, options, what=what), topology)


def select_masks(scores: dict[str, torch.Tensor], plan: KeepPlan, options: SelectOptions, *, what: str) -> dict[str, torch.Tensor]:
    """Kept experts of one entry per side, bool masks ``{"enc": [L_enc, E], "dec": [L_dec, E]}``, from its per-side scores."""
    masks: dict[str, torch.Tensor] = {}
    if plan.per_layer is not None:
        for side, k in zip(("enc", "dec"), plan.per_layer):
            if side in scores:
                masks[side] = select_per_layer(scores[side], per_layer=k)
    elif plan.encoder is None:
        both = torch.cat([scores["enc"], scores["dec"]])  # [L_enc + L_dec, E]
        mask = select_global_threshold(both, keep=plan.total, min_per_layer=options.min_per_layer, what=what)
        n_enc = scores["enc"].shape[0]
        masks = {"enc": mask[:n_enc], "dec": mask[n_enc:]}
    else:
        for side, keep in (("enc", plan.encoder), ("dec", plan.decoder)):
            if side in scores:
                masks[side] = select_global_threshold(scores[side], keep=int(keep or 0), min_per_layer=options.min_per_layer, what=f"{what} ({side})")
    return masks


def _global_ids(masks: dict[str, torch.Tensor], topology: Topology) -> list[int]:
    ids: list[int] = []
    for side_short, mask in masks.items():
        side: Side = "encoder" if side_short == "enc" else "decoder"
        for row, layer in enumerate(topology.moe_layers(side)):
            ids.extend(topology.global_id(side, layer, int(e)) for e in torch.nonzero(mask[row]).flatten())
    return sorted(ids)


@dataclass(frozen=True)
class _RouterScores:
    topology: Topology
    scores: dict[str, torch.Tensor]
    """``{"enc": [L_enc, E], "dec": [L_dec, E]}``"""


def _router_scores(stats: RoutingStats | None, options: SelectOptions) -> _RouterScores | None:
    """A data-free metric's scores from ``--router-model`` (None for a statistics metric); checks what goes with them."""
    if not needs_router_rows(options.metric):
        if stats is None:
            raise SelectionError(f"metric {options.metric!r} is computed from routing statistics: give --stats")
        return None
    if stats is None and options.granularity != "global":
        raise SelectionError(
            f"without statistics there are no languages or directions to select for: the data-free metric {options.metric} "
            f"gives one list; use --granularity global (or give --stats to name the entries)"
        )
    from metrics.router import router_counters
    from pruning.checkpoint.reader import read_router_rows

    router = read_router_rows(options.router_model)
    if stats is not None:
        stats.topology.check_same_routing(router.topology, what=f"--router-model {options.router_model}")
    where = f"router rows of {router.path}"
    return _RouterScores(router.topology, {side: compute_metric(options.metric, c, where=f"{where} ({side})") for side, c in router_counters(router).items()})


def _choice(flag: str, value: str, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise SelectionError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")
