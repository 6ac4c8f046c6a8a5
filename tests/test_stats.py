"""Routing statistics: counters against a per-token reference, invariants, teacher and beam collection,
merge, resume, bad input, the paper's JSON, on the tiny real-topology model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from pruning.cli import main
from pruning.model.loading import load_model
from pruning.model.moe import MoeLayer
from pruning.stats import batches, collect
from pruning.stats.batches import decoder_inputs
from pruning.stats.collect import collect_statistics
from pruning.stats.collector import RoutingCollector, routing_counters
from pruning.stats.counters import RoutingStats, StatsError
from pruning.stats.options import StatsOptions
from pruning.topology import Topology
from tests.stats_fixtures import LANGS, assert_counters_close, forward_observed, make_flores, reference_counters, triangular

FRA, DEU, ENG = LANGS


@pytest.fixture(scope="module")
def flores(tmp_path_factory) -> Path:
    return make_flores(tmp_path_factory.mktemp("flores"), n=6, splits=("dev", "devtest"))


@pytest.fixture(scope="module")
def model(tiny_hf_dir):
    return load_model(tiny_hf_dir)


def options(tiny_hf_dir: Path, flores: Path, out: Path, **kw) -> StatsOptions:
    base = dict(model=str(tiny_hf_dir), data=str(flores), out=str(out), progress=False)
    base.update(kw)
    return StatsOptions(**base)


@pytest.fixture(scope="module")
def teacher_stats(tiny_hf_dir, flores, tmp_path_factory) -> RoutingStats:
    """Every direction among the 3 languages, teacher forcing, small batches (so padding is present)."""
    out = tmp_path_factory.mktemp("stats") / "teacher.safetensors"
    collect_statistics(options(tiny_hf_dir, flores, out, langs=list(LANGS), batch_tokens=40))
    return RoutingStats.load(out)


def tokenized_pairs(tokenizer, flores: Path, src: str, tgt: str, *, split: str = "dev"):
    sources = (flores / split / f"{src}.{split}").read_text().splitlines()
    targets = (flores / split / f"{tgt}.{split}").read_text().splitlines()
    out = []
    for s, t in zip(sources, targets):
        tokenizer.src_lang, tokenizer.tgt_lang = src, tgt
        enc = tokenizer(s)["input_ids"]
        labels = tokenizer(text_target=t)["input_ids"]
        out.append((enc, labels))
    return out


# ---- counters against the reference ---------------------------------------------------------------
def test_teacher_counters_equal_per_token_reference(teacher_stats, model, flores):
    pairs = tokenized_pairs(model.tokenizer, flores, FRA, DEU)
    # the conventions, checked on the ids themselves
    src_id, tgt_id, eos = (model.tokenizer.convert_tokens_to_ids(c) for c in (FRA, DEU, "</s>"))
    assert all(e[0] == src_id and e[-1] == eos for e, _ in pairs)
    assert all(lab[0] == tgt_id and lab[-1] == eos for _, lab in pairs)
    expected = reference_counters(model, pairs, num_experts=model.topology.num_experts)
    for side in ("enc", "dec"):
        assert_counters_close(teacher_stats.side(f"{FRA}-{DEU}", side), expected[side], what=f"{FRA}-{DEU}/{side}")
    # every position of the encoder input and one per label: padding (present in these batches) never counts
    assert float(expected["enc"]["tokens"][0]) == sum(len(e) for e, _ in pairs)
    assert float(expected["dec"]["tokens"][0]) == sum(len(lab) for _, lab in pairs)


def test_beam_counts_the_returned_hypothesis(tiny_hf_dir, model, flores, tmp_path):
    out = tmp_path / "beam.safetensors"
    collect_statistics(options(tiny_hf_dir, flores, out, pairs=[f"{ENG}-{FRA}"], mode="beam", beam=3, max_new_tokens=7, batch_tokens=1))
    stats = RoutingStats.load(out)
    assert stats.info["mode"] == "beam" and stats.info["beam"] == 3 and stats.info["sentences"] == {f"{ENG}-{FRA}": 6}
    tok = model.tokenizer
    tgt_id, eos = tok.convert_tokens_to_ids(FRA), tok.eos_token_id
    pairs = []
    for source, _ in tokenized_pairs(tok, flores, ENG, FRA):
        with torch.no_grad():
            seq = model.generate(input_ids=torch.tensor([source]), num_beams=3, max_new_tokens=7, forced_bos_token_id=tgt_id, do_sample=False)[0].tolist()
        hyp = seq[1:]  # drop the decoder start
        if eos in hyp[1:]:
            hyp = hyp[: hyp.index(eos, 1) + 1]
        assert hyp[0] == tgt_id
        pairs.append((source, hyp))
    expected = reference_counters(model, pairs, num_experts=model.topology.num_experts)
    for side in ("enc", "dec"):
        assert_counters_close(stats.side(f"{ENG}-{FRA}", side), expected[side], what=f"beam/{side}")
    assert float(stats.side(f"{ENG}-{FRA}", "dec")["tokens"][0]) == sum(len(h) for _, h in pairs)


def test_pruned_model_counts_by_original_expert_index(tiny_hf_dir, flores):
    topology = Topology.from_config(json.loads((tiny_hf_dir / "config.json").read_text()))
    keep = {(side, layer): [3, 17, 40, 41, 99, 127] for _, side, layer in topology.iter_moe_layers()}
    pruned = load_model(tiny_hf_dir, experts=keep)
    pairs = tokenized_pairs(pruned.tokenizer, flores, DEU, ENG)[:3]
    expected = reference_counters(pruned, pairs, num_experts=topology.num_experts)
    collector = RoutingCollector(pruned, num_experts=topology.num_experts)
    ids, mask = batches.pad([e for e, _ in pairs], pad_id=pruned.config.pad_token_id)
    dec, dec_mask = decoder_inputs([lab for _, lab in pairs], start_id=2, pad_id=pruned.config.pad_token_id)
    with torch.no_grad():
        pruned(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask, use_cache=False)
    got = collector.take()
    collector.close()
    dropped = [e for e in range(topology.num_experts) if e not in keep[("encoder", 3)]]
    for side in ("enc", "dec"):
        assert_counters_close(got[side], expected[side], what=f"pruned/{side}")
        c = got[side]
        assert c["top1"].shape == (6, topology.num_experts)
        assert not c["top1"][:, dropped].any() and not c["rank"][:, dropped].any() and not c["gate"][:, dropped].any()
        torch.testing.assert_close(c["rank"].sum(1), c["tokens"] * triangular(6))  # ranks 1..6 over the kept rows


# ---- invariants ---------------------------------------------------------------------------------
def test_invariants_of_collected_counters(teacher_stats):
    e = teacher_stats.topology.num_experts
    assert len(teacher_stats.directions) == 6
    for direction in teacher_stats.directions:
        for side in ("enc", "dec"):
            c = teacher_stats.side(direction, side)
            tokens = c["tokens"]  # [L]
            assert (tokens > 0).all() and (tokens == tokens[0]).all(), "every MoE layer of a side routes the same tokens"
            assert torch.equal(c["top1"].sum(1), tokens)
            assert torch.equal(c["top2"].sum(1), tokens)
            torch.testing.assert_close(c["gate"].sum(1), tokens, rtol=1e-6, atol=0.0)  # fp32 softmax rows sum to 1 within ulps
            assert torch.equal(c["rank"].sum(1), tokens * triangular(e))
            assert (c["conf1"] <= c["top1"]).all() and (c["conf2"] <= c["top2"]).all()
            assert (c["conf1"] + c["conf2"] <= c["gate"] + 1e-9).all()
            assert (c["conf1"] >= c["top1"] / e - 1e-9).all(), "a 1st choice has probability >= 1/E"
            assert (c["conf2"] <= c["conf1"].sum(1, keepdim=True)).all()
            # rank 1 where 1st, 2 where 2nd, >= 3 otherwise
            assert (c["rank"] >= c["top1"] + 2 * c["top2"] + 3 * (tokens[:, None] - c["top1"] - c["top2"]) - 1e-9).all()
            assert (c["top1"] > 0).sum() > 10, "tokens must reach many experts, not just 0 and 1"
    # teacher forcing: the encoder never sees the target, so a source's encoder counters are the same for every target
    enc_a, enc_b = teacher_stats.side(f"{FRA}-{DEU}", "enc"), teacher_stats.side(f"{FRA}-{ENG}", "enc")
    assert torch.equal(enc_a["top1"], enc_b["top1"])


def test_counters_of_a_layer_with_inactive_experts():
    """Experts masked out for a direction (router.active) get no rank and no probability; one expert: no 2nd choice."""
    layer = MoeLayer(d_model=4, ffn_dim=6, expert_ids=[2, 5, 7, 9], eom=0.2).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(1, 5, 4, generator=torch.Generator().manual_seed(2))
    layer.router.active = torch.tensor([True, False, True, True])
    with torch.no_grad():
        _, routing = layer(x, torch.tensor([[1, 1, 1, 1, 0]]))
    counters, tokens = routing_counters(routing)  # [C, R]
    top1, top2, gate, conf1, conf2, rank = counters
    assert float(tokens) == 4
    assert rank[1] == 0 and gate[1] == 0 and top1[1] == 0 and top2[1] == 0
    assert float(rank.sum()) == 4 * triangular(3) and float(top2.sum()) == 4
    layer.router.active = torch.tensor([False, False, True, False])
    with torch.no_grad():
        _, routing = layer(x, None)
    counters, tokens = routing_counters(routing)
    assert counters[0].tolist() == [0, 0, 5, 0] and float(counters[1].sum()) == 0  # no 2nd choice exists
    assert counters[5].tolist() == [0, 0, 5, 0] and torch.allclose(counters[2], counters[0])


# ---- the model's outputs ------------------------------------------------------------------------
def test_collection_does_not_change_outputs(model, tiny_batch):
    plain, observed, counters = forward_observed(model, tiny_batch)
    assert torch.equal(plain, observed)
    assert float(counters["enc"]["tokens"][0]) == float(tiny_batch["attention_mask"].sum())


def test_teacher_forcing_never_computes_the_output_projection(tiny_hf_dir, flores, tmp_path, monkeypatch, teacher_stats):
    """Routing needs the encoder and decoder stacks only; the LM head's [tokens, vocab] logits are never made."""
    from pruning.model.build import NllbMoeForPruning

    def refuse(self, *args, **kwargs):
        raise AssertionError("teacher-forced statistics ran the output projection")

    monkeypatch.setattr(NllbMoeForPruning, "forward", refuse)
    out = tmp_path / "no-head.safetensors"
    collect_statistics(options(tiny_hf_dir, flores, out, langs=list(LANGS), batch_tokens=40))
    ours, reference = RoutingStats.load(out), teacher_stats
    assert ours.directions == reference.directions
    assert all(torch.equal(ours.side(d, "dec")["top1"], reference.side(d, "dec")["top1"]) for d in ours.directions)


# ---- the file: info, merge, resume ----------------------------------------------------------------
def test_info_identifies_model_data_and_versions(teacher_stats, tiny_hf_dir, flores):
    info = teacher_stats.info
    assert info["model"]["path"] == str(tiny_hf_dir) and info["model"]["layout"] == "hf"
    assert len(info["model"]["config_sha256"]) == 64 and info["model"]["router_fingerprint"]
    files = {f"{lang}.dev": hashlib.sha256((flores / "dev" / f"{lang}.dev").read_bytes()).hexdigest() for lang in (FRA, DEU, ENG)}
    assert info["data"] == {"dir": str(flores), "split": "dev", "max_sentences": None, "first_sentence": 0, "files": files}
    assert info["chunk_sentences"] is None and not teacher_stats.chunks
    assert info["mode"] == "teacher" and info["beam"] is None
    assert info["sentences"] == {d: 6 for d in teacher_stats.directions}
    assert set(info["versions"]) == {"torch", "transformers", "nllb-prune"} and info["date"]


def test_fairseq_layout_gives_the_same_counters_and_fingerprint(teacher_stats, tiny_fairseq_dir, flores, tmp_path):
    out = tmp_path / "fs.safetensors"
    collect_statistics(options(tiny_fairseq_dir, flores, out, pairs=[f"{FRA}-{DEU}"], batch_tokens=40))
    stats = RoutingStats.load(out)
    assert stats.info["model"]["router_fingerprint"] == teacher_stats.info["model"]["router_fingerprint"]
    for side in ("enc", "dec"):
        assert_counters_close(stats.side(f"{FRA}-{DEU}", side), teacher_stats.side(f"{FRA}-{DEU}", side), what=side, rtol=1e-12, atol=1e-12, rank_atol=0)


def test_merge_of_two_halves_equals_the_whole(tiny_hf_dir, tmp_path):
    whole = make_flores(tmp_path / "whole", n=8)
    first = make_flores(tmp_path / "first", n=4)
    second = make_flores(tmp_path / "second", n=4, start=4)
    for name, data in (("whole", whole), ("first", first), ("second", second)):
        collect_statistics(options(tiny_hf_dir, data, tmp_path / f"{name}.safetensors", pairs=[f"{DEU}-{FRA}", f"{FRA}-{ENG}"]))
    assert (second / "dev" / f"{FRA}.dev").read_text().splitlines() == (whole / "dev" / f"{FRA}.dev").read_text().splitlines()[4:]
    rc = main(["merge-stats", str(tmp_path / "first.safetensors"), str(tmp_path / "second.safetensors"), "--out", str(tmp_path / "merged.safetensors")])
    assert rc == 0
    merged, reference = RoutingStats.load(tmp_path / "merged.safetensors"), RoutingStats.load(tmp_path / "whole.safetensors")
    assert merged.directions == reference.directions
    for d in reference.directions:
        for side in ("enc", "dec"):
            assert_counters_close(merged.side(d, side), reference.side(d, side), what=f"{d}/{side}")
    assert len(merged.info["merged_from"]) == 2


def test_merge_refuses_another_topology(teacher_stats, tmp_path, capsys):
    ours = teacher_stats.save(tmp_path / "ours.safetensors")
    e = teacher_stats.topology.num_experts
    other = RoutingStats(Topology(num_experts=e // 2))
    other.add(f"{FRA}-{DEU}", "enc", "tokens", torch.ones(6))
    other.save(tmp_path / "other.safetensors")
    rc = main(["merge-stats", str(ours), str(tmp_path / "other.safetensors"), "--out", str(tmp_path / "m.safetensors")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "other.safetensors" in err and f"num_experts: expected {e}, got {e // 2}" in err
    assert not (tmp_path / "m.safetensors").exists()


def test_resume_skips_completed_directions(tiny_hf_dir, flores, tmp_path, monkeypatch):
    out = tmp_path / "s.safetensors"
    collect_statistics(options(tiny_hf_dir, flores, out, pairs=[f"{FRA}-{DEU}"]))
    before = RoutingStats.load(out)
    ran: list[str] = []
    original = collect._run_direction

    def spy(opts, ctx, model, collector, fl, tok, direction, **kw):
        ran.append(direction)
        return original(opts, ctx, model, collector, fl, tok, direction, **kw)

    monkeypatch.setattr(collect, "_run_direction", spy)
    collect_statistics(options(tiny_hf_dir, flores, out, langs=[FRA, DEU], resume=True))
    assert ran == [f"{DEU}-{FRA}"]
    after = RoutingStats.load(out)
    assert after.directions == sorted([f"{FRA}-{DEU}", f"{DEU}-{FRA}"])
    assert torch.equal(after.side(f"{FRA}-{DEU}", "dec")["top1"], before.side(f"{FRA}-{DEU}", "dec")["top1"])
    assert after.info["sentences"] == {f"{FRA}-{DEU}": 6, f"{DEU}-{FRA}": 6}


def test_interrupt_keeps_completed_directions_and_resume_finishes(tiny_hf_dir, flores, tmp_path, monkeypatch):
    out = tmp_path / "s.safetensors"
    original = collect._run_direction
    calls = []

    def interrupted(*args, **kw):
        calls.append(args[6])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kw)

    monkeypatch.setattr(collect, "_run_direction", interrupted)
    with pytest.raises(KeyboardInterrupt):
        collect_statistics(options(tiny_hf_dir, flores, out, langs=[FRA, ENG]))
    assert RoutingStats.load(out).directions == [calls[0]]
    assert not list(tmp_path.glob(".*tmp*")), "no temporary file left behind"
    monkeypatch.setattr(collect, "_run_direction", original)
    collect_statistics(options(tiny_hf_dir, flores, out, langs=[FRA, ENG], resume=True))
    assert RoutingStats.load(out).directions == sorted([f"{FRA}-{ENG}", f"{ENG}-{FRA}"])


def test_existing_output_needs_resume_and_same_settings(tiny_hf_dir, flores, tmp_path):
    out = tmp_path / "s.safetensors"
    collect_statistics(options(tiny_hf_dir, flores, out, pairs=[f"{FRA}-{DEU}"], max_sentences=2))
    with pytest.raises(StatsError, match="exists: pass --resume"):
        collect_statistics(options(tiny_hf_dir, flores, out, pairs=[f"{DEU}-{FRA}"], max_sentences=2))
    with pytest.raises(StatsError, match=r"mode: file 'teacher', this run 'beam'"):
        collect_statistics(options(tiny_hf_dir, flores, out, pairs=[f"{DEU}-{FRA}"], max_sentences=2, mode="beam", resume=True))
    with pytest.raises(StatsError, match=r"data.split: file 'dev', this run 'devtest'"):
        collect_statistics(options(tiny_hf_dir, flores, out, pairs=[f"{DEU}-{FRA}"], max_sentences=2, split="devtest", resume=True))
    assert RoutingStats.load(out).info["sentences"] == {f"{FRA}-{DEU}": 2}


# ---- bad input and the CLI ------------------------------------------------------------------------
def test_unknown_language_lists_valid_codes(tiny_hf_dir, flores, tmp_path, capsys):
    rc = main(["stats", "--model", str(tiny_hf_dir), "--data", str(flores), "--langs", f"{FRA},fra_Latm", "--out", str(tmp_path / "x.safetensors")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "'fra_Latm'" in err and "valid codes (3): deu_Latn, eng_Latn, fra_Latn" in err
    rc = main(
        ["stats", "--model", str(tiny_hf_dir), "--data", str(flores), "--split", "test", "--langs", f"{FRA},{DEU}", "--out", str(tmp_path / "x.safetensors")]
    )
    assert rc == 2 and "valid splits here: dev, devtest" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_language_unknown_to_the_tokenizer(tiny_hf_dir, tmp_path):
    data = make_flores(tmp_path / "fl", n=2, langs=(FRA, "qaa_Latn"))
    with pytest.raises(StatsError, match=r"tokenizer has no language code for \['qaa_Latn'\]"):
        collect_statistics(options(tiny_hf_dir, data, tmp_path / "x.safetensors", langs=[FRA, "qaa_Latn"]))


@pytest.mark.parametrize(
    "flags, message",
    [
        ([], "give exactly one of --langs, --pairs, --lang"),
        (["--langs", f"{FRA},{DEU}", "--pairs", f"{FRA}-{DEU}"], "--langs and --pairs"),
        (["--langs", FRA], "at least two languages"),
        (["--lang", FRA], "--lang needs --partners"),
        (["--pairs", f"{FRA}-{FRA}"], "into itself"),
        (["--pairs", "fra_Latn"], "--pairs: 'fra_Latn' is not a direction 'src-tgt'"),
        (["--pairs", f"{FRA}-{DEU}", "--mode", "sample"], "invalid choice: 'sample'"),
        (["--pairs", f"{FRA}-{DEU}", "--beam", "0"], "--beam must be at least 1"),
        (["--pairs", f"{FRA}-{DEU}", "--expert-parallel", "2"], "torchrun --nproc-per-node 2"),
    ],
)
def test_bad_flags_are_named(flags, message, tmp_path, capsys):
    try:
        rc = main(["stats", "--model", "m", "--data", "d", "--out", str(tmp_path / "o"), *flags])
    except SystemExit as exc:  # argparse rejects bad choices itself
        rc = exc.code
    assert rc == 2
    assert message in capsys.readouterr().err


def test_directions_of_lang_and_partners():
    opts = StatsOptions(model="m", data="d", out="o", lang=FRA, partners=[ENG, DEU, FRA])
    assert opts.directions() == [f"{FRA}-{ENG}", f"{FRA}-{DEU}", f"{ENG}-{FRA}", f"{DEU}-{FRA}"]
    assert StatsOptions(model="m", data="d", out="o", langs=[FRA, DEU]).directions() == [f"{FRA}-{DEU}", f"{DEU}-{FRA}"]


def test_collect_stats_config_and_overrides(tiny_hf_dir, flores, tmp_path):
    """`make collect-stats LANG=...` runs `stats --config conf/collect_stats.yaml lang=...`: the keys must be valid."""
    config = Path(__file__).resolve().parents[1] / "conf" / "collect_stats.yaml"
    out = tmp_path / "fra.safetensors"
    rc = main(
        [
            "stats",
            "--config",
            str(config),
            f"model={tiny_hf_dir}",
            f"data={flores}",
            f"lang={FRA}",
            f"partners={DEU},{ENG}",
            "max_sentences=2",
            f"out={out}",
            "progress=false",
        ]
    )
    assert rc == 0
    assert RoutingStats.load(out).directions == sorted([f"{FRA}-{DEU}", f"{FRA}-{ENG}", f"{DEU}-{FRA}", f"{ENG}-{FRA}"])


# ---- the paper's JSON -----------------------------------------------------------------------------
def test_paper_json_round_trip_of_collected_counters(teacher_stats, tmp_path):
    from metrics import compute_metric, metric_names
    from metrics.outputs import needs_expert_outputs
    from metrics.router import needs_router_rows
    from pruning.stats.paper_json import read_paper_json, write_paper_json

    path = write_paper_json(teacher_stats, tmp_path / "stats.json", languages=True)
    back = read_paper_json(path, topology=teacher_stats.topology)
    assert f"{FRA}-X" in back.directions and f"X-{DEU}" in back.directions
    for direction in teacher_stats.directions:
        for side in ("enc", "dec"):
            for name in [m for m in metric_names() if not needs_expert_outputs(m) and not needs_router_rows(m)]:  # routing-only statistics
                torch.testing.assert_close(
                    compute_metric(name, back.side(direction, side)),
                    compute_metric(name, teacher_stats.side(direction, side)),
                    msg=f"{direction}/{side}/{name}",
                )
    data = json.loads(path.read_text())
    c = teacher_stats.side(f"{FRA}-{DEU}", "dec")
    gid = teacher_stats.topology.global_id("decoder", 7, 11)
    assert data[f"{FRA}-{DEU}"]["rank"][gid] == pytest.approx(float(c["rank"][1, 11] / c["tokens"][1]))


def test_batches_follow_the_token_budget_and_never_depend_on_order():
    sources = [[5] * n for n in (3, 9, 4, 9, 2)]
    labels = [[6] * n for n in (4, 2, 8, 3, 2)]
    made = batches.make_batches(sources, labels, batch_tokens=20, pad_id=1)
    assert sorted(i for b in made for i in b.sentences) == [0, 1, 2, 3, 4]
    for b in made:
        longest = max(max(len(sources[i]), len(labels[i])) for i in b.sentences)
        assert len(b.sentences) == 1 or len(b.sentences) * longest <= 20
    ids, mask = decoder_inputs([[7, 8, 2], [7, 2]], start_id=2, pad_id=1)
    assert ids.tolist() == [[2, 7, 8], [2, 7, 1]] and mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batches.hypothesis_labels(torch.tensor([[2, 7, 9, 2, 1, 1], [2, 7, 9, 9, 9, 9]]), eos_id=2) == [[7, 9, 2], [7, 9, 9, 9, 9]]


@pytest.mark.parametrize("rows", [1, 2, 5, 36, 128])
def test_rank_sums_numpy_and_torch_paths_agree(rows):
    """The CPU path packs row ids into float64 keys; it must rank exactly like a stable argsort, ties included."""
    from pruning.stats.collector import _rank_sums_numpy, _rank_sums_torch

    g = torch.Generator().manual_seed(rows)
    logits = (torch.randn(300, rows, generator=g) * 12).float()
    logits[:40] = torch.randint(-2, 3, (40, rows), generator=g).float()  # many exact ties, zeros of both signs
    logits[40:60] = -logits[40:60].abs() * 0.0  # -0.0 and +0.0
    if rows > 2:
        logits[60:80, : rows // 2] = float("-inf")  # inactive rows
    first = logits.argmax(1)
    second = logits.scatter(1, first[:, None], float("-inf")).argmax(1) if rows > 1 else first
    real = (torch.rand(300, generator=g) > 0.2).to(torch.float64)
    fast = _rank_sums_numpy(logits, first=first, second=second, real=real)
    exact = _rank_sums_torch(logits, first=first, second=second, real=real)
    assert torch.equal(fast, exact)
    assert float(fast.sum()) == float(real.sum()) * rows * (rows + 1) / 2
