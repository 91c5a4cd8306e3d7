"""The ``mlxkv`` command: dispatches to sub-commands and turns user errors into one line."""

from __future__ import annotations

import argparse
import importlib
import os
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
    from mlxkv import __version__
    from mlxkv.units import UNITS_NOTE

    parser = OneLineErrors(
        prog="mlxkv",
        description="Long-context generation with MLX on a small, bounded KV cache.",
        epilog="Run 'mlxkv COMMAND --help' for the options of one command. Memory sizes, in flags "
               f"(--memory 8GB), tables and plots alike, count in powers of 1024: {UNITS_NOTE}.",
    )
    parser.add_argument("--version", action="version", version=f"mlxkv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in SUBCOMMANDS.items():
        importlib.import_module(f"mlxkv.cli.{module}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mlxkv.errors import UserError

    try:
        args = build_parser().parse_args(argv)  # --help writes to stdout too
        code = int(args.run(args) or 0)
        sys.stdout.flush()  # a closed pipe shows up here at the latest
        return code
    except UserError as e:
        print(f"mlxkv: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mlxkv: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _stdout_closed()


def _stdout_closed() -> int:
    """The reader of stdout went away (``mlxkv plan | head -1``): stop quietly, as Python's
    docs recommend for SIGPIPE. stdout is pointed at /dev/null so that the interpreter's
    final flush of the unwritten output does not raise again at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 1


if __name__ == "__main__":
    sys.exit(main())
