"""The expert index: paper-compatible JSON, validation, and resolving a direction's experts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pruning.data.directions import DirectionError
from pruning.errors import UserError
from pruning.index import (
    ExpertIndex,
    ExpertIndexError,
    direction_ids,
    experts_for_direction,
    layer_counts,
    read_index,
    union_for_directions,
    validate_index,
    write_index,
)
from pruning.topology import NLLB_MOE_54B, Topology

PAPER_EXPERTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "nllb-pruning-paper" / "experts.json"
T = NLLB_MOE_54B
TINY = Topology(encoder_layers=4, decoder_layers=4, encoder_sparse_step=2, decoder_sparse_step=2, num_experts=8, d_model=16, ffn_dim=32, vocab_size=100)


def side_ids(topology: Topology, side: str, per_layer: list[int]) -> list[int]:
    """Global ids of experts ``per_layer`` in every MoE layer of ``side``."""
    return [topology.global_id(side, layer, e) for layer in topology.moe_layers(side) for e in per_layer]  # type: ignore[arg-type]


def lang_index() -> ExpertIndex:
    # aaa keeps experts 0-3 everywhere, bbb keeps 4-7: a direction's experts show whose entry they came from
    return ExpertIndex.from_entries(
        "lang",
        {
            "aaa_Latn": side_ids(TINY, "encoder", [0, 1, 2, 3]) + side_ids(TINY, "decoder", [0, 1, 2, 3]),
            "bbb_Latn": side_ids(TINY, "encoder", [4, 5, 6, 7]) + side_ids(TINY, "decoder", [4, 5, 6, 7]),
            "ccc_Latn": side_ids(TINY, "decoder", [1, 3, 5, 7]),  # only ever a target
        },
    )


def test_per_language_direction_takes_encoder_from_source_and_decoder_from_target() -> None:
    index = lang_index()
    validate_index(index, TINY)
    experts = experts_for_direction(index, "aaa_Latn", "bbb_Latn", TINY)
    assert list(experts) == [("encoder", 1), ("encoder", 3), ("decoder", 1), ("decoder", 3)]
    assert experts[("encoder", 1)] == [0, 1, 2, 3] and experts[("encoder", 3)] == [0, 1, 2, 3]
    assert experts[("decoder", 1)] == [4, 5, 6, 7] and experts[("decoder", 3)] == [4, 5, 6, 7]
    assert experts_for_direction(index, "bbb_Latn", "ccc_Latn", TINY)[("decoder", 3)] == [1, 3, 5, 7]
    with pytest.raises(ExpertIndexError, match="'ccc_Latn' has no encoder experts"):
        experts_for_direction(index, "ccc_Latn", "aaa_Latn", TINY)


def test_pair_and_all_forms_resolve() -> None:
    ids_ab = side_ids(TINY, "encoder", [0, 2, 4, 6]) + side_ids(TINY, "decoder", [1, 3, 5, 7])
    pair = ExpertIndex.from_entries("pair", {"aaa_Latn-bbb_Latn": ids_ab})
    assert experts_for_direction(pair, "aaa_Latn", "bbb_Latn", TINY)[("encoder", 3)] == [0, 2, 4, 6]
    with pytest.raises(ExpertIndexError, match="direction 'bbb_Latn-aaa_Latn' is not in the expert index; it has directions: aaa_Latn-bbb_Latn"):
        experts_for_direction(pair, "bbb_Latn", "aaa_Latn", TINY)
    everything = ExpertIndex.for_all(ids_ab)
    assert experts_for_direction(everything, "any_Latn", "other_Latn", TINY)[("decoder", 1)] == [1, 3, 5, 7]


def test_union_for_directions() -> None:
    index = lang_index()
    union = union_for_directions(index, ["aaa_Latn-bbb_Latn", ("bbb_Latn", "ccc_Latn")], TINY)
    assert union[("encoder", 1)] == [0, 1, 2, 3, 4, 5, 6, 7]  # aaa's and bbb's encoder experts
    assert union[("decoder", 1)] == [1, 3, 4, 5, 6, 7]  # bbb's and ccc's decoder experts
    with pytest.raises(ExpertIndexError, match="no directions given"):
        union_for_directions(index, [], TINY)


def test_unknown_language_lists_known_languages() -> None:
    entries = {f"l{i:02d}_Latn": side_ids(TINY, "encoder", [0, 1, 2, 3]) + side_ids(TINY, "decoder", [0, 1, 2, 3]) for i in range(25)}
    index = ExpertIndex.from_entries("lang", entries)
    with pytest.raises(ExpertIndexError) as info:
        experts_for_direction(index, "l01_Latn", "l99_Latn", TINY)
    message = str(info.value)
    assert "target language 'l99_Latn' is not in the expert index" in message
    assert "l00_Latn, l01_Latn" in message and "l19_Latn" in message and "l20_Latn" not in message
    assert "(25 in all)" in message
    assert isinstance(info.value, UserError)


@pytest.mark.parametrize("index", [lang_index(), ExpertIndex.for_all(side_ids(TINY, "encoder", [0, 1, 2, 3]) + side_ids(TINY, "decoder", [2, 3, 4, 5]))])
def test_write_then_read_gives_the_same_index(tmp_path: Path, index: ExpertIndex) -> None:
    path = write_index(index, tmp_path / "sub" / "experts.json")
    assert read_index(path) == index
    assert json.loads(path.read_text()) == index.to_json_data()
    assert [p.name for p in path.parent.iterdir()] == ["experts.json"]  # no temporary file left


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"aaa_Latn": [0, 1, 2, 3, 3]}, "repeats expert id"),
        ({"aaa_Latn": [0, 1, 2, 32]}, r"outside 0\.\.31"),
        ({"aaa_Latn": [-1, 0, 1, 2]}, "outside"),
        ({"aaa_Latn": [0, 1, 2, 3, 8, 9, 10]}, "keeps 3 expert\\(s\\) in encoder layer 3; every kept MoE layer needs at least 4"),
        ({"aaa_Latn-bbb_Latn": [0, 1, 2, 3, 8, 9, 10, 11]}, "keeps 0 expert\\(s\\) in decoder layer 1"),
        ({"aaa_Latn": [0, 1, 2, "3"]}, "must hold integer expert ids"),
        ({"aaa_Latn": [0, 1, 2, True]}, "must hold integer expert ids"),
        ({"aaa_Latn": "0,1,2"}, "must be a list of expert ids"),
        ({"aaa_Latn": [0], "aaa_Latn-bbb_Latn": [0]}, "mixes direction keys"),
        ({"aaa-bbb-ccc": [0]}, "is not a direction"),
        ({}, "the index is empty"),
        ("experts", "expected a list of expert ids or an object"),
    ],
)
def test_malformed_index_is_a_clear_error(tmp_path: Path, data: object, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises((ExpertIndexError, DirectionError), match=message):
        validate_index(read_index(path), TINY, what=str(path))


def test_unreadable_index_files(tmp_path: Path) -> None:
    with pytest.raises(ExpertIndexError, match="does not exist"):
        read_index(tmp_path / "missing.json")
    bad = tmp_path / "broken.json"
    bad.write_text('{"aaa_Latn": [0, 1,')
    with pytest.raises(ExpertIndexError, match=r"not valid JSON \(line 1"):
        read_index(bad)


def test_index_for_another_topology_is_refused() -> None:
    big = ExpertIndex.for_all(range(0, T.num_total_experts, 4))
    validate_index(big, T)
    with pytest.raises(ExpertIndexError, match=r"outside 0\.\.31 \(this topology has 32 experts\)"):
        validate_index(big, TINY)


@pytest.mark.skipif(not PAPER_EXPERTS.is_file(), reason="the paper's experts.json is not in ../shared/data")
def test_the_papers_experts_json() -> None:
    index = read_index(PAPER_EXPERTS)
    validate_index(index, T)
    validate_index(index, T, per_layer={"encoder": 36, "decoder": 12})
    with pytest.raises(ExpertIndexError, match=r"keeps 12 expert\(s\) in decoder layer 3, expected 16"):
        validate_index(index, T, per_layer={"decoder": 16})
    assert index.kind == "lang" and len(index.keys) == 202
    enc_layers = [("encoder", layer) for layer in T.moe_layers("encoder")]
    dec_layers = [("decoder", layer) for layer in T.moe_layers("decoder")]
    for lang, ids in index.entries.items():
        counts = layer_counts(ids, T)
        assert [counts[k] for k in enc_layers] == [36] * 6, lang
        assert [counts[k] for k in dec_layers] == [12] * 6, lang
        assert sum(1 for i in ids if T.side_of_id(i) == "encoder") == 216
    fra_eng = experts_for_direction(index, "fra_Latn", "eng_Latn", T)
    assert sum(map(len, fra_eng.values())) == 288
    # per language: the encoder part is French's, the decoder part English's
    expected_enc = sorted(T.expert_ref(i).expert for i in index.entries["fra_Latn"] if T.expert_ref(i).side == "encoder" and T.expert_ref(i).layer == 3)
    expected_dec = sorted(T.expert_ref(i).expert for i in index.entries["eng_Latn"] if T.expert_ref(i).side == "decoder" and T.expert_ref(i).layer == 23)
    assert fra_eng[("encoder", 3)] == expected_enc and fra_eng[("decoder", 23)] == expected_dec
    assert len(direction_ids(index, "eng_Latn", "fra_Latn", T)) == 288
