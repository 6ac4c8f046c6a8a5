"""`nllb-prune convert` and `nllb-prune info` end to end on the tiny real-topology fixture."""

from __future__ import annotations

import json

import pytest
import torch

from pruning import load_model
from pruning.cli import main


def test_convert_fairseq_to_hf_bf16_and_load(tmp_path, tiny_fairseq_dir, tiny_batch, capsys):
    out = tmp_path / "converted"
    assert main(["convert", str(tiny_fairseq_dir), "--out", str(out), "--dtype", "bf16", "--shard-gb", "0.0005"]) == 0
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    assert (out / "tokenizer_config.json").is_file() and (out / "sentencepiece.bpe.model").is_file()
    converted = load_model(out)
    original = load_model(tiny_fairseq_dir, dtype="bf16")
    assert converted.model.shared.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(converted(**tiny_batch).logits, original(**tiny_batch).logits)
    assert not list(tmp_path.glob(".converted*")), "no temporary directory left behind"


def test_convert_refuses_existing_output(tmp_path, tiny_hf_dir, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    assert main(["convert", str(tiny_hf_dir), "--out", str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main(["convert", str(tiny_hf_dir), "--out", str(out), "--overwrite"]) == 0
    assert (out / "config.json").is_file()


def test_convert_interrupted_leaves_nothing(tmp_path, tiny_hf_dir, monkeypatch):
    from pruning.checkpoint import writer

    calls = {"n": 0}
    original = writer.ShardWriter.add

    def failing_add(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 50:
            raise OSError(28, "No space left on device")
        return original(self, name, tensor)

    monkeypatch.setattr(writer.ShardWriter, "add", failing_add)
    with pytest.raises(OSError):
        main(["convert", str(tiny_hf_dir), "--out", str(tmp_path / "out")])
    assert list(tmp_path.iterdir()) == []


def test_info_reports_topology_and_counts(tiny_fairseq_dir, tiny_model, capsys):
    assert main(["info", str(tiny_fairseq_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "fairseq"
    assert info["moe_layers"] == {"encoder": [3, 7, 11, 15, 19, 23], "decoder": [3, 7, 11, 15, 19, 23]}
    assert info["experts_kept"] == 1536
    n_params = sum(p.numel() for p in tiny_model.parameters())
    assert info["params"]["total"] == n_params
    topology = tiny_model.topology
    assert info["params"]["experts"] == topology.num_total_experts * topology.expert_params
    assert info["params"]["dense"] == topology.dense_params()
    assert main(["info", str(tiny_fairseq_dir)]) == 0
    assert "1536 of 1536 held" in capsys.readouterr().out


def test_bad_path_is_a_clear_cli_error(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
