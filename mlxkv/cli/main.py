"""The ``mlxkv`` command: dispatches to sub-commands and turns user errors into one line."""

from __future__ import annotations

import argparse
import importlib
import sys

# Sub-command name -> module under mlxkv.cli with add_parser(subparsers) and run(args) -> int.
SUBCOMMANDS = {
    "generate": "generate",
    "chat": "chat",
    "plan": "plan",
    "bench": "bench",
    "eval": "eval",
    "convert": "convert",
    "serve": "serve",
}


class OneLineErrors(argparse.ArgumentParser):
    """Usage mistakes as one line that says where to look, not a usage dump."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(
        prog="mlxkv",
        description="Long-context generation with MLX on a small, bounded KV cache.",
        epilog="Run 'mlxkv COMMAND --help' for the options of one command.",
    )
    from mlxkv import __version__

    parser.add_argument("--version", action="version", version=f"mlxkv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in SUBCOMMANDS.items():
        importlib.import_module(f"mlxkv.cli.{module}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mlxkv.errors import UserError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except UserError as e:
        print(f"mlxkv: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mlxkv: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
