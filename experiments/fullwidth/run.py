"""The full-width rehearsal: every step of the toolkit on NLLB-200's real shapes, measured (``make rehearsal``).

    python -m experiments.fullwidth.run --work /work/rehearsal            # full width (~60 GB disk at peak)
    python -m experiments.fullwidth.run --work /tmp/rehearsal-small --small --results /tmp/small.json

Steps, each a separate command measured by :mod:`experiments.fullwidth.measure` (wall time, peak
anonymous RSS of the whole process tree, bytes read from disk with the page cache dropped before):

1. generate the HF ``pytorch_model-*.bin`` layout (fp16, 10 GB shards), ``info`` on it;
2. ``convert`` it to safetensors bf16 (HF -> HF, dtype change), then delete it;
3. ``stats`` (teacher forcing) in one process, and under ``torchrun --nproc-per-node 2 --expert-parallel 2``;
4. ``select`` at the paper's 80% (importance, per layer, 3:1, per language);
5. ``export`` one direction with ``--policy drop`` and ``--policy skip``; ``load_model`` of the drop export;
   ``translate`` and ``evaluate`` a few sentences with it; ``stats --dtype fp16`` and an fp16 forward /
   generation check (finite logits and counters, routers in fp32);
6. ``convert`` safetensors -> fairseq (fp16), ``info`` and ``export`` from it; delete it;
7. generate the fairseq layout directly (omegaconf ``cfg``, 1 GB optimizer state), ``info``, ``convert``
   fairseq -> safetensors; delete everything.

Each step also records the bound it must meet (the issue's targets) and whether it did. Results go to
``--results`` (JSON) and the markdown table beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

from experiments.fullwidth.measure import Measurement, gb, measure

RESULTS = Path(__file__).resolve().parents[1] / "results"
LANGS = ("qen_Latn", "qbr_Cyrl")
SRC, TGT = LANGS
PY = sys.executable


def cli(*args: str) -> list[str]:
    return [PY, "-m", "pruning", *args]


def largest_tensor_bytes(model: Path) -> int:
    from pruning.checkpoint.reader import open_checkpoint

    reader = open_checkpoint(model)
    return max(int(getattr(e.tensor, "nbytes", 0)) or _nbytes(e.tensor) for e in reader.entries())


def _nbytes(tensor: Any) -> int:
    n = tensor.dtype.itemsize
    for s in tensor.shape:
        n *= s
    return n


def checkpoint_bytes(model: Path, *, experts: Optional[dict] = None) -> int:
    """Bytes of the tensors a load reads: every tensor, or only the kept experts."""
    from pruning.checkpoint import keymap
    from pruning.checkpoint.reader import open_checkpoint

    total = 0
    for entry in open_checkpoint(model).entries():
        key = keymap.parse_expert_key(entry.name)
        if key is not None and experts is not None and key.expert not in experts.get((key.side, key.layer), ()):
            continue
        total += _nbytes(entry.tensor)
    return total


class Rehearsal:
    """Runs and records the steps; with ``resume`` a step already recorded in ``work/steps.json`` is not run again."""

    def __init__(self, work: Path, *, small: bool, threads: int, resume: bool = False):
        self.work = work
        self.small = small
        self.record = work / "steps.json"
        self.steps: list[dict[str, Any]] = json.loads(self.record.read_text()) if resume and self.record.is_file() else []
        self.env = {"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.baseline_read = 0

    def run(self, name: str, argv: list[str], *, bound: Optional[tuple[str, float]] = None, check: Callable[[Measurement], dict] | None = None) -> Measurement:
        done = next((step for step in self.steps if step["step"] == name), None)
        if done is not None:
            print(f"== {name}: recorded in {self.record}, not run again", flush=True)
            return Measurement(**{k: v for k, v in done.items() if k in Measurement.__dataclass_fields__})
        print(f"== {name}: {' '.join(argv)}", flush=True)
        result = measure(argv, env=self.env, log=self.logs / f"{len(self.steps):02d}-{name}.log")
        record: dict[str, Any] = {"step": name, **result.to_dict()}
        record.pop("output_tail")
        if bound is not None:
            what, limit = bound
            record["bound"] = {"what": what, "bytes": int(limit), "met": result.peak_rss_anon_bytes <= limit}
        if check is not None and result.returncode == 0:
            record.update(check(result))
        self.steps.append(record)
        if result.returncode == 0:
            self.record.write_text(json.dumps(self.steps, indent=1) + "\n")
        status = "ok" if result.returncode == 0 else f"FAILED rc={result.returncode}"
        print(
            f"   {status}: {result.wall_s:.1f} s, peak RssAnon {gb(result.peak_rss_anon_bytes)} GB, read {gb(result.read_bytes)} GB"
            + (f", bound {gb(record['bound']['bytes'])} GB {'met' if record['bound']['met'] else 'MISSED'}" if bound else ""),
            flush=True,
        )
        if result.returncode != 0:
            print(result.output_tail, flush=True)
            raise SystemExit(f"step {name} failed; log: {self.logs}")
        return result


def generator_args(small: bool) -> list[str]:
    return ["--d-model", "256", "--ffn-dim", "1024", "--heads", "4", "--shard-gb", "0.1", "--optimizer-gb", "0.05"] if small else []


def rehearse(work: Path, *, small: bool, threads: int, sentences: int, resume: bool = False) -> dict[str, Any]:
    from pruning.checkpoint.reader import open_checkpoint

    r = Rehearsal(work, small=small, threads=threads, resume=resume)
    gen = [PY, "-m", "experiments.fullwidth.generate", *generator_args(small)]
    one_gb = 1e9
    bin_dir, hf, fs_conv, fs_gen, back = (work / n for n in ("hf-bin", "hf", "fairseq-converted", "fairseq", "hf-from-fairseq"))
    recorded = {step["step"] for step in r.steps}
    for d in (bin_dir, hf, fs_conv, fs_gen, back):
        if not resume or not any(str(d.name) in name for name in recorded):
            shutil.rmtree(d, ignore_errors=True)

    # 0. what starting a command costs: the imports' RssAnon and the library bytes read (the cache is dropped)
    baseline = r.run(
        "baseline: start python, import the toolkit",
        [
            PY,
            "-c",
            "import torch, transformers, safetensors, sacrebleu; import pruning.cli; "
            "pruning.cli.build_parser(); from pruning.model.loading import load_model; from transformers import NllbMoeForConditionalGeneration",
        ],
    )
    r.baseline_read = baseline.read_bytes  # type: ignore[attr-defined]

    # 1-2. the HF .bin layout, info, convert to safetensors bf16
    r.run("generate hf-bin fp16", [*gen, "--out", str(bin_dir), "--layout", "hf-bin", "--dtype", "fp16"])
    largest_fp16 = largest_tensor_bytes(bin_dir if bin_dir.exists() else hf)  # 16-bit either way
    r.run("info (hf-bin)", cli("info", str(bin_dir)), bound=("1 GB", one_gb))
    r.run(
        "convert hf-bin fp16 -> safetensors bf16",
        cli("convert", str(bin_dir), "--out", str(hf), "--dtype", "bf16"),
        bound=("2 x largest tensor + 1 GB", 2 * largest_fp16 + one_gb),
    )
    shutil.rmtree(bin_dir, ignore_errors=True)
    reader = open_checkpoint(hf)
    weights = reader.total_bytes()
    largest = largest_tensor_bytes(hf)

    # 3. statistics
    stats1, stats2 = work / "stats-1proc.safetensors", work / "stats-ep2.safetensors"
    for f, step in ((stats1, "stats teacher, 1 process"), (stats2, "stats teacher, torchrun 2 x expert-parallel 2 (gloo)")):
        if step not in recorded:
            f.unlink(missing_ok=True)
    data = ["--data", "experiments/testbed/data/flores", "--split", "dev", "--langs", ",".join(LANGS), "--max-sentences", str(sentences)]
    r.run(
        "stats teacher, 1 process",
        cli("stats", "--model", str(hf), *data, "--out", str(stats1), "--no-progress"),
        bound=("1.05 x weights + 1 GB", 1.05 * weights + one_gb),
    )
    r.run(
        "stats teacher, torchrun 2 x expert-parallel 2 (gloo)",
        [
            PY,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "pruning",
            "stats",
            "--model",
            str(hf),
            *data,
            "--out",
            str(stats2),
            "--expert-parallel",
            "2",
            "--no-progress",
        ],
        bound=("1.05 x weights + 2 x dense + 2 GB", 1.05 * weights + 2 * dense_bytes(hf) + 2 * one_gb),
        check=lambda m: {"counters_equal_one_process": stats_agree(stats1, stats2)},
    )

    routing = routing_summary(stats1)

    # 4. selection at the paper's 80%
    experts = work / "experts.json"
    r.run(
        "select 80% (importance, per layer, 3:1, per language)",
        cli(
            "select",
            "--stats",
            str(stats1),
            "--metric",
            "importance",
            "--strategy",
            "per-layer",
            "--ratio",
            "0.8",
            "--enc-dec",
            "3:1",
            "--granularity",
            "lang",
            "--out",
            str(experts),
        ),
        bound=("1 GB", one_gb),
    )

    # 5. exports, load, translate, evaluate
    kept = kept_experts(experts, reader.topology)
    for policy in ("drop", "skip"):
        out = work / f"pruned-{policy}"
        shutil.rmtree(out, ignore_errors=True)
        r.run(
            f"export --policy {policy} ({SRC}-{TGT})",
            cli("export", "--model", str(hf), "--experts", str(experts), "--src", SRC, "--tgt", TGT, "--out", str(out), "--policy", policy),
            bound=("2 x largest tensor + 1 GB", 2 * largest + one_gb),
            check=lambda m, out=out: {
                "reads_no_pruned_expert": m.read_bytes - r.baseline_read <= checkpoint_bytes(hf, experts=kept) * 1.05,
                "bytes_of_kept_tensors": checkpoint_bytes(hf, experts=kept),
                "export_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
            },
        )
    pruned = work / "pruned-drop"
    pruned_weights = checkpoint_bytes(pruned)
    r.run(
        "load_model (drop export)",
        [PY, "-m", "experiments.fullwidth.probe", "load", str(pruned)],
        bound=("1.05 x loaded weights + 1 GB", 1.05 * pruned_weights + one_gb),
    )
    source_text = work / "source.txt"
    from pruning.data.flores import FloresDir

    source_text.write_text("\n".join(FloresDir("experiments/testbed/data/flores").read(SRC, "devtest")[:8]) + "\n")
    r.run(
        "translate 8 sentences (beam 4)",
        cli(
            "translate",
            "--model",
            str(pruned),
            "--src",
            SRC,
            "--tgt",
            TGT,
            "--input",
            str(source_text),
            "--output",
            str(work / "out.txt"),
            "--beam",
            "4",
            "--max-length",
            "24",
        ),
        bound=("1.05 x loaded weights + 1 GB", 1.05 * pruned_weights + one_gb),
    )
    r.run(
        "evaluate 8 sentences (greedy)",
        cli(
            "evaluate",
            "--model",
            str(pruned),
            "--data",
            "experiments/testbed/data/flores",
            "--split",
            "devtest",
            "--pairs",
            f"{SRC}-{TGT}",
            "--max-sentences",
            "8",
            "--beam",
            "1",
            "--max-length",
            "24",
            "--spm",
            "none",
            "--out",
            str(work / "scores.tsv"),
        ),
        bound=("1.05 x loaded weights + 1 GB", 1.05 * pruned_weights + one_gb),
    )

    # 5b. fp16 (V100s have no bf16): statistics and a forward/generation check on the whole model
    r.run(
        "stats teacher --dtype fp16, 1 process",
        cli("stats", "--model", str(hf), *data, "--dtype", "fp16", "--out", str(work / "stats-fp16.safetensors"), "--no-progress"),
        bound=("1.05 x weights + 1 GB", 1.05 * weights + one_gb),
        check=lambda m: {"counters_finite": stats_finite(work / "stats-fp16.safetensors")},
    )
    r.run(
        "fp16 forward + routing + generation check",
        [PY, "-m", "experiments.fullwidth.probe", "fp16", str(hf), "--out", str(work / "fp16.json")],
        check=lambda m: {"fp16": json.loads((work / "fp16.json").read_text())},
    )
    (work / "stats-fp16.safetensors").unlink(missing_ok=True)

    # 6. safetensors -> fairseq and back to an export from it
    r.run(
        "convert safetensors bf16 -> fairseq fp16",
        cli("convert", str(hf), "--out", str(fs_conv), "--layout", "fairseq", "--dtype", "fp16"),
        bound=("2 x largest tensor + 1 GB", 2 * largest + one_gb),
    )
    r.run("info (fairseq, converted)", cli("info", str(fs_conv)), bound=("1 GB", one_gb))
    out = work / "pruned-from-fairseq"
    shutil.rmtree(out, ignore_errors=True)
    r.run(
        f"export --policy drop from fairseq ({SRC}-{TGT})",
        cli("export", "--model", str(fs_conv), "--experts", str(experts), "--src", SRC, "--tgt", TGT, "--out", str(out)),
        bound=("2 x largest tensor + 1 GB", 2 * largest + one_gb),
        check=lambda m: {
            "reads_no_pruned_expert": m.read_bytes - r.baseline_read <= checkpoint_bytes(fs_conv, experts=kept) * 1.05,
            "bytes_of_kept_tensors": checkpoint_bytes(fs_conv, experts=kept),
        },
    )
    shutil.rmtree(fs_conv)
    shutil.rmtree(out)

    # 7. the fairseq layout as released (omegaconf cfg, optimizer state), info, convert to safetensors
    shutil.rmtree(hf)
    r.run("generate fairseq fp16 (omegaconf cfg, optimizer state)", [*gen, "--out", str(fs_gen), "--layout", "fairseq", "--dtype", "fp16"])
    r.run(
        "info (fairseq as released)",
        cli("info", str(fs_gen)),
        bound=("1 GB", one_gb),
        check=lambda m: {"reads_no_optimizer_state": m.read_bytes - r.baseline_read < optimizer_bytes(small) / 2},
    )
    r.run(
        "convert fairseq fp16 -> safetensors bf16",
        cli("convert", str(fs_gen), "--out", str(back), "--dtype", "bf16"),
        bound=("2 x largest tensor + 1 GB", 2 * largest_fp16 + one_gb),
        check=lambda m: {"reads_no_optimizer_state": m.read_bytes - r.baseline_read <= checkpoint_bytes(fs_gen) * 1.05},
    )
    shutil.rmtree(fs_gen)
    shutil.rmtree(back)
    for f in (stats1, stats2):
        f.unlink(missing_ok=True)
    return {
        "weights_bytes": weights,
        "largest_tensor_bytes": largest,
        "pruned_export_bytes": pruned_weights,
        "kept_experts": {f"{s}.{l}": len(v) for (s, l), v in kept.items()},
        "steps": r.steps,
        "routing_own_vs_shared_top16": routing,
        "baseline_read_bytes": r.baseline_read,
        "topology": reader.topology.to_dict(),
        "workload": workload_of(sentences),
    }


def optimizer_bytes(small: bool) -> float:
    return (0.05 if small else 1.0) * 2**30


def workload_of(sentences: int, *, translated: int = 8, max_length: int = 24) -> dict[str, int]:
    """The batch shapes the steps ran: padded tokens per side in a statistics batch, source length translated."""
    from pruning.checkpoint.tokenizer import load_tokenizer
    from pruning.data.flores import FloresDir

    tokenizer = load_tokenizer("experiments/testbed/data/tokenizer")
    flores = FloresDir("experiments/testbed/data/flores")
    longest = {}
    for lang in LANGS:
        tokenizer.src_lang = lang
        longest[lang] = [len(ids) for ids in tokenizer(flores.read(lang, "dev")[:sentences])["input_ids"]]
    tokenizer.src_lang = SRC
    source = [len(ids) for ids in tokenizer(flores.read(SRC, "devtest")[:translated])["input_ids"]]
    return {
        "stats_tokens": max(max(v) for v in longest.values()) * sentences,
        "translate_sentences": translated,
        "src_len": max(source),
        "max_length": max_length,
    }


def dense_bytes(model: Path) -> int:
    from pruning.checkpoint import keymap
    from pruning.checkpoint.reader import open_checkpoint

    return sum(_nbytes(e.tensor) for e in open_checkpoint(model).entries() if keymap.parse_expert_key(e.name) is None)


def kept_experts(index_path: Path, topology: Any) -> dict:
    from pruning.index import experts_for_direction, read_index

    return {slot: set(ids) for slot, ids in experts_for_direction(read_index(index_path), SRC, TGT, topology).items()}


def stats_agree(one: Path, two: Path) -> bool:
    import torch

    from pruning.stats.counters import RoutingStats

    a, b = RoutingStats.load(one), RoutingStats.load(two)
    return a.directions == b.directions and all(
        torch.allclose(a.side(d, s)[k], b.side(d, s)[k], rtol=1e-5, atol=1e-3) for d in a.directions for s in ("enc", "dec") for k in ("top1", "top2", "tokens")
    )


def stats_finite(path: Path) -> bool:
    import torch

    from pruning.stats.counters import RoutingStats

    stats = RoutingStats.load(path)
    return all(bool(torch.isfinite(t).all()) for d in stats.directions for s in ("enc", "dec") for t in stats.side(d, s).values())


def routing_summary(stats_path: Path) -> dict[str, Any]:
    from experiments.testbed.routing_report import per_language_top1, specificity
    from pruning.stats.counters import RoutingStats

    counts = per_language_top1(RoutingStats.load(stats_path))
    return {side: specificity(langs, k=16) for side, langs in counts.items()}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.fullwidth.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("outputs/rehearsal"), help="scratch directory (tens of GB; emptied at the end)")
    parser.add_argument("--small", action="store_true", help="d_model 256 instead of 2048 (a quick check of the harness)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sentences", type=int, default=32, help="dev sentences per direction for stats")
    parser.add_argument("--results", type=Path, default=RESULTS / "fullwidth_cpu.json")
    parser.add_argument("--resume", action="store_true", help="skip the steps recorded in WORK/steps.json (their files must still be there)")
    args = parser.parse_args(argv)
    import torch
    import transformers

    started = datetime.now(timezone.utc)
    body = rehearse(args.work, small=args.small, threads=args.threads, sentences=args.sentences, resume=args.resume)
    record = {
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join(["python -m experiments.fullwidth.run", *(argv or sys.argv[1:])]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30, 1)} GiB",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        **body,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
