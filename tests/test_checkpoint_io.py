"""Streaming writers and mapped readers of `pruning.checkpoint`, checked against the formats' own libraries."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pruning.checkpoint.reader import SafetensorsTensor, _hf_file_tensors
from pruning.checkpoint.torch_zip import CheckpointError, read_pickle
from pruning.checkpoint.writer import ShardWriter, TensorSpec


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(300, 70, generator=generator).to(torch.bfloat16),  # 42,000 B
        "a.bias": torch.randn(7, generator=generator).to(torch.bfloat16),  # odd byte count before an fp32 tensor
        "router": torch.randn(5, 70, generator=generator),
        "b.weight": torch.randn(1100, 300, generator=generator),  # 1.3 MB: mapped, not read
        "ids": torch.arange(12, dtype=torch.int64),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }


def _write(directory, tensors, max_bytes):
    writer = ShardWriter(directory, [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()], max_bytes=max_bytes)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    return writer.close()


@pytest.mark.parametrize("max_bytes", [10**9, 50_000, 1])
def test_streamed_shards_read_back_with_the_safetensors_library_and_our_mapped_reader(tmp_path, max_bytes):
    tensors = _tensors()
    shards = _write(tmp_path, tensors, max_bytes)
    expected_count = 1 if max_bytes == 10**9 else (len(tensors) if max_bytes == 1 else len(shards))
    assert len(shards) == expected_count and (len(shards) == 1) == (shards[0].name == "model.safetensors")
    read = {}
    for shard in shards:
        read.update(load_file(str(shard)))  # the format's own reader validates header, offsets and size
        for key, lazy in _hf_file_tensors(shard):
            assert torch.equal(lazy.load(), tensors[key]), key
    assert set(read) == set(tensors) and all(torch.equal(read[k], v) for k, v in tensors.items())
    if len(shards) > 1:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(tensors)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    with safe_open(str(shards[0]), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_writer_refuses_a_tensor_out_of_order_or_of_another_shape(tmp_path):
    writer = ShardWriter(tmp_path, [TensorSpec("x", (2, 3), torch.float32), TensorSpec("y", (4,), torch.float32)])
    with pytest.raises(CheckpointError, match=r"expected x torch.float32 \[2, 3\] next, got y"):
        writer.add("y", torch.zeros(4))
    with pytest.raises(CheckpointError, match=r"expected x torch.float32 \[2, 3\] next, got x torch.float32 \[3, 2\]"):
        writer.add("x", torch.zeros(3, 2))
    writer.add("x", torch.zeros(2, 3))
    with pytest.raises(CheckpointError, match=r"1 announced tensor\(s\) were never written: \['y'\]"):
        writer.close()


def test_mapped_safetensors_tensor_is_a_private_copy_on_write(tmp_path):
    """Writing into a loaded tensor must never reach the file (export transforms may work in place)."""
    tensors = {"big": torch.ones(600, 600)}
    (shard,) = _write(tmp_path, tensors, 10**9)
    before = shard.read_bytes()
    ((_, lazy),) = _hf_file_tensors(shard)
    assert isinstance(lazy, SafetensorsTensor)
    loaded = lazy.load()
    loaded.mul_(3)
    assert shard.read_bytes() == before and torch.equal(lazy.load(), tensors["big"])


def test_truncated_safetensors_tensor_is_a_clear_error(tmp_path):
    (shard,) = _write(tmp_path, {"big": torch.ones(600, 600)}, 10**9)
    ((_, lazy),) = _hf_file_tensors(shard)
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size - 100)
    with pytest.raises(CheckpointError, match="ends past the end of the file"):
        lazy.load()


def test_torch_save_tensors_load_mapped_and_equal(tmp_path):
    tensors = {"w": torch.randn(700, 500), "b": torch.randn(3).to(torch.float16), "view": torch.arange(20.0)[5:15]}
    path = tmp_path / "x.pt"
    torch.save({"model": tensors, "other": {"note": 1}}, path)
    state = read_pickle(path)["model"]
    for name, tensor in tensors.items():
        assert torch.equal(state[name].load(), tensor), name


@pytest.mark.parametrize("zip64_from", [2**31, 1])
def test_streamed_torch_zip_loads_with_torch_mapped_and_with_our_reader(tmp_path, monkeypatch, zip64_from):
    from pruning.checkpoint import torch_zip
    from pruning.checkpoint.torch_zip import TensorPlaceholder, TorchZipWriter

    monkeypatch.setattr(torch_zip, "_ZIP64_RECORD_BYTES", zip64_from)
    tensors = _tensors()
    holders = {n: TensorPlaceholder(n, tuple(t.shape), t.dtype) for n, t in tensors.items()}
    path = tmp_path / "x.pt"
    writer = TorchZipWriter(path, {"model": {**holders, "tied": holders["a.weight"]}, "cfg": {"heads": 4}, "none": None})
    assert [h.name for h in writer.order] == list(tensors)
    for holder in writer.order:
        writer.add(tensors[holder.name])
    writer.close()
    for mmap in (False, True):
        loaded = torch.load(path, weights_only=True, mmap=mmap)
        assert all(torch.equal(loaded["model"][n], t) for n, t in tensors.items()) and loaded["cfg"] == {"heads": 4}
        assert torch.equal(loaded["model"]["tied"], tensors["a.weight"])
    state = read_pickle(path)["model"]
    assert all(torch.equal(state[n].load(), tensors.get(n, tensors["a.weight"])) for n in state)
