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


def test_convert_hf_to_fairseq_and_back_is_lossless_and_uses_the_release_names(tmp_path, tiny_hf_dir, tiny_fairseq_dir, tiny_batch):
    """The fairseq files we write carry the names the fixture writes by hand (an independent source of truth)."""
    from pruning.checkpoint.torch_zip import read_pickle

    out = tmp_path / "fs"
    assert main(["convert", str(tiny_hf_dir), "--out", str(out), "--layout", "fairseq"]) == 0
    ours = read_pickle(out / "checkpoint-shared.pt")
    theirs = read_pickle(tiny_fairseq_dir / "checkpoint_2_300000-shared.pt")
    skipped = {"encoder.embed_positions._float_tensor", "decoder.embed_positions._float_tensor"}
    assert set(ours["model"]) == set(theirs["model"]) - skipped
    assert set(read_pickle(out / "checkpoint-rank-5.pt")["model"]) == set(read_pickle(tiny_fairseq_dir / "checkpoint_2_300000-rank-5.pt")["model"])
    assert len(list(out.glob("checkpoint-rank-*.pt"))) == 128
    back = tmp_path / "back"
    assert main(["convert", str(out), "--out", str(back), "--dtype", "fp32"]) == 0
    with torch.no_grad():
        assert torch.equal(load_model(back)(**tiny_batch).logits, load_model(tiny_hf_dir)(**tiny_batch).logits)
        assert torch.equal(load_model(out)(**tiny_batch).logits, load_model(tiny_hf_dir)(**tiny_batch).logits)


@pytest.mark.parametrize("model_prefix", [True, False])
def test_hf_bin_shards_load_with_torch_and_with_our_reader(tmp_path, tiny_hf_dir, tiny_batch, model_prefix):
    from pruning.checkpoint.layouts import write_hf_bin
    from pruning.checkpoint.reader import open_checkpoint

    reader = open_checkpoint(tiny_hf_dir)
    out = tmp_path / "bin"
    out.mkdir()
    shards = write_hf_bin(reader, out, max_shard_bytes=reader.total_bytes() // 3, model_prefix=model_prefix, progress=False)
    assert [p.name for p in shards] == [f"pytorch_model-0000{i}-of-0000{len(shards)}.bin" for i in range(1, len(shards) + 1)] and len(shards) >= 3
    index = json.loads((out / "pytorch_model.bin.index.json").read_text())
    first = torch.load(shards[0], weights_only=True, mmap=True)
    assert all(index["weight_map"][name] == shards[0].name for name in first)
    assert ("lm_head.weight" in index["weight_map"]) == model_prefix
    (out / "config.json").write_text((tiny_hf_dir / "config.json").read_text())
    with torch.no_grad():
        assert torch.equal(load_model(out)(**tiny_batch).logits, load_model(tiny_hf_dir)(**tiny_batch).logits)


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
