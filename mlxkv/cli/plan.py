"""mlxkv plan (placeholder: being written)."""

import argparse

from mlxkv.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="(not yet available)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    raise UserError("'mlxkv plan' is not available yet")
