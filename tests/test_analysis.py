"""Chunked statistics (``stats --chunk-sentences``), metric agreement (``compare-metrics``) and kept-set
stability under resampling (``stability``): against per-token references, hand examples and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pruning.cli import main
from pruning.config import ConfigError
from pruning.model.loading import load_model
from pruning.stats.collect import StatsOptions, collect_statistics, make_batches
from pruning.stats.counters import Chunks, RoutingStats, StatsError
from tests.stats_fixtures import LANGS, assert_counters_close, make_flores, reference_counters

FRA, DEU, ENG = LANGS
PAIRS = [f"{FRA}-{DEU}", f"{DEU}-{ENG}"]
N_SENTENCES = 7


@pytest.fixture(scope="module")
def flores(tmp_path_factory) -> Path:
    return make_flores(tmp_path_factory.mktemp("flores"), n=N_SENTENCES)


def collect(model_dir: Path, data: Path, out: Path, **kw) -> RoutingStats:
    base = dict(model=str(model_dir), data=str(data), out=str(out), progress=False, pairs=PAIRS, batch_tokens=40)
    base.update(kw)
    collect_statistics(StatsOptions(**base))
    return RoutingStats.load(out)


@pytest.fixture(scope="module")
def whole(tiny_hf_dir, flores, tmp_path_factory) -> RoutingStats:
    """Unchunked teacher statistics of the 7 sentences."""
    return collect(tiny_hf_dir, flores, tmp_path_factory.mktemp("whole") / "whole.safetensors")


@pytest.fixture(scope="module")
def chunked(tiny_hf_dir, flores, tmp_path_factory) -> RoutingStats:
    """The same with chunks of 3 sentences (3 does not divide 7: chunks of 3, 3 and 1)."""
    return collect(tiny_hf_dir, flores, tmp_path_factory.mktemp("chunked") / "k3.safetensors", chunk_sentences=3)


def tokenized(model, data: Path, src: str, tgt: str) -> list[tuple[list[int], list[int]]]:
    sources = (data / "dev" / f"{src}.dev").read_text().splitlines()
    targets = (data / "dev" / f"{tgt}.dev").read_text().splitlines()
    tok = model.tokenizer
    tok.src_lang, tok.tgt_lang = src, tgt
    return [(tok(s)["input_ids"], tok(text_target=t)["input_ids"]) for s, t in zip(sources, targets)]


# ---- chunked collection --------------------------------------------------------------------------
def test_batches_never_mix_chunks():
    sources = [[5] * n for n in (3, 9, 4, 9, 2, 2, 2)]
    batches = make_batches(sources, None, batch_tokens=100, pad_id=1, first_line=4, chunk_sentences=3)
    # lines 4..10: chunk 1 = lines 4, 5; chunk 2 = 6, 7, 8; chunk 3 = 9, 10; one batch each (the budget allows it)
    assert [sorted(b.sentences) for b in batches] == [[4, 5], [6, 7, 8], [9, 10]]
    assert [sorted(b.sentences) for b in make_batches(sources, None, batch_tokens=100, pad_id=1)] == [list(range(7))]


def test_chunks_sum_to_the_direction_and_match_the_unchunked_run(chunked, whole):
    assert chunked.chunk_sentences == 3 and sorted(chunked.chunks) == sorted(PAIRS)
    assert chunked.info["chunk_sentences"] == 3
    for direction in PAIRS:
        chunks = chunked.chunks[direction]
        assert chunks.ids.tolist() == [0, 1, 2] and chunks.sentences.tolist() == [3, 3, 1]
        for side in ("enc", "dec"):
            assert set(chunks.counters[side]) == set(whole.side(direction, side))  # every routing counter
            for name, value in chunks.counters[side].items():
                assert value.shape == (3, *chunked.side(direction, side)[name].shape)
                assert torch.equal(value.sum(0), chunked.side(direction, side)[name]), f"{direction}/{side}/{name}"
            # other batches (chunk by chunk) than the unchunked run: counts equal, sums close
            assert_counters_close(chunked.side(direction, side), whole.side(direction, side), what=f"{direction}/{side}")


def test_one_chunk_equals_the_per_token_reference_of_its_sentences(chunked, tiny_hf_dir, flores):
    model = load_model(tiny_hf_dir)
    pairs = tokenized(model, flores, FRA, DEU)
    for chunk, lines in ((1, slice(3, 6)), (2, slice(6, 7))):
        expected = reference_counters(model, pairs[lines], num_experts=model.topology.num_experts)
        for side in ("enc", "dec"):
            got = {name: value[chunk] for name, value in chunked.chunks[f"{FRA}-{DEU}"].counters[side].items()}
            assert_counters_close(got, expected[side], what=f"chunk {chunk}/{side}")


def test_halves_with_first_sentence_merge_into_the_whole(chunked, tiny_hf_dir, flores, tmp_path):
    first = collect(tiny_hf_dir, flores, tmp_path / "a.safetensors", chunk_sentences=3, max_sentences=3)
    collect(tiny_hf_dir, flores, tmp_path / "b.safetensors", chunk_sentences=3, first_sentence=3)
    assert first.info["data"]["first_sentence"] == 0 and first.chunks[PAIRS[0]].ids.tolist() == [0]
    rc = main(["merge-stats", str(tmp_path / "b.safetensors"), str(tmp_path / "a.safetensors"), "--out", str(tmp_path / "m.safetensors")])
    assert rc == 0
    merged = RoutingStats.load(tmp_path / "m.safetensors")
    for direction in PAIRS:
        got, expected = merged.chunks[direction], chunked.chunks[direction]
        assert got.ids.tolist() == [0, 1, 2] and got.sentences.tolist() == [3, 3, 1]  # sorted by id
        for side in ("enc", "dec"):
            for name in expected.counters[side]:
                torch.testing.assert_close(got.counters[side][name], expected.counters[side][name], rtol=1e-12, atol=1e-12)
            assert_counters_close(merged.side(direction, side), chunked.side(direction, side), what=side, rtol=1e-12, atol=1e-12, rank_atol=0)
    # the same sentences twice: refused, naming the chunk
    with pytest.raises(StatsError, match=r"chunk\(s\) \[0\] are in both files"):
        first.merge(first, what="a again")


def test_merge_refuses_other_chunk_size_and_mixed_chunking(chunked, whole):
    other = RoutingStats(chunked.topology, {d: chunked.counters[d] for d in PAIRS[:1]}, {})
    chunks = chunked.chunks[PAIRS[0]]
    other.add_chunks(PAIRS[0], Chunks(chunks.ids + 10, chunks.sentences, chunks.counters), chunk_sentences=4)
    with pytest.raises(StatsError, match="chunks of 4 sentences cannot be merged with chunks of 3"):
        chunked.merge(other, what="k4")
    with pytest.raises(StatsError, match=f"direction {min(PAIRS)} has chunk counters in only one of the files"):
        chunked.merge(whole, what="unchunked")


def test_load_refuses_chunks_that_do_not_add_up(chunked, tmp_path):
    broken = RoutingStats(chunked.topology, chunked.counters, {}, dict(chunked.chunks), 3)
    bad = chunked.chunks[PAIRS[0]]
    counters = {side: dict(named) for side, named in bad.counters.items()}
    counters["dec"]["top1"] = counters["dec"]["top1"].clone()
    counters["dec"]["top1"][1, 0, 5] += 1
    broken.chunks[PAIRS[0]] = Chunks(bad.ids, bad.sentences, counters)
    broken.save(tmp_path / "broken.safetensors")
    with pytest.raises(StatsError, match=f"chunks of {PAIRS[0]}: dec/top1 summed over the chunks differs"):
        RoutingStats.load(tmp_path / "broken.safetensors")


def test_chunk_options_are_checked(tiny_hf_dir, flores, tmp_path, chunked):
    with pytest.raises(ConfigError, match="--first-sentence 2 must be a multiple of --chunk-sentences 3"):
        StatsOptions(model="m", data="d", out="o", pairs=PAIRS, chunk_sentences=3, first_sentence=2).validate()
    with pytest.raises(StatsError, match="--first-sentence 9 is past the end of split dev"):
        collect(tiny_hf_dir, flores, tmp_path / "x.safetensors", first_sentence=9)
    out = tmp_path / "r.safetensors"
    chunked.save(out)
    with pytest.raises(StatsError, match=r"chunk_sentences: file 3, this run None"):
        collect(tiny_hf_dir, flores, out, pairs=[f"{ENG}-{FRA}"], resume=True)
