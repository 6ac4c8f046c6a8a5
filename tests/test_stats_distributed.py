"""Statistics with expert parallelism under torchrun (4 gloo processes on CPU) equal the single-process ones.

One torchrun launch runs two collections through the real ``nllb-prune stats`` path:
- teacher forcing, ``--expert-parallel 4``, per-expert loop dispatch, ``--expert-outputs``: one model
  spread over 4 processes, the expert outputs observed where they come back from their owners;
- beam search, ``--expert-parallel 2`` x 2 data-parallel groups, 3 directions (the last round leaves a
  group idle, which must keep stepping with the others), the default dispatch (grouped GEMM on CPU),
  ``--chunk-sentences 2`` (5 sentences: chunks of 2, 2 and 1, each summed over the ranks that ran its batches);
then one padded batch per rank through the expert-parallel model, compared with the full model.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pruning.model.loading import load_model
from pruning.stats.collect import collect_statistics
from pruning.stats.counters import RoutingStats
from pruning.stats.options import StatsOptions
from pruning.stats.outputs import ALL_OUTPUT_COUNTERS
from tests.stats_fixtures import LANGS, assert_counters_close, make_flores

FRA, DEU, ENG = LANGS
ROOT = Path(__file__).resolve().parents[1]
WORLD = 4


def teacher_flags(model: Path, data: Path, out: Path) -> list[str]:
    return ["--model", str(model), "--data", str(data), "--langs", ",".join(LANGS), "--batch-tokens", "40", "--out", str(out), "--no-progress"]


def beam_flags(model: Path, data: Path, out: Path) -> list[str]:
    return [
        "--model",
        str(model),
        "--data",
        str(data),
        "--pairs",
        f"{FRA}-{DEU},{ENG}-{FRA},{DEU}-{ENG}",
        "--mode",
        "beam",
        "--beam",
        "2",
        "--max-new-tokens",
        "5",
        "--batch-tokens",
        "30",
        "--max-sentences",
        "5",
        "--chunk-sentences",
        "2",
        "--out",
        str(out),
        "--no-progress",
    ]


@pytest.fixture(scope="module")
def launched(tiny_hf_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    data = make_flores(tmp / "flores", n=6)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={WORLD}",
        "-m",
        "tests.dist_worker",
        "--model",
        str(tiny_hf_dir),
        "--logits",
        str(tmp / "logits"),
        "--",
        *teacher_flags(tiny_hf_dir, data, tmp / "teacher-ep4.safetensors"),
        "--expert-parallel",
        "4",
        "--dispatch",
        "loop",
        "--expert-outputs",
        "---",
        *beam_flags(tiny_hf_dir, data, tmp / "beam-ep2dp2.safetensors"),
        "--expert-parallel",
        "2",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return tmp, data


@pytest.mark.slow
def test_expert_parallel_teacher_statistics_equal_single_process(launched, tiny_hf_dir):
    tmp, data = launched
    single = tmp / "teacher-single.safetensors"
    collect_statistics(
        StatsOptions(
            model=str(tiny_hf_dir), data=str(data), langs=list(LANGS), batch_tokens=40, dispatch="loop", out=str(single), progress=False, expert_outputs=True
        )
    )
    parallel, reference = RoutingStats.load(tmp / "teacher-ep4.safetensors"), RoutingStats.load(single)
    assert parallel.directions == reference.directions and len(reference.directions) == 6
    for direction in reference.directions:
        for side in ("enc", "dec"):
            # same batches, same expert GEMM shapes: identical up to the order of the float64 sums
            assert_counters_close(
                parallel.side(direction, side), reference.side(direction, side), what=f"{direction}/{side}", rtol=1e-12, atol=1e-12, rank_atol=0
            )
            got, expected = parallel.side(direction, side), reference.side(direction, side)
            assert set(ALL_OUTPUT_COUNTERS) <= set(got)
            for name in ALL_OUTPUT_COUNTERS:  # one process runs the experts a second time, here they come back from their owners
                torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-6, msg=f"{direction}/{side}/{name}")
            assert float(got["out_norm"].sum()) > 0
    assert parallel.info["processes"] == {"expert_parallel": 4, "data_parallel": 1}
    assert parallel.info["sentences"] == reference.info["sentences"]
    assert parallel.info["model"]["router_fingerprint"] == reference.info["model"]["router_fingerprint"]


@pytest.mark.slow
def test_expert_and_data_parallel_beam_statistics_equal_single_process(launched, tiny_hf_dir):
    tmp, data = launched
    single = tmp / "beam-single.safetensors"
    pairs = [f"{FRA}-{DEU}", f"{ENG}-{FRA}", f"{DEU}-{ENG}"]
    collect_statistics(
        StatsOptions(
            model=str(tiny_hf_dir),
            data=str(data),
            pairs=pairs,
            mode="beam",
            beam=2,
            max_new_tokens=5,
            batch_tokens=30,
            max_sentences=5,
            chunk_sentences=2,
            out=str(single),
            progress=False,
        )
    )
    parallel, reference = RoutingStats.load(tmp / "beam-ep2dp2.safetensors"), RoutingStats.load(single)
    assert parallel.directions == sorted(pairs)
    for direction in pairs:
        for side in ("enc", "dec"):
            assert_counters_close(
                parallel.side(direction, side), reference.side(direction, side), what=f"{direction}/{side}", rtol=1e-12, atol=1e-12, rank_atol=0
            )
            for chunk in range(3):
                got = {name: value[chunk] for name, value in parallel.chunks[direction].counters[side].items()}
                expected = {name: value[chunk] for name, value in reference.chunks[direction].counters[side].items()}
                assert_counters_close(got, expected, what=f"{direction}/{side}/chunk {chunk}", rtol=1e-12, atol=1e-12, rank_atol=0)
        assert parallel.chunks[direction].ids.tolist() == [0, 1, 2] and parallel.chunks[direction].sentences.tolist() == [2, 2, 1]
    assert parallel.info["processes"] == {"expert_parallel": 2, "data_parallel": 2}
    assert parallel.info["sentences"] == {d: 5 for d in pairs}


@pytest.mark.slow
def test_expert_parallel_outputs_equal_the_full_model(launched, tiny_hf_dir):
    tmp, _ = launched
    full = load_model(tiny_hf_dir)
    experts = full.topology.num_experts
    for rank in range(WORLD):
        saved = torch.load(tmp / "logits" / f"rank{rank}.pt", weights_only=True)
        assert set(saved["held"].values()) == {experts // WORLD}, "each rank holds a quarter of every layer's experts"
        with torch.no_grad():
            expected = full(**saved["inputs"], use_cache=False).logits
        # same dispatch (auto), the same rows and GEMM shapes per expert: bitwise equal, not just close
        assert torch.equal(saved["logits"], expected), f"rank {rank}: max diff {float((saved['logits'] - expected).abs().max()):.3g}"
