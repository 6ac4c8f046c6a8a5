"""Helpers for the statistics tests: a small FLORES-layout directory and an independent counter reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests import fixtures

LANGS = ("fra_Latn", "deu_Latn", "eng_Latn")
COUNTERS = ("tokens", "top1", "top2", "gate", "conf1", "conf2", "rank")


def make_flores(root: Path, *, n: int = 6, langs: tuple[str, ...] = LANGS, start: int = 0, splits: tuple[str, ...] = ("dev",)) -> Path:
    """``root/{split}/{lang}.{split}``: sentences ``start .. start+n`` of each language (the fixture's words)."""
    for split in splits:
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        for i, lang in enumerate(langs):
            lines = fixtures.sentences(start + n, seed=100 + i)[start:]
            (folder / f"{lang}.{split}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


class RoutingRecorder:
    """Forward hooks that keep every MoE layer's Routing (the reference's own capture, no library counters)."""

    def __init__(self, model: Any):
        self.calls: list[tuple[str, Any]] = []
        self.handles = [moe.register_forward_hook(lambda m, i, o, side=side: self.calls.append((side, o[1]))) for side, _, moe in model.moe_layers()]

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def reference_counters(model: Any, sentence_pairs: list[tuple[list[int], list[int]]], *, num_experts: int) -> dict[str, dict[str, torch.Tensor]]:
    """Counters from the router's probabilities, one sentence at a time (no padding), in a plain loop.

    ``sentence_pairs``: (encoder ids ``[src] tokens </s>``, labels ``[tgt] tokens </s>``). The decoder
    input is written here independently: ``[</s>] + labels[:-1]``.
    """
    start = model.config.decoder_start_token_id
    sides = {"enc": list(model.topology.moe_layers("encoder")), "dec": list(model.topology.moe_layers("decoder"))}
    out = {s: {c: torch.zeros(len(layers), num_experts, dtype=torch.float64) for c in COUNTERS} for s, layers in sides.items()}
    for s in out:
        out[s]["tokens"] = torch.zeros(len(sides[s]), dtype=torch.float64)
    recorder = RoutingRecorder(model)
    try:
        for source, labels in sentence_pairs:
            recorder.calls.clear()
            with torch.no_grad():
                model(
                    input_ids=torch.tensor([source]),
                    decoder_input_ids=torch.tensor([[start] + labels[:-1]]),
                    use_cache=False,
                )
            rows = {"enc": 0, "dec": 0}
            for side, routing in recorder.calls:
                side = "enc" if side == "encoder" else "dec"
                _add_layer(out[side], rows[side], routing)
                rows[side] += 1
    finally:
        recorder.close()
    return out


def _add_layer(counters: dict[str, torch.Tensor], row: int, routing: Any) -> None:
    probs = routing.probs.double().tolist()
    logits = routing.logits.double().tolist()
    ids = routing.expert_ids.tolist()
    for t in range(len(probs)):
        order = sorted(range(len(ids)), key=lambda e: (-logits[t][e], e))
        assert order[:2] == routing.expert_idx[t].tolist(), "router choices differ from the logit order"
        counters["tokens"][row] += 1
        for position, e in enumerate(order, start=1):
            counters["gate"][row, ids[e]] += probs[t][e]
            counters["rank"][row, ids[e]] += position
        first, second = order[0], order[1]
        counters["top1"][row, ids[first]] += 1
        counters["conf1"][row, ids[first]] += probs[t][first]
        counters["top2"][row, ids[second]] += 1
        counters["conf2"][row, ids[second]] += probs[t][second]


def assert_counters_close(
    got: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    *,
    what: str,
    rtol: float = 1e-4,
    atol: float = 1e-6,
    rank_atol: float = 4.0,
) -> None:
    """Counts exactly equal; sums within ``rtol`` (default: fp32 forwards of other batch shapes, padding, ...).

    Rank sums get ``rank_atol``: among 128 experts two low-ranked ones are often within 1e-6 of each
    other, and fp32 noise of another batch shape swaps them (each swap moves two sums by 1).
    """
    for name in COUNTERS:
        if name == "rank":
            diff = float((got[name] - expected[name]).abs().max())
            assert diff <= rank_atol, f"{what}/rank: max abs diff {diff}"
            torch.testing.assert_close(got[name].sum(-1), expected[name].sum(-1), rtol=0, atol=atol, msg=f"{what}/rank totals")
        elif name in ("tokens", "top1", "top2"):
            assert torch.equal(got[name], expected[name]), f"{what}/{name}: counts differ"
        else:
            diff = float((got[name] - expected[name]).abs().max())
            torch.testing.assert_close(got[name], expected[name], rtol=rtol, atol=atol, msg=f"{what}/{name}: max abs diff {diff:.3g}")


def triangular(n: int) -> float:
    return n * (n + 1) / 2


def forward_observed(model: Any, batch: dict[str, torch.Tensor], **collector_options: Any) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``(plain logits, logits with a RoutingCollector on, its counters)`` of one batch (the collector is closed)."""
    from pruning.stats.collector import RoutingCollector

    with torch.no_grad():
        plain = model(**batch, use_cache=False).logits
        collector = RoutingCollector(model, num_experts=model.topology.num_experts, **collector_options)
        try:
            observed = model(**batch, use_cache=False).logits
            counters = collector.take()
        finally:
            collector.close()
    return plain, observed, counters
