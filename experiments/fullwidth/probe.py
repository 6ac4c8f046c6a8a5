"""Small commands the rehearsal measures in a process of their own.

    python -m experiments.fullwidth.probe load MODEL [--dtype bf16]    # load_model, print the bytes held
"""

from __future__ import annotations

import argparse
from typing import Optional


def load(model: str, dtype: Optional[str]) -> None:
    from pruning import load_model

    loaded = load_model(model, dtype=dtype)
    held = sum(p.numel() * p.element_size() for p in loaded.parameters())
    print(f"loaded {model}: {held / 1e9:.3f} GB of parameters")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.fullwidth.probe")
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("load")
    p.add_argument("model")
    p.add_argument("--dtype", default=None)
    args = parser.parse_args(argv)
    load(args.model, args.dtype)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
