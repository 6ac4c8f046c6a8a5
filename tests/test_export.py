"""`nllb-prune export` / `prune`: pruned exports load back exactly, are layout-independent, multi-direction, streamed, atomic."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

from pruning import load_model
from pruning.checkpoint import torch_zip, writer
from pruning.checkpoint.reader import open_checkpoint
from pruning.cli import main
from pruning.data.directions import DirectionError
from pruning.data.languages import LanguageCodeError
from pruning.export import ExportError, export_checkpoint, parse_directions
from pruning.index import ExpertIndex, ExpertIndexError, read_index, write_index
from pruning.manifest import MANIFEST_NAME, ManifestError, read_manifest
from tests import export_fixtures as ef
from tests import fixtures

FRA, DEU, ENG = ef.LANGS


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module")
def fra_deu_export(tmp_path_factory, tiny_hf_dir, index_path) -> Path:
    out = tmp_path_factory.mktemp("exports") / "fra-deu"
    return export_checkpoint(tiny_hf_dir, experts=index_path, out=out, directions=[(FRA, DEU)], dtype=torch.bfloat16, progress=False)


@pytest.fixture(scope="module")
def fairseq_with_positions(tmp_path_factory, tiny_fairseq_dir, tiny_model) -> Path:
    """The fixture's fairseq checkpoint, its cfg also recording max_source_positions as the HF config does.

    (The shared fixture's cfg lacks it, so the reader assumes fairseq's 1024 while the HF config says 64:
    the same weights, but not the same model description.)
    """
    directory = tmp_path_factory.mktemp("fairseq_pos")
    for file in tiny_fairseq_dir.iterdir():
        (directory / file.name).symlink_to(file)
    shared = next(tiny_fairseq_dir.glob("*-shared.pt"))
    (directory / shared.name).unlink()
    state = torch.load(shared, weights_only=False)  # our own test file
    state["cfg"].model["max_source_positions"] = tiny_model.config.max_position_embeddings
    torch.save(state, directory / shared.name)
    return directory


# ---- the export is the full model restricted to its experts ------------------------------------
def test_export_equals_full_model_restricted_to_the_directions_experts(fra_deu_export, tiny_hf_dir, tiny_model, index_path, topology, tiny_batch):
    expected = ef.expected_direction_experts(read_index(index_path), topology, FRA, DEU)
    reader = open_checkpoint(fra_deu_export)
    assert reader.present_experts() == expected
    manifest = reader.manifest
    assert manifest["experts"] == {f"{side}.{layer}": ids for (side, layer), ids in expected.items()}
    assert list(manifest["directions"]) == [f"{FRA}-{DEU}"]
    assert manifest["index"]["sha256"] == __import__("hashlib").sha256(index_path.read_bytes()).hexdigest()

    # router rows: exactly the kept experts' rows of the full router, in kept order, in fp32
    from safetensors import safe_open

    with safe_open(str(fra_deu_export / "model.safetensors"), framework="pt") as handle:
        for (side, layer), ids in expected.items():
            stored = handle.get_tensor(f"{side}.layers.{layer}.ffn.router.classifier.weight")
            assert stored.dtype == torch.float32
            assert torch.equal(stored, tiny_model.moe_layer(side, layer).router.weight[ids])
        assert handle.get_tensor("shared.weight").dtype == torch.bfloat16

    pruned = load_model(fra_deu_export)
    restricted = load_model(tiny_hf_dir, dtype="bf16", experts=expected)
    assert pruned.expert_selection() == expected
    assert torch.equal(logits(pruned, tiny_batch), logits(restricted, tiny_batch))
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in tiny_model.parameters()) / 5


def test_exports_of_both_layouts_are_byte_identical(tmp_path, tiny_hf_dir, fairseq_with_positions, index_path):
    outs = []
    for name, source in (("from_hf", tiny_hf_dir), ("from_fairseq", fairseq_with_positions)):
        out = export_checkpoint(
            source,
            experts=index_path,
            out=tmp_path / name,
            directions=[(FRA, DEU), (DEU, ENG)],
            dtype=torch.float16,
            max_shard_bytes=40_000,
            progress=False,
        )
        outs.append(out)
    names = sorted(p.name for p in outs[0].iterdir())
    assert names == sorted(p.name for p in outs[1].iterdir())
    assert len([n for n in names if n.startswith("model-")]) > 3, "several shards, so shard boundaries are compared too"
    differing = [n for n in names if (outs[0] / n).read_bytes() != (outs[1] / n).read_bytes()]
    assert differing == []
    for n in ("config.json", MANIFEST_NAME, "model.safetensors.index.json"):
        text = (outs[0] / n).read_text()
        assert str(tiny_hf_dir) not in text and str(fairseq_with_positions) not in text
    manifest = read_manifest(outs[0])
    assert set(manifest["weights"]) == {n for n in names if n.endswith(".safetensors")}


def test_multi_language_export_routes_each_direction_over_its_own_experts(tmp_path, tiny_hf_dir, index_path, tiny_batch):
    multi = load_model(
        export_checkpoint(
            tiny_hf_dir, experts=index_path, out=tmp_path / "multi", directions=parse_directions(langs=list(ef.LANGS)), dtype=None, progress=False
        )
    )
    assert sorted(multi.manifest["directions"]) == sorted(f"{a}-{b}" for a in ef.LANGS for b in ef.LANGS if a != b)
    for src, tgt in ((FRA, DEU), (ENG, FRA)):
        single = load_model(
            export_checkpoint(tiny_hf_dir, experts=index_path, out=tmp_path / f"{src}-{tgt}", directions=[(src, tgt)], dtype=None, progress=False)
        )
        multi.set_direction(src, tgt)
        torch.testing.assert_close(logits(multi, tiny_batch), logits(single, tiny_batch), rtol=1e-5, atol=1e-5)
        from pruning.translate import DecodingOptions, translate_sentences

        options = DecodingOptions(beam=2, max_length=6)
        text = fixtures.sentences(3, seed=11)
        assert translate_sentences(multi, text, src=src, tgt=tgt, options=options) == translate_sentences(single, text, src=src, tgt=tgt, options=options)
    multi.set_direction(None)
    assert all(moe.router.active is None for _, _, moe in multi.moe_layers())
    unrestricted = logits(multi, tiny_batch)
    multi.set_direction(FRA, DEU)
    assert not torch.allclose(unrestricted, logits(multi, tiny_batch)), "the union of experts routes differently"
    with pytest.raises(ManifestError, match=r"direction 'fra_Latn-zul_Latn' is not served by this export; it serves: deu_Latn-eng_Latn"):
        multi.set_direction(FRA, "zul_Latn")


def test_one_list_index_serves_any_direction(tmp_path, tiny_hf_dir, topology):
    ids = sorted({gid for gid in range(0, topology.num_total_experts, 7)})
    path = write_index(ExpertIndex.for_all(ids), tmp_path / "all.json")
    out = export_checkpoint(tiny_hf_dir, experts=path, out=tmp_path / "out", dtype=None, progress=False)
    model = load_model(out)
    assert list(model.manifest["directions"]) == ["*"]
    model.set_direction(FRA, ENG)
    assert all(moe.router.active is None for _, _, moe in model.moe_layers())
    assert sum(len(v) for v in model.expert_selection().values()) == len(ids)


def test_export_cli_info_and_load(tmp_path, tiny_fairseq_dir, index_path, capsys):
    out = tmp_path / "cli"
    assert (
        main(["export", "--model", str(tiny_fairseq_dir), "--experts", str(index_path), "--langs", f"{FRA},{DEU}", "--out", str(out), "--dtype", "fp16"]) == 0
    )
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and f"{DEU}-{FRA}, {FRA}-{DEU}" in printed
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    n_kept = read_manifest(out)["num_experts_kept"]
    assert f"{n_kept} of 1536 held" in info
    assert "directions   2 (experts each routes over):" in info and f"{FRA}-{DEU}" in info and "index        experts.json (lang" in info
    model = load_model(out)
    assert model.model.shared.weight.dtype == torch.float16 and model.manifest["dtype"] == "float16"


# ---- streaming: memory bounded by the largest tensor, whatever the shard size ----------------------
@pytest.mark.parametrize("shard", ["largest file", "one shard for everything"])
def test_export_holds_one_loaded_tensor_at_a_time_whatever_the_shard_size(tmp_path, monkeypatch, shard):
    """Every tensor the export loads is tracked (weak references to its storage) while it stays alive."""
    source = ef.many_file_fairseq(tmp_path, monkeypatch)
    reader = open_checkpoint(source)
    largest_file = max(f.stat().st_size for f in reader.files)
    largest_tensor = max(e.tensor.nbytes for e in reader.entries())
    total = reader.total_bytes()
    assert total > 8 * largest_file, "the checkpoint must be many times its largest file"
    path = write_index(ExpertIndex.for_all(range(reader.topology.num_total_experts)), tmp_path / "all.json")
    tracker = ef.LoadTracker(monkeypatch)
    max_shard_bytes = largest_file if shard == "largest file" else 2 * total
    out = export_checkpoint(source, experts=path, out=tmp_path / "out", dtype=torch.float32, max_shard_bytes=max_shard_bytes, progress=False)
    print(f"largest file {largest_file} B, largest tensor {largest_tensor} B, checkpoint {total} B, peak held {tracker.peak} B")
    assert 0 < tracker.peak <= largest_tensor, (tracker.peak, largest_tensor, total)
    assert len(list(out.glob("*.safetensors"))) == (1 if shard != "largest file" else len(list(out.glob("model-*-of-*.safetensors"))))
    assert load_model(out).expert_selection() == load_model(source).expert_selection()


def test_pruned_experts_are_never_read(tmp_path, tiny_fairseq_dir, index_path, topology, monkeypatch):
    loaded: list[str] = []
    original = torch_zip.LazyTensor.load

    def spy(self):
        loaded.append(self.path.name)
        return original(self)

    monkeypatch.setattr(torch_zip.LazyTensor, "load", spy)
    export_checkpoint(tiny_fairseq_dir, experts=index_path, out=tmp_path / "out", directions=[(FRA, DEU)], progress=False)
    kept = ef.expected_direction_experts(read_index(index_path), topology, FRA, DEU)
    rank_reads = [name for name in loaded if "-rank-" in name]
    assert len(rank_reads) == 4 * sum(len(ids) for ids in kept.values())  # fc1/fc2 weight/bias of each kept expert
    assert {int(name.rsplit("-", 1)[1][:-3]) for name in rank_reads} == {e for ids in kept.values() for e in ids}


# ---- bad input ---------------------------------------------------------------------------------------
def test_export_of_an_export_with_a_bigger_index_names_the_missing_experts(tmp_path, fra_deu_export, index_path):
    with pytest.raises(ExportError, match=r"itself a pruned export\) does not hold: encoder layer 3: expert\(s\) \[") as caught:
        export_checkpoint(fra_deu_export, experts=index_path, out=tmp_path / "again", directions=[(ENG, DEU)], progress=False)
    assert "(it holds 6)" in str(caught.value)
    assert not (tmp_path / "again").exists()
    # the same direction again is fine: an export can be re-exported (e.g. to another dtype)
    again = export_checkpoint(fra_deu_export, experts=index_path, out=tmp_path / "same", directions=[(FRA, DEU)], dtype=torch.float32, progress=False)
    assert open_checkpoint(again).present_experts() == open_checkpoint(fra_deu_export).present_experts()


def test_language_missing_from_the_index_lists_known_languages(tmp_path, tiny_hf_dir, index_path, capsys):
    with pytest.raises(ExpertIndexError, match=r"target language 'zul_Latn' is not in the expert index.*; it has languages: deu_Latn, eng_Latn, fra_Latn"):
        export_checkpoint(tiny_hf_dir, experts=index_path, out=tmp_path / "x", directions=[(FRA, "zul_Latn")], progress=False)
    code = main(["export", "--model", str(tiny_hf_dir), "--experts", str(index_path), "--src", "fra_Latn", "--tgt", "deu_Latm", "--out", str(tmp_path / "y")])
    assert code == 2
    assert "did you mean deu_Latn" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"src": FRA}, ExportError, r"--src and --tgt go together"),
        ({"src": FRA, "tgt": DEU, "langs": [ENG, DEU]}, ExportError, r"give one of --src/--tgt, --langs or --pairs, not --src/--tgt and --langs"),
        ({"langs": [FRA]}, ExportError, r"--langs needs at least two languages"),
        ({"pairs": ["fra_Latn_deu_Latn"]}, DirectionError, r"--pairs: 'fra_Latn_deu_Latn' is not a direction"),
        ({"pairs": ["fra_Latn-fra_Latn"]}, ExportError, r"translates a language into itself"),
        ({"src": "french", "tgt": DEU}, LanguageCodeError, r"source language 'french' is not of the NLLB form"),
    ],
)
def test_bad_direction_flags(kwargs, error, message):
    with pytest.raises(error, match=message):
        parse_directions(**kwargs)


def test_per_language_index_needs_directions(tmp_path, tiny_hf_dir, index_path):
    with pytest.raises(ExportError, match=r"say which directions to export with --src/--tgt, --langs or --pairs \(it has 3 entries"):
        export_checkpoint(tiny_hf_dir, experts=index_path, out=tmp_path / "x", progress=False)


def test_index_for_another_topology_is_refused(tmp_path, tiny_hf_dir):
    path = tmp_path / "big.json"
    path.write_text(json.dumps([1, 2, 5000]))
    with pytest.raises(ExpertIndexError, match=r"expert id\(s\) \[5000\] outside 0..1535"):
        export_checkpoint(tiny_hf_dir, experts=path, out=tmp_path / "x", directions=[(FRA, DEU)], progress=False)


def test_existing_output_is_refused_unless_overwrite(tmp_path, tiny_hf_dir, index_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["export", "--model", str(tiny_hf_dir), "--experts", str(index_path), "--src", FRA, "--tgt", DEU, "--out", str(out)]
    assert main(args) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert main([*args, "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / MANIFEST_NAME).is_file()


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_failed_write_leaves_no_partial_export_and_keeps_the_old_one(tmp_path, tiny_hf_dir, index_path, monkeypatch, failure):
    out = export_checkpoint(tiny_hf_dir, experts=index_path, out=tmp_path / "out", directions=[(FRA, DEU)], progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = {"n": 0}
    original = writer.ShardWriter.add

    def failing_add(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 40:
            raise failure
        return original(self, name, tensor)

    monkeypatch.setattr(writer.ShardWriter, "add", failing_add)
    with pytest.raises(type(failure)):
        export_checkpoint(tiny_hf_dir, experts=index_path, out=out, directions=[(DEU, ENG)], overwrite=True, max_shard_bytes=20_000, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no temporary directory left behind"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    calls["n"] = 0
    with pytest.raises(type(failure)):
        export_checkpoint(tiny_hf_dir, experts=index_path, out=tmp_path / "new", directions=[(DEU, ENG)], progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_source_equal_to_output_is_refused(tiny_hf_dir, index_path):
    with pytest.raises(ExportError, match="is the source checkpoint itself"):
        export_checkpoint(tiny_hf_dir, experts=index_path, out=tiny_hf_dir, directions=[(FRA, DEU)], overwrite=True, progress=False)


# ---- prune = select + export -------------------------------------------------------------------------
def test_prune_equals_select_then_export(tmp_path, tiny_hf_dir, topology, capsys):
    from tests.selection_fixtures import simulated_stats

    stats_path = simulated_stats([f"{a}-{b}" for a in ef.LANGS for b in ef.LANGS if a != b], topology=topology).save(tmp_path / "stats.safetensors")
    flags = ["--stats", str(stats_path), "--ratio", "0.75", "--enc-dec", "1:1"]
    assert main(["select", *flags, "--langs", f"{FRA},{DEU}", "--out", str(tmp_path / "selected.json")]) == 0
    out = tmp_path / "pruned"
    assert main(["prune", *flags, "--model", str(tiny_hf_dir), "--langs", f"{FRA},{DEU}", "--out", str(out), "--dtype", "fp32"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed
    assert (out / "experts.json").read_text() == (tmp_path / "selected.json").read_text()
    by_hand = export_checkpoint(
        tiny_hf_dir,
        experts=tmp_path / "selected.json",
        out=tmp_path / "by_hand",
        directions=parse_directions(langs=[FRA, DEU]),
        dtype=torch.float32,
        progress=False,
    )
    assert (out / "model.safetensors").read_bytes() == (by_hand / "model.safetensors").read_bytes()
    manifest = read_manifest(out)
    selection = manifest["selection"]
    assert selection["command"] == "prune"
    assert selection["statistics"]["sha256"] == __import__("hashlib").sha256(stats_path.read_bytes()).hexdigest()
    assert selection["options"]["ratio"] == 0.75 and selection["options"]["langs"] == [DEU, FRA] and selection["options"]["metric"] == "importance"
    assert manifest["index"]["file"] == "experts.json"
    per_layer = {len(v) for v in manifest["experts"].values()}
    assert min(per_layer) >= 32 and max(per_layer) <= 64  # 384 kept at 1:1 = 32 per layer per language; union of 2


def test_prune_needs_directions_for_per_language_selection(tmp_path, tiny_hf_dir, capsys):
    assert main(["prune", "--model", str(tiny_hf_dir), "--stats", str(tmp_path / "s.safetensors"), "--out", str(tmp_path / "o")]) == 2
    assert "say which directions to export" in capsys.readouterr().err


# ---- plain transformers (trust_remote_code) ------------------------------------------------------------
REMOTE_SCRIPT = """
import json, sys, torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
path, out = sys.argv[1], sys.argv[2]
batch = {k: torch.tensor(v) for k, v in json.loads(sys.argv[3]).items()}
results = {}
for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
    model = AutoModelForSeq2SeqLM.from_pretrained(path, trust_remote_code=True, dtype=dtype)
    routers = {p.dtype for n, p in model.named_parameters() if ".router." in n}
    assert routers == {torch.float32}, routers
    for direction in (("fra_Latn", "deu_Latn"), ("eng_Latn", "fra_Latn"), (None, None)):
        model.set_direction(*direction)
        with torch.no_grad():
            results[f"{name}/{direction[0]}-{direction[1]}"] = model(**batch).logits.float()
    model.set_direction("fra_Latn", "deu_Latn")
    tok = AutoTokenizer.from_pretrained(path)
    results[f"{name}/generate"] = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
        forced_bos_token_id=tok.convert_tokens_to_ids("deu_Latn"), num_beams=2, max_new_tokens=6, do_sample=False)
assert not [m for m in sys.modules if m == "pruning" or m.startswith("pruning.")], "loaded without nllb-prune"
torch.save(results, out)
"""


def test_export_loads_in_plain_transformers_with_the_same_outputs(tmp_path, tiny_hf_dir, index_path, tiny_batch):
    """The modeling file shipped in the export (no nllb-prune import) against load_model, per direction."""
    import os
    import subprocess
    import sys

    out = export_checkpoint(
        tiny_hf_dir, experts=index_path, out=tmp_path / "multi", directions=parse_directions(langs=list(ef.LANGS)), dtype=torch.float32, progress=False
    )
    assert (out / "modeling_nllb_moe_pruned.py").is_file()
    batch = {k: v.tolist() for k, v in tiny_batch.items()}
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(out), str(tmp_path / "remote.pt"), json.dumps(batch)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    remote = torch.load(tmp_path / "remote.pt", weights_only=True)
    for name, dtype in (("fp32", "fp32"), ("bf16", "bf16")):
        ours = load_model(out, dtype=dtype)
        ours.set_dispatch("loop")  # the grouped GEMM accumulates bf16 in another order
        for src, tgt in ((FRA, DEU), (ENG, FRA), (None, None)):
            ours.set_direction(src, tgt)
            expected = logits(ours, tiny_batch).float()
            got = remote[f"{name}/{src}-{tgt}"]
            if dtype == "fp32":
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            else:
                assert torch.equal(got, expected)
        ours.set_direction(FRA, DEU)
        tok = ours.tokenizer
        generated = ours.generate(
            input_ids=tiny_batch["input_ids"],
            attention_mask=tiny_batch["attention_mask"],
            forced_bos_token_id=tok.convert_tokens_to_ids(DEU),
            num_beams=2,
            max_new_tokens=6,
            do_sample=False,
        )
        assert torch.equal(remote[f"{name}/generate"], generated)
