"""Criterion x policy on the testbed: per-language pruning at ~50/70/80/90%, chrF++ and off-target rate.

    python -m experiments.beyond.study [key=value ...]      # hydra: experiments/beyond/conf/study.yaml
    python -m experiments.beyond.report                     # table + plots in experiments/results/beyond/

One process loads the testbed once and runs the whole grid. Each configuration (criterion, policy,
kept experts) writes ``runs/<name>.json`` under ``results`` and is skipped when that file exists, so
an interrupted grid resumes. The paper's setting is ``importance`` + ``drop``.

Per direction ``src-tgt`` the encoder keeps the experts selected for ``src`` and the decoder those
for ``tgt`` (per-language selection, fixed count per layer). ``drop`` routes over the kept experts
only (the paper; in memory through ``router.active``, as an export would compute, tests/test_export.py);
``skip``, ``substitute`` and ``merge`` build that direction's MoE layers with the policy's extra router rows from
the full model's weights and the statistics of ``src`` (encoder) and ``tgt`` (decoder), as
``nllb-prune export --policy`` does for a one-direction export.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from experiments.paper import study as paper_study
from metrics.router import needs_router_rows
from pruning.index import ExpertIndex, direction_ids
from pruning.select import SelectOptions, select_experts
from pruning.stats.counters import RoutingStats
from pruning.topology import Topology
from pruning.versions import versions


def sample_directions(languages: list[str], count: int, *, seed: int) -> list[tuple[str, str]]:
    return paper_study.sample_directions(languages, count, seed=seed)


def random_index(selected: ExpertIndex, topology: Topology, *, seed: int) -> ExpertIndex:
    """Per entry, the same number of experts in each MoE layer as ``selected``, drawn at random."""
    entries = paper_study.random_index(selected, topology, seed=seed)
    return ExpertIndex(kind=selected.kind, entries={k: tuple(v) for k, v in entries.items()})


def select_index(stats: RoutingStats, cfg: DictConfig, *, criterion: str, keep: int, enc_keep: int, topology: Topology) -> ExpertIndex:
    """Per-language experts by ``criterion`` (``random``: the importance counts, random experts)."""
    metric = "importance" if criterion == "random" else criterion
    options = SelectOptions(metric=metric, keep=keep, enc_keep=enc_keep, min_per_layer=1, granularity=cfg.granularity, aggregate=cfg.aggregate)
    if needs_router_rows(metric):  # data-free: the model's router rows, no statistics
        options.router_model = hydra.utils.to_absolute_path(cfg.model)
    options.validate()
    index = select_experts(stats, options, expect_topology=topology).index
    return random_index(index, topology, seed=cfg.seed) if criterion == "random" else index


def run_config(
    model: Any,
    stats: RoutingStats,
    cfg: DictConfig,
    flores: Any,
    directions: list[tuple[str, str]],
    *,
    criterion: str,
    policy: str,
    keep: int | None,
    enc_keep: int | None,
    lid: Any,
) -> dict[str, Any]:
    import sacrebleu

    from pruning.translate import DecodingOptions, translate_sentences

    topology = model.topology
    started = time.time()
    kept: dict[str, list[int]] = {}
    if keep is not None:
        index = select_index(stats, cfg, criterion=criterion, keep=keep, enc_keep=enc_keep, topology=topology)
        kept = {f"{s}-{t}": direction_ids(index, s, t, topology) for s, t in directions}
    decoding = DecodingOptions(beam=cfg.beam, max_length=cfg.max_new_tokens, batch_tokens=cfg.batch_tokens)
    chrf, off_target, hyps_out = {}, {}, {}
    floor = criterion == "floor"  # every expert output zeroed: what the dense layers alone do
    for src, tgt in directions:
        key = f"{src}-{tgt}"
        sources = flores.read(src, cfg.split)[: cfg.max_sentences]
        refs = flores.read(tgt, cfg.split)[: cfg.max_sentences]
        model.set_no_experts(floor)
        try:
            with direction_model(model, stats, kept.get(key), policy=policy, src=src, tgt=tgt) as pruned:
                hyps = translate_sentences(pruned, sources, src=src, tgt=tgt, options=decoding)
        finally:
            model.set_no_experts(False)
        chrf[key] = round(sacrebleu.corpus_chrf(hyps, [refs], word_order=2).score, 3)
        if lid is not None:
            from pruning.lid import off_target_rate

            off_target[key] = round(off_target_rate(lid.predict(hyps), tgt), 3)
        hyps_out[key] = hyps
    counts = sorted({len(v) for v in kept.values()}) or [0 if floor else topology.num_total_experts]
    unpruned = "floor" if floor else "full"
    return {
        "criterion": criterion if keep is not None else unpruned,
        "policy": policy if keep is not None else unpruned,
        "keep": keep,
        "enc_keep": enc_keep,
        "pruned_share": round(1 - counts[0] / topology.num_total_experts, 4),
        "mean_chrf++": round(sum(chrf.values()) / len(chrf), 3),
        "mean_off_target": round(sum(off_target.values()) / len(off_target), 3) if off_target else None,
        "chrf++": chrf,
        "off_target": off_target,
        "hypotheses": hyps_out,
        "seconds": round(time.time() - started, 1),
    }


class direction_model:
    """Context manager: the model that serves one direction under ``policy`` (the full model when ``kept`` is None).

    ``drop`` masks the full model's routers (``router.active``); ``substitute`` / ``merge`` build a new
    model with :func:`pruning.policy.apply_policy` from the plan an export of this one direction would use.
    """

    def __init__(self, model: Any, stats: RoutingStats, kept: list[int] | None, *, policy: str, src: str, tgt: str):
        self.model, self.stats, self.kept, self.policy, self.src, self.tgt = model, stats, kept, policy, src, tgt

    def __enter__(self) -> Any:
        topology = self.model.topology
        if self.kept is None:
            self.model.manifest = None
            return self.model
        if self.policy == "drop":
            self.model.manifest = {"topology": topology.to_dict(), "directions": {f"{self.src}-{self.tgt}": self.kept}}
            return self.model
        from pruning.index import ExpertIndex, experts_for_direction
        from pruning.policy import apply_policy, plan_policy

        union = experts_for_direction(ExpertIndex(kind="all", entries={"*": tuple(self.kept)}), self.src, self.tgt, topology)
        plan = plan_policy(
            self.policy,
            union=union,
            stats=self.stats,
            directions=[f"{self.src}-{self.tgt}"],
            topology=topology,
            router=lambda side, layer: self.model.moe_layer(side, layer).router.weight.detach(),
        )
        return apply_policy(self.model, plan)

    def __exit__(self, *exc: Any) -> None:
        self.model.manifest = None
        for _, _, moe in self.model.moe_layers():
            moe.router.active = None


def grid(cfg: DictConfig) -> list[dict[str, Any]]:
    """Every configuration: the full model, the no-expert floor, then criterion x policy x kept-experts plan."""
    configs: list[dict[str, Any]] = [{"criterion": name, "policy": name, "keep": None, "enc_keep": None} for name in ("full", "floor")]
    for plan in cfg.plans:
        for policy in cfg.policies:
            for criterion in cfg.criteria:
                configs.append({"criterion": criterion, "policy": policy, "keep": plan.keep, "enc_keep": plan.enc_keep})
    return configs


def run_name(config: dict[str, Any]) -> str:
    if config["keep"] is None:
        return config["criterion"]  # full, floor
    return f"{config['criterion']}-{config['policy']}-keep{config['keep']}"


def run(cfg: DictConfig) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    from pruning import load_model
    from pruning.data.flores import FloresDir

    results = Path(hydra.utils.to_absolute_path(cfg.results))
    hyps_dir = Path(hydra.utils.to_absolute_path(cfg.hypotheses))
    model = load_model(hydra.utils.to_absolute_path(cfg.model), dtype="fp32")
    stats = RoutingStats.load(hydra.utils.to_absolute_path(cfg.stats))
    flores = FloresDir(hydra.utils.to_absolute_path(cfg.data))
    directions = sample_directions(flores.languages(cfg.split), cfg.directions, seed=cfg.seed)
    lid = None
    if cfg.lid and Path(hydra.utils.to_absolute_path(cfg.lid)).is_file():
        from pruning.lid import load_lid

        lid = load_lid(hydra.utils.to_absolute_path(cfg.lid))
    rows = []
    for config in tqdm(grid(cfg), desc="configurations", unit="cfg"):
        out = results / "runs" / f"{run_name(config)}.json"
        if out.exists():
            rows.append(json.loads(out.read_text()))
            continue
        row = run_config(model, stats, cfg, flores, directions, lid=lid, **config)
        hyps = row.pop("hypotheses")
        row.update(
            {
                "directions": len(directions),
                "max_sentences": cfg.max_sentences,
                "beam": cfg.beam,
                "split": cfg.split,
                "aggregate": cfg.aggregate,
                "granularity": cfg.granularity,
                "model": cfg.model,
                "stats": cfg.stats,
                "lid": cfg.lid if lid is not None else None,
                "seed": cfg.seed,
                "versions": versions(),
                "device": f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)",
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
        )
        _write_json(hyps_dir / f"{run_name(config)}.json", hyps)
        _write_json(out, row)
        tqdm.write(f"{run_name(config)}: pruned {100 * row['pruned_share']:.1f}%, chrF++ {row['mean_chrf++']}, off-target {row['mean_off_target']}")
        rows.append(row)
    return rows


def _write_json(path: Path, value: Any) -> None:
    from pruning.atomic import write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(value, indent=1, ensure_ascii=False) + "\n")


@hydra.main(version_base=None, config_path="conf", config_name="study")
def main(cfg: DictConfig) -> None:
    print(OmegaConf.to_yaml(cfg))
    run(cfg)


if __name__ == "__main__":
    main()
