"""The ``syncfw`` command.

Owns: argument parsing and printing. Each verb is a module with
``register(subparsers)``; every verb has ``--help`` (a test checks it).
May import anything in syncfw.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
from collections.abc import Sequence
from types import ModuleType

# gRPC's C core logs refused proxy handshakes (the demo's partitions) to stderr
# itself; syncfw reports link failures through its own logging instead. The C
# core reads this when grpc is imported, which ``import syncfw`` (run before this
# module) already did: syncfw/__init__.py sets it first; this repeats it for
# whoever imports the CLI with grpc not yet loaded.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

from syncfw.cli import (
    cloud_cmd,
    data_cmd,
    demo,
    inspect_cmd,
    keys_cmd,
    model_cmd,
    node_cmd,
    status_cmd,
)
from syncfw.cli.common import DefaultsFormatter, add_log_options, finish_parsers
from syncfw.cli.logs import configure_logging

COMMANDS: list[tuple[str, ModuleType]] = [
    ("demo", demo),
    ("node", node_cmd),
    ("status", status_cmd),
    ("put, get, scan", data_cmd),
    ("inspect", inspect_cmd),
    ("keys", keys_cmd),
    ("model", model_cmd),
    ("cloud", cloud_cmd),
]
"""Verb modules, in the order ``--help`` lists them: ``(the verbs it adds, module)``.
Each module has ``register(subparsers)``; adding a verb is adding one row."""


def version() -> str:
    """The installed distribution's version, or the package's own when run from a bare tree."""
    try:
        return importlib.metadata.version("syncfw")
    except importlib.metadata.PackageNotFoundError:
        import syncfw

        return syncfw.__version__


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (used by ``main`` and by the help test)."""
    parser = argparse.ArgumentParser(
        prog="syncfw",
        description="syncfw: offline-first edge fleets (SQLite CRDTs, HLC, replicated log).",
        formatter_class=DefaultsFormatter,
    )
    parser.add_argument("--version", action="version", version=f"syncfw {version()}")
    add_log_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for _, module in COMMANDS:
        module.register(sub)
    finish_parsers(parser)  # defaults in every --help; logging options after the verb too
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``syncfw`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level or "INFO", args.log_format or "text", verbose=args.verbose)
    code: int = args.func(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
