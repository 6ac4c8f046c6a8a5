"""`nllb-prune plan`: memory sizes, the NLLB-200 figures the docs quote, and agreement with measured peaks.

The measured check generates a small rehearsal model (the real vocabulary and expert count, d_model 512)
with the full-width generator, then runs ``load_model`` and teacher-forced ``stats`` in processes of
their own and compares their peak anonymous memory with the plan's (within 10%).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pruning.cli import main
from pruning.plan import GIB, Hardware, PlanError, Workload, build_plan, kept_from_ratio, parse_memory, resolve_topology
from pruning.topology import NLLB_MOE_54B

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "text, expected",
    [("32GB", 32 * GIB), ("24 GiB", 24 * GIB), ("80G", 80 * GIB), ("512MB", 512 * 2**20), ("1.5T", int(1.5 * 2**40)), ("16", 16 * GIB)],
)
def test_memory_sizes_are_read_as_gpus_are_labelled(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "32 gigs", "-4GB", "0GB", "GB"])
def test_bad_memory_sizes_name_the_flag(text):
    with pytest.raises(PlanError, match="--gpu-mem must be"):
        parse_memory(text)


def _plan(gpus: int, memory: str, dtype: str, **workload):
    topology = NLLB_MOE_54B
    return build_plan(topology, Hardware(gpus, parse_memory(memory)), Workload(dtype=dtype, **workload), kept_from_ratio(topology, 0.8, "3:1"))


def test_nllb_200_statistics_need_four_32gb_gpus_in_fp16():
    """The reference page: the full model needs about four 32 GB GPUs."""
    plan = _plan(4, "32GB", "fp16", batch_tokens=4096)
    assert plan["statistics"]["expert_parallel"] == 4 and plan["statistics"]["fits"]
    assert _plan(3, "32GB", "fp16")["statistics"]["devices_needed"] == 4
    assert not _plan(3, "32GB", "fp16")["statistics"]["fits"]
    assert 100 * GIB < plan["full_model_bytes"] < 103 * GIB  # 54.5B parameters in 16 bits


def test_the_papers_pruned_model_fits_one_32gb_gpu_not_24gb():
    """288 of 1,536 experts: ~12.6B parameters, ~25 GB in bf16 (the paper)."""
    fits = _plan(1, "32GB", "bf16", batch=16, beam=4)["translation_one_direction"]
    assert fits["fits"] and 23 * GIB < fits["weights_bytes"] < 24.5 * GIB and fits["largest_batch"] >= 16
    small = _plan(1, "24GB", "bf16", batch=16, beam=4)["translation_one_direction"]
    assert not small["fits"] and "weights do not fit even for one sentence: prune more experts: `select --budget-gb" in small["notes"][0]


def test_largest_batch_is_the_boundary(tmp_path):
    plan = _plan(1, "32GB", "bf16", batch=16, beam=4)["translation_one_direction"]
    largest = plan["largest_batch"]
    assert _plan(1, "32GB", "bf16", batch=largest, beam=4)["translation_one_direction"]["fits"]
    assert not _plan(1, "32GB", "bf16", batch=largest + 1, beam=4)["translation_one_direction"]["fits"]


def test_plan_cli_json_and_exact_selection(tmp_path, capsys, tiny_hf_dir):
    """With an index the export is sized from its experts: the union of a multi-direction export is larger."""
    from tests import export_fixtures as ef

    topology = resolve_topology(str(tiny_hf_dir))
    index = ef.write_lang_index(tmp_path / "experts.json", topology)
    fra, deu, eng = ef.LANGS
    assert main(["plan", "--model", str(tiny_hf_dir), "--gpu-mem", "1GB", "--experts", str(index), "--langs", f"{fra},{deu},{eng}", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    one, union = plan["translation_one_direction"], plan["translation_multi_direction"]
    assert union["weights_bytes"] > one["weights_bytes"]
    assert main(["plan", "--model", "nllb-moe-54b", "--gpus", "4", "--gpu-mem", "32GB", "--dtype", "fp16"]) == 0
    text = capsys.readouterr().out
    assert "statistics, --expert-parallel 4" in text and "fits" in text


# ---- the plan against measured peaks -------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_rehearsal(tmp_path_factory) -> Path:
    from experiments.fullwidth.generate import RehearsalConfig, generate

    out = tmp_path_factory.mktemp("rehearsal") / "hf"
    # d_model 512: the weights (1.4 GB) outweigh the process's own ~0.2-0.3 GB, which varies from run to run
    generate(RehearsalConfig(out=str(out), layout="hf", dtype="bf16", d_model=512, ffn_dim=2048, heads=8), progress=False)
    return out


def _cpu_plan(model: Path, **workload) -> dict:
    topology = resolve_topology(str(model))
    kept = kept_from_ratio(topology, 0.0, "none")  # no pruning: the model as it is
    return build_plan(topology, Hardware(1, 24 * GIB, "cpu"), Workload(dtype="bf16", **workload), kept)


@pytest.mark.slow
def test_plan_agrees_with_measured_load_and_statistics_peaks(small_rehearsal, tmp_path):
    from experiments.fullwidth.measure import measure

    python = [sys.executable, "-m"]
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    loaded = measure([*python, "experiments.fullwidth.probe", "load", str(small_rehearsal)], env=env, drop_cache=False)
    assert loaded.returncode == 0
    stats = measure(
        [
            *python,
            "pruning",
            "stats",
            "--model",
            str(small_rehearsal),
            "--data",
            str(ROOT / "experiments/testbed/data/flores"),
            "--split",
            "dev",
            "--langs",
            "qen_Latn,qbr_Cyrl",
            "--max-sentences",
            "8",
            "--out",
            str(tmp_path / "s.safetensors"),
            "--no-progress",
        ],
        env=env,
        drop_cache=False,
    )
    assert stats.returncode == 0, stats.output_tail
    plan = _cpu_plan(small_rehearsal, batch_tokens=512)
    planned_load = plan["translation_full_model"]["weights_bytes"] + plan["translation_full_model"]["bytes"]["runtime"]
    planned_stats = plan["statistics"]["total_bytes"]
    print(
        f"load: planned {planned_load / 1e9:.3f} GB, measured {loaded.peak_rss_anon_bytes / 1e9:.3f} GB; "
        f"stats: planned {planned_stats / 1e9:.3f} GB, measured {stats.peak_rss_anon_bytes / 1e9:.3f} GB"
    )
    assert abs(planned_load - loaded.peak_rss_anon_bytes) <= 0.10 * loaded.peak_rss_anon_bytes
    assert abs(planned_stats - stats.peak_rss_anon_bytes) <= 0.10 * stats.peak_rss_anon_bytes
