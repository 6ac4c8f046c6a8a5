"""Per-layer weight and activation ranges that decide what weight-only quantization costs, and the error it makes.

    python -m experiments.quant.ranges                                      # the 16-expert testbed
    python -m experiments.quant.ranges --model experiments/testbed/model128 --name testbed128

For every quantized matrix kind of every layer (each MoE layer's experts' fc1 / fc2, the attention
projections and the dense FFNs), over teacher-forced dev sentences of every language:

* weights: the crest factor of a row (max |w| / rms, median over rows): int8's step is max |w| / 127,
  so its error relative to the row's rms grows with it; the relative RMS error of the stored weights
  (``||w' - w|| / ||w||``) for int8 and int4 (groups of 128 and 32);
* activations: the input's outlier ratio (the largest per-feature max |x| over the median one): a
  weight-only error in input column k is multiplied by x_k, so outlier features amplify it;
* what the two make: the relative error of the layer's output on those real inputs
  (``||x W'^T - x W^T|| / ||x W^T||``; experts: on the tokens routed to them).

Writes ``experiments/results/quant/ranges_<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from pruning.quant import QuantSpec, dequantize, quantize

RESULTS = Path("experiments/results/quant")
SPECS = {"int8": QuantSpec.make("int8"), "int4/128": QuantSpec.make("int4", group_size=128), "int4/32": QuantSpec.make("int4", group_size=32)}


def stored(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    parts = quantize(w, spec)
    return dequantize(parts[""], parts["_scale"], parts.get("_min"), dtype=torch.float32)


def weight_stats(w: torch.Tensor) -> dict[str, float]:
    """w [..., N, K] float32."""
    rows = w.reshape(-1, w.shape[-1])
    crest = rows.abs().amax(dim=1) / rows.pow(2).mean(dim=1).sqrt().clamp(min=1e-12)
    out = {"in_features": w.shape[-1], "crest_median": round(float(crest.median()), 2), "crest_max": round(float(crest.max()), 2)}
    for name, spec in SPECS.items():
        if spec.scheme == "int4" and w.shape[-1] % spec.group_size:  # type: ignore[operator]
            continue
        err = stored(w, spec) - w
        out[f"weight_err_{name}"] = round(float(err.norm() / w.norm()), 5)
    return out


def output_error(x: torch.Tensor, w: torch.Tensor) -> dict[str, float]:
    """x [T, K], w [N, K]: relative error of x @ w.T under each spec."""
    exact = x @ w.T
    out = {}
    for name, spec in SPECS.items():
        if spec.scheme == "int4" and w.shape[-1] % spec.group_size:  # type: ignore[operator]
            continue
        out[f"output_err_{name}"] = round(float((x @ stored(w, spec).T - exact).norm() / exact.norm().clamp(min=1e-12)), 5)
    return out


def outlier_ratio(x: torch.Tensor) -> float:
    per_feature = x.abs().amax(dim=0)  # [K]
    return round(float(per_feature.max() / per_feature.median().clamp(min=1e-12)), 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("experiments/testbed/model"))
    parser.add_argument("--data", type=Path, default=Path("experiments/testbed/data/flores"))
    parser.add_argument("--sentences", type=int, default=20, help="dev sentences per language (each translated into the next language)")
    parser.add_argument("--name", default="testbed16")
    args = parser.parse_args(argv)
    from pruning import load_model
    from pruning.data.flores import FloresDir

    model = load_model(args.model, dtype="fp32")
    tokenizer = model.tokenizer
    flores = FloresDir(args.data)
    langs = sorted(flores.languages("dev"))
    inputs: dict[str, list[torch.Tensor]] = defaultdict(list)
    routed: dict[str, list[torch.Tensor]] = defaultdict(list)  # "side.layer" -> [T, K] expert of each token (1st choice)
    hooks = []
    base = model.model

    def keep_input(name: str, moe: bool):  # noqa: ANN202 - a forward hook (returns None: the output is unchanged)
        def hook(module: Any, args: Any, output: Any) -> None:
            inputs[name].append(args[0].reshape(-1, args[0].shape[-1]).detach())
            if moe:
                routed[name].append(output[1].expert_idx[:, 0].detach())  # 1st choice of each token

        return hook

    for name, module in base.named_modules():
        if isinstance(module, torch.nn.Linear) and QuantSpec.make("int8", dense=True).applies(f"{name}.weight"):
            hooks.append(module.register_forward_hook(keep_input(name, False)))
    for side, layer, moe in model.moe_layers():
        hooks.append(moe.register_forward_hook(keep_input(f"{side}.layers.{layer}.ffn", True)))
    with torch.no_grad():
        for j, src in enumerate(langs):
            tgt = langs[(j + 1) % len(langs)]
            tokenizer.src_lang, tokenizer.tgt_lang = src, tgt
            batch = tokenizer(
                flores.read(src, "dev")[: args.sentences], text_target=flores.read(tgt, "dev")[: args.sentences], padding=True, return_tensors="pt"
            )
            labels = batch.pop("labels")
            decoder_input_ids = torch.cat([torch.full_like(labels[:, :1], tokenizer.eos_token_id), labels[:, :-1]], dim=1)
            model(**batch, decoder_input_ids=decoder_input_ids)
    for hook in hooks:
        hook.remove()
    rows = []
    for name, module in base.named_modules():
        if name in inputs and isinstance(module, torch.nn.Linear):
            x = torch.cat(inputs[name])
            w = module.weight.detach().float()
            kind = name.split(".layers.")[1].split(".", 1)[1]
            rows.append(
                {
                    "layer": name.split(".layers.")[0] + "." + name.split(".layers.")[1].split(".")[0],
                    "matrix": kind,
                    "input_outlier_ratio": outlier_ratio(x),
                    **weight_stats(w),
                    **output_error(x, w),
                }
            )
    for side, layer, moe in model.moe_layers():
        key = f"{side}.layers.{layer}.ffn"
        x, first = torch.cat(inputs[key]), torch.cat(routed[key])
        for linear in ("fc1", "fc2"):
            w = getattr(moe.experts, f"{linear}_weight").detach().float()  # [E, N, K]
            errors: dict[str, list[float]] = defaultdict(list)
            hidden_all = []
            for e in range(w.shape[0]):
                tokens = x[first == e]
                if tokens.shape[0] == 0:
                    continue
                if linear == "fc2":  # the input of fc2 is the expert's hidden layer
                    tokens = torch.relu(tokens @ moe.experts.fc1_weight[e].float().T + moe.experts.fc1_bias[e].float())
                hidden_all.append(tokens)
                for k, v in output_error(tokens, w[e]).items():
                    errors[k].append(v)
            rows.append(
                {
                    "layer": f"{side}.{layer}",
                    "matrix": f"experts.{linear} ({w.shape[0]} experts)",
                    "input_outlier_ratio": outlier_ratio(torch.cat(hidden_all)),
                    **weight_stats(w),
                    **{k: round(statistics.fmean(v), 5) for k, v in errors.items()},
                }
            )
    from pruning.versions import versions

    payload = {
        "model": str(args.model),
        "sentences_per_language": args.sentences,
        "languages": langs,
        "rows": rows,
        "command": " ".join(["python -m experiments.quant.ranges", *sys.argv[1:]]),
        "versions": versions(),
        "device": "cpu",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"ranges_{args.name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    columns = [
        "layer",
        "matrix",
        "in_features",
        "crest_median",
        "crest_max",
        "input_outlier_ratio",
        "weight_err_int8",
        "output_err_int8",
        "weight_err_int4/128",
        "output_err_int4/128",
        "weight_err_int4/32",
        "output_err_int4/32",
    ]
    lines = [
        f"# Weight and activation ranges of {args.model}",
        "",
        f"- command: `{payload['command']}`",
        f"- teacher forcing, {args.sentences} dev sentences per language x {len(langs)} languages; {payload['date']}; {payload['versions']}",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in sorted(rows, key=lambda r: (r["matrix"].startswith("experts") is False, r["layer"], r["matrix"])):
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    (RESULTS / f"ranges_{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
