"""What a model is, for the signature of every number made with it (statistics files, evaluation summaries)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import torch

_VOLATILE_CONFIG_KEYS = {"transformers_version", "torch_dtype", "dtype", "output_router_logits", "architectures"}


def model_identity(model: Any, path: Optional[str] = None) -> dict[str, Any]:
    """Path, layout, a hash of the config, a cheap fingerprint of the routers (fp32 rows + kept ids), and
    for an export the sha256 of its manifest (which lists its shards' sha256) and of its expert index.

    The fingerprint does not depend on the dtype, on the device or on expert parallelism (every rank
    holds every router row), so runs that must give the same counters give the same identity.
    """
    from pruning.manifest import MANIFEST_NAME

    path = path or getattr(model, "source_path", None)
    manifest = getattr(model, "manifest", None) or {}
    manifest_file = Path(path) / MANIFEST_NAME if path else None
    manifest_sha = hashlib.sha256(manifest_file.read_bytes()).hexdigest() if manifest_file is not None and manifest_file.is_file() else None
    config = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS}
    config_hash = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
    digest = hashlib.sha256()
    kept = 0
    for side, layer, moe in model.moe_layers():
        ids = moe.router.expert_ids.detach().cpu().to(torch.int64)
        kept += len(ids)
        digest.update(f"{side}.{layer}:".encode())
        digest.update(ids.numpy().tobytes())
        digest.update(moe.router.weight.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return {
        "path": str(Path(path).resolve()) if path else "in-memory",
        "layout": getattr(model, "source_layout", None),
        "config_sha256": config_hash,
        "router_fingerprint": digest.hexdigest()[:32],
        "experts_kept": kept,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "manifest_sha256": manifest_sha,
        "index_sha256": (manifest.get("index") or {}).get("sha256"),
    }
