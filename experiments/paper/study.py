"""One pruning configuration of the paper, evaluated on the testbed (hydra; multirun for sweeps).

The full model is loaded once; each direction then routes only over the experts the selection gives
it (``router.active`` masks through a manifest built in memory), which is exactly what an export of
those experts computes (tests/test_export.py checks that equality), without writing checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from pruning.data.directions import split_direction
from pruning.index import ExpertIndex, direction_ids
from pruning.select import SelectOptions, select_experts
from pruning.stats.counters import RoutingStats
from pruning.topology import Topology


def sample_directions(languages: list[str], spec: Any, *, seed: int) -> list[tuple[str, str]]:
    if isinstance(spec, int):
        every = [(s, t) for s in languages for t in languages if s != t]
        rng = random.Random(seed)
        return sorted(rng.sample(every, min(spec, len(every))))
    return [split_direction(d, what="directions") for d in spec]


def random_index(selected: ExpertIndex, topology: Topology, *, seed: int) -> dict[str, list[int]]:
    """Per entry, the same number of experts in each MoE layer as the selection, drawn at random."""
    rng = random.Random(seed)
    out = {}
    for key, ids in selected.entries.items():
        per_layer: dict[int, int] = {}
        for gid in ids:
            per_layer[gid // topology.num_experts] = per_layer.get(gid // topology.num_experts, 0) + 1
        out[key] = sorted(m * topology.num_experts + e for m, n in per_layer.items() for e in rng.sample(range(topology.num_experts), n))
    return out


def run(cfg: DictConfig) -> dict[str, Any]:
    import sacrebleu

    from pruning import load_model
    from pruning.data.flores import FloresDir
    from pruning.translate import DecodingOptions, translate_sentences

    started = time.time()
    model = load_model(cfg.model, dtype="fp32")
    topology = model.topology
    flores = FloresDir(cfg.data)
    languages = flores.languages(cfg.split)
    spec = cfg.directions if isinstance(cfg.directions, int) else list(cfg.directions)
    directions = sample_directions(languages, spec, seed=cfg.seed)
    options = SelectOptions(**{k: v for k, v in OmegaConf.to_object(cfg.select).items() if v is not None})
    options.validate()
    kept: dict[str, list[int]] | None = None
    selection_summary: list[str] = []
    if cfg.baseline == "floor":
        model.set_no_experts(True)  # every expert output zeroed: what the dense layers alone do
    elif cfg.baseline != "full":
        stats = RoutingStats.load(cfg.stats)
        selection = select_experts(stats, options, expect_topology=topology)
        selection_summary = selection.summary()
        index = selection.index
        if cfg.baseline == "random":
            index = ExpertIndex(kind=index.kind, entries={k: tuple(v) for k, v in random_index(index, topology, seed=cfg.seed).items()})
        kept = {f"{s}-{t}": direction_ids(index, s, t, topology) for s, t in directions}
        model.manifest = {"topology": topology.to_dict(), "directions": kept}
    decoding = DecodingOptions(beam=cfg.beam, max_length=cfg.max_new_tokens, batch_tokens=cfg.batch_tokens)
    scores = {}
    for src, tgt in directions:
        sources = flores.read(src, cfg.split)[: cfg.max_sentences]
        refs = flores.read(tgt, cfg.split)[: cfg.max_sentences]
        hyps = translate_sentences(model, sources, src=src, tgt=tgt, options=decoding)
        scores[f"{src}-{tgt}"] = round(sacrebleu.corpus_chrf(hyps, [refs], word_order=2).score, 3)
    kept_counts = sorted({len(v) for v in kept.values()}) if kept else [0 if cfg.baseline == "floor" else topology.num_total_experts]
    row = {
        "study": cfg.study,
        "baseline": cfg.baseline,
        "select": OmegaConf.to_object(cfg.select),
        "kept_experts_per_direction": kept_counts,
        "pruned_share": round(1 - kept_counts[0] / topology.num_total_experts, 4),
        "mean_chrf++": round(sum(scores.values()) / len(scores), 3),
        "chrf++": scores,
        "directions": len(directions),
        "max_sentences": cfg.max_sentences,
        "beam": cfg.beam,
        "split": cfg.split,
        "selection": selection_summary,
        "model": cfg.model,
        "stats": cfg.stats if cfg.baseline not in ("full", "floor") else None,
        "seconds": round(time.time() - started, 1),
    }
    name = hashlib.sha1(json.dumps([row["study"], row["baseline"], row["select"], cfg.seed], sort_keys=True).encode()).hexdigest()[:10]
    out = Path(hydra.utils.to_absolute_path(cfg.results)) / "runs" / f"{cfg.study}-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=1) + "\n")
    print(f"{cfg.study} {cfg.baseline} {row['select']['metric']} ratio={row['select']['ratio']} kept={kept_counts} mean chrF++ {row['mean_chrf++']} -> {out}")
    return row


@hydra.main(version_base=None, config_path="conf", config_name="study")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
