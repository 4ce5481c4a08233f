"""Command-line interface: a thin layer over the library functions.

Each command lives in its own module that exposes ``register(subparsers)``; the
module adds one sub-parser and sets ``func`` (called with the parsed args, returns
an exit code) via ``parser.set_defaults(func=...)``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from actsparse.errors import ActsparseError

# modules that each register one or more sub-commands, in --help order
COMMAND_MODULES = [
    "actsparse.commands.demo",
    "actsparse.commands.profile",
    "actsparse.commands.sparsify",
    "actsparse.commands.eval",
    "actsparse.commands.sweep",
    "actsparse.commands.pplp",
    "actsparse.commands.quantize",
    "actsparse.commands.generate",
    "actsparse.commands.bench",
    "actsparse.commands.finetune",
    "actsparse.commands.recover",
    "actsparse.commands.prune",
    "actsparse.commands.contrast",
    "actsparse.commands.intervene",
    "actsparse.commands.moefy",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="actsparse",
        description="Measure, induce and exploit activation sparsity in PyTorch models.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:  # a command still being built
            if err.name != name:
                raise
            continue
        module.register(sub)
    return parser


def _version() -> str:
    from actsparse.version import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ActsparseError as err:
        print(f"actsparse {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
