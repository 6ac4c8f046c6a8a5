"""`nllb-prune` (also `python -m pruning`): one subcommand per module of :mod:`pruning.commands`.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``;
``run`` parses its dataclass config and calls one importable function. No logic lives here.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

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


class OneLineErrors(argparse.ArgumentParser):
    """argparse's errors on one line, like every other error (``--help`` still shows the usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(
        prog="nllb-prune",
        description="Language-specific expert pruning for NLLB-200 MoE.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrors)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"pruning.commands.{module_name}")
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(attach_dash_values(parser, sys.argv[1:] if argv is None else list(argv)))
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


def attach_dash_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``--enc-dec -1:3`` -> ``--enc-dec=-1:3``: argparse takes a value starting with ``-`` for a flag
    (and says "expected one argument"); the value's own check then names what is wrong with it. Only
    single-dash words that are no option of the command are attached: ``--out --resume`` stays an error."""
    actions = _subcommand_actions(parser, argv)
    options = {option for action in actions for option in action.option_strings}
    takes_value = {option for action in actions if action.nargs is None for option in action.option_strings}
    out: list[str] = []
    for item in argv:
        if out and out[-1] in takes_value and item.startswith("-") and not item.startswith("--") and item not in options:
            out[-1] = f"{out[-1]}={item}"
        else:
            out.append(item)
    return out


def _subcommand_actions(parser: argparse.ArgumentParser, argv: list[str]) -> list[argparse.Action]:
    choices = next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})
    command = next((item for item in argv if item in choices), None)
    return list(choices[command]._actions) if command else []


if __name__ == "__main__":
    raise SystemExit(main())
