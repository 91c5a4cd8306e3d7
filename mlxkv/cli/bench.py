"""mlxkv bench (placeholder: being written)."""

import argparse

from mlxkv.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="(not yet available)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    raise UserError("'mlxkv bench' is not available yet")
