"""Both checkpoint layouts load to the same model; bad input fails clearly and executes nothing."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from pruning import load_model
from pruning.checkpoint import torch_zip
from pruning.checkpoint.reader import open_checkpoint
from pruning.checkpoint.torch_zip import CheckpointError
from tests import fixtures


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module")
def reference_logits(tiny_model, tiny_batch):
    return logits(tiny_model, tiny_batch)


def test_hf_sharded_safetensors_loads_exactly(tiny_hf_dir, tiny_batch, reference_logits):
    model = load_model(tiny_hf_dir)
    assert model.source_layout == "hf"
    assert torch.equal(logits(model, tiny_batch), reference_logits)
    assert model.tokenizer is not None and model.tokenizer.convert_tokens_to_ids("fra_Latn") != model.tokenizer.unk_token_id


def test_fairseq_layout_gives_identical_logits(tiny_fairseq_dir, tiny_batch, reference_logits):
    model = load_model(tiny_fairseq_dir)
    assert model.source_layout == "fairseq"
    assert model.config.encoder_attention_heads == 2  # read from the pickled cfg, without importing it
    assert torch.equal(logits(model, tiny_batch), reference_logits)
    shared = next(tiny_fairseq_dir.glob("*-shared.pt"))
    assert torch.equal(logits(load_model(shared), tiny_batch), reference_logits)


@pytest.mark.parametrize("fmt, shards, prefix", [("bin", 1, True), ("bin", 4, False), ("safetensors", 1, True)])
def test_hf_variants(tmp_path, tiny_model, tiny_batch, reference_logits, fmt, shards, prefix):
    directory = fixtures.write_hf(tiny_model, tmp_path / "m", fmt=fmt, shards=shards, model_prefix=prefix)
    assert torch.equal(logits(load_model(directory), tiny_batch), reference_logits)


def test_fairseq_with_replica_rank_files_reads_only_the_first_copy(tmp_path, tiny_model, tiny_batch, reference_logits, monkeypatch):
    directory = fixtures.write_fairseq(tiny_model, tmp_path / "fs", replicas=True)
    assert len(list(directory.glob("*-rank-*.pt"))) == 2 * tiny_model.config.num_experts
    reader = open_checkpoint(directory)
    assert all(int(f.name.rsplit("-", 1)[1][:-3]) < tiny_model.config.num_experts for f in reader.files[1:])
    assert torch.equal(logits(load_model(directory), tiny_batch), reference_logits)


def test_optimizer_state_and_pruned_experts_are_never_read(tiny_fairseq_dir, monkeypatch):
    loaded: list[str] = []
    original = torch_zip.LazyTensor.load

    def spy(self):
        loaded.append(f"{self.path.name}:{self.storage.key}")
        return original(self)

    monkeypatch.setattr(torch_zip.LazyTensor, "load", spy)
    topology = open_checkpoint(tiny_fairseq_dir).topology
    keep = {(side, layer): [0, 5, 77] for _, side, layer in topology.iter_moe_layers()}
    load_model(tiny_fairseq_dir, experts=keep)
    rank_files = {name.split(":")[0] for name in loaded if "-rank-" in name}
    assert rank_files == {f"checkpoint_2_300000-rank-{r}.pt" for r in (0, 5, 77)}
    shared_reads = [n for n in loaded if "-shared.pt" in n]
    n_model_tensors = len(open_checkpoint(tiny_fairseq_dir).names()) - topology.num_total_experts * 4
    assert len(shared_reads) == n_model_tensors  # no optimizer state, no tied duplicates


def test_subset_model_equals_full_model_routing_over_the_subset(tiny_hf_dir, tiny_batch):
    full = load_model(tiny_hf_dir)
    keep = {}
    for side, layer, moe in full.moe_layers():
        chosen = sorted(torch.randperm(128, generator=torch.Generator().manual_seed(layer + (side == "decoder") * 100))[:9].tolist())
        keep[(side, layer)] = chosen
        moe.router.active = torch.zeros(128, dtype=torch.bool)
        moe.router.active[chosen] = True
    subset = load_model(tiny_hf_dir, experts=keep)
    assert sum(p.numel() for p in subset.parameters()) < sum(p.numel() for p in full.parameters())
    torch.testing.assert_close(logits(subset, tiny_batch), logits(full, tiny_batch), rtol=1e-5, atol=1e-5)


def test_generate_runs_with_beam_search(tiny_hf_dir, tiny_tokenizer):
    model = load_model(tiny_hf_dir)
    tok = model.tokenizer
    tok.src_lang = "fra_Latn"
    batch = tok(fixtures.sentences(2, seed=5), return_tensors="pt", padding=True)
    out = model.generate(**batch, forced_bos_token_id=tok.convert_tokens_to_ids("deu_Latn"), num_beams=3, max_new_tokens=5)
    assert out.shape[0] == 2 and (out[:, 1] == tok.convert_tokens_to_ids("deu_Latn")).all()


def test_bf16_load_keeps_routers_fp32(tiny_hf_dir):
    model = load_model(tiny_hf_dir, dtype="bf16")
    for _, _, moe in model.moe_layers():
        assert moe.router.weight.dtype == torch.float32
        assert moe.experts.fc1_weight.dtype == torch.bfloat16
    assert model.model.shared.weight.dtype == torch.bfloat16


# ---- bad input ----------------------------------------------------------------------------------
def test_missing_rank_file(tmp_path, tiny_fairseq_dir):
    directory = tmp_path / "fs"
    shutil.copytree(tiny_fairseq_dir, directory)
    (directory / "checkpoint_2_300000-rank-57.pt").unlink()
    with pytest.raises(CheckpointError, match=r"missing rank file\(s\) \['checkpoint_2_300000-rank-57.pt'\]"):
        load_model(directory)


def test_truncated_safetensors_shard(tmp_path, tiny_hf_dir):
    directory = tmp_path / "hf"
    shutil.copytree(tiny_hf_dir, directory)
    shard = sorted(directory.glob("model-*.safetensors"))[1]
    fixtures.truncate(shard)
    with pytest.raises(CheckpointError, match=shard.name):
        load_model(directory)


def test_truncated_rank_file(tmp_path, tiny_fairseq_dir):
    directory = tmp_path / "fs"
    shutil.copytree(tiny_fairseq_dir, directory)
    fixtures.truncate(directory / "checkpoint_2_300000-rank-3.pt", 0.6)
    with pytest.raises(CheckpointError, match="rank-3.pt"):
        load_model(directory)


def test_missing_shard_named_in_index(tmp_path, tiny_hf_dir):
    directory = tmp_path / "hf"
    shutil.copytree(tiny_hf_dir, directory)
    victim = sorted(directory.glob("model-*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load_model(directory)


def test_shape_mismatch_names_file_and_key(tmp_path, tiny_hf_dir):
    directory = tmp_path / "hf"
    shutil.copytree(tiny_hf_dir, directory)
    config = json.loads((directory / "config.json").read_text())
    config["encoder_ffn_dim"] = config["decoder_ffn_dim"] = 48
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError,
        match=r"do not match the config: model-\d+-of-\d+\.safetensors:decoder\.layers\.0\.ffn\.fc1\.bias has shape \(32,\), config expects \(48,\)",
    ):
        load_model(directory)


def test_topology_mismatch(tmp_path, tiny_hf_dir):
    directory = tmp_path / "hf"
    shutil.copytree(tiny_hf_dir, directory)
    config = json.loads((directory / "config.json").read_text())
    config["encoder_sparse_step"] = 2
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="missing for the model in config"):
        load_model(directory)


def test_unknown_layout(tmp_path):
    (tmp_path / "weights.pt").write_bytes(b"nothing")
    with pytest.raises(CheckpointError, match="unknown checkpoint layout"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="unknown checkpoint layout"):
        load_model(tmp_path / "weights.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('PAYLOAD_MARK', '/tmp/nllb-prune-pwned')}",))


def test_pickle_that_runs_code_is_never_executed(tmp_path, tiny_fairseq_dir, monkeypatch):
    mark = tmp_path / "pwned"
    monkeypatch.setenv("PAYLOAD_MARK", str(mark))
    directory = tmp_path / "fs"
    shutil.copytree(tiny_fairseq_dir, directory)
    shared = directory / "checkpoint_2_300000-shared.pt"
    obj = torch.load(shared, weights_only=False)  # our own fixture, trusted
    obj["extra_state"] = Payload()
    obj["model"]["evil"] = Payload()
    torch.save(obj, shared)
    with pytest.raises(CheckpointError, match="evil"):
        load_model(directory)  # the payload is an unknown non-tensor entry: ignored, never called
    assert not mark.exists()
    obj["model"].pop("evil")
    torch.save(obj, shared)
    load_model(directory)
    assert not mark.exists()
