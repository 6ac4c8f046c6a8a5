"""Shared benchmark plumbing: timing (CUDA events or perf_counter), device/version signature, results files."""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

RESULTS = Path(__file__).resolve().parents[1] / "results"


def signature(device: torch.device) -> dict[str, Any]:
    import transformers

    info: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable), "-m", _module_name(), *sys.argv[1:]]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["cpu"] = platform.processor() or platform.machine()
        info["cores"] = os.cpu_count()
    return info


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else sys.argv[0]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], *, device: torch.device, warmup: int = 2, repeats: int = 5) -> float:
    """Median wall time of ``fn`` in milliseconds (device work included)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def measure_bandwidth_gbs(device: torch.device, *, nbytes: int = 1 << 28) -> float:
    """Device-to-device copy rate (bytes read + written) in GB/s, measured now on this device."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device=device, warmup=2, repeats=5)
    return 2 * n * 4 / (ms / 1000) / 1e9


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, *, n: int = 4096) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device=device, warmup=2, repeats=5)
    return 2 * n**3 / (ms / 1000) / 1e12


def write_results(name: str, payload: dict[str, Any], table: str) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS / f"{name}.json"
    md_path = RESULTS / f"{name}.md"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, json_path)
    sig = payload["signature"]
    header = "\n".join(f"- {k}: `{v}`" for k, v in sig.items())
    md_path.write_text(f"# {name}\n\n{header}\n\n{table}\n")
    return json_path, md_path


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c, "")
            cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
