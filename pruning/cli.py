"""`nllb-prune` (also `python -m pruning`): one subcommand per module of :mod:`pruning.commands`.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``;
``run`` parses its dataclass config and calls one importable function. No logic lives here.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pruning.errors import UserError

# subcommand -> module in pruning.commands (kept in pipeline order)
COMMANDS = {
    "info": "info",
    "plan": "plan",
    "convert": "convert",
    "stats": "stats",
    "merge-stats": "merge_stats",
    "select": "select",
    "prune": "prune",
    "plot": "plot",
    "compare-metrics": "compare_metrics",
    "stability": "stability",
    "export": "export",
    "translate": "translate",
    "evaluate": "evaluate",
    "train-lid": "train_lid",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nllb-prune",
        description="Language-specific expert pruning for NLLB-200 MoE.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(f"pruning.commands.{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"pruning.commands.{module_name}":
                continue  # command not built yet
            raise
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except UserError as exc:
        print(f"nllb-prune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nllb-prune {args.command}: interrupted; completed outputs were kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
