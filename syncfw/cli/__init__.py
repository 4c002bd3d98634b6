"""The ``syncfw`` command.

Owns: argument parsing and printing. Each verb is a module with
``register(subparsers)``; every verb has ``--help`` (a test checks it).
May import anything in syncfw.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
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

from syncfw.cli import demo, inspect_cmd, node_cmd

COMMANDS: list[ModuleType] = [demo, node_cmd, inspect_cmd]
"""Verb modules, in the order ``--help`` lists them."""


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
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    parser.add_argument("--version", action="version", version=f"syncfw {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``syncfw`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    code: int = args.func(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
