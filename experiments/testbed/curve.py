"""The training curve of a testbed: chrF++, the no-expert floor and the balance loss over steps.

python -m experiments.testbed.curve --results experiments/results/testbed128_training.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def plot(results: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(results.read_text())
    evals, train = data["evals"], data["training"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot([e["step"] for e in evals], [e["mean_chrf++"] for e in evals], "o-", label="full model")
    top.plot([e["step"] for e in evals], [e["floor_chrf++"] for e in evals], "s--", label="no-expert floor (expert outputs zeroed)")
    top.set_ylabel("chrF++")
    top.set_title("4 directions x 30 devtest sentences, greedy", fontsize=9)
    top.legend()
    top.grid(alpha=0.3)
    bottom.plot([t["step"] for t in train], [t["balance"] for t in train], label="balance loss (1 = uniform)")
    bottom.plot([t["step"] for t in train], [t["ce"] for t in train], label="cross-entropy")
    bottom.set_xlabel("training step")
    bottom.legend()
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    out = results.with_suffix(".png")
    fig.savefig(out, dpi=110)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.testbed.curve")
    parser.add_argument("--results", type=Path, default=Path("experiments/results/testbed128_training.json"))
    args = parser.parse_args(argv)
    print(f"wrote {plot(args.results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
