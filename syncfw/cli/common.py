"""What every verb shares: the help format, the logging options, error lines, address checks.

Invariants:

1. Every parser of the command (verbs, sub-verbs) shows its defaults in
   ``--help`` and takes ``--log-level``, ``--log-format`` and ``-v`` before or
   after the verb (:func:`finish_parsers` walks the whole tree once, so a verb
   module added to the table gets both without doing anything).
2. A refusal is one line, ``syncfw VERB: what is wrong``, and exit status 2
   (:func:`fail`); never a traceback.
3. Addresses are checked with the mesh's own rule (:func:`syncfw.mesh.addresses.check_address`)
   before anything is opened, so what the CLI accepts is what the mesh would dial.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from typing import IO, Any

from syncfw.mesh.addresses import check_address

__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "DefaultsFormatter",
    "check_dial_address",
    "check_listen_address",
    "fail",
    "finish_parsers",
    "is_loopback_host",
]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")


class DefaultsFormatter(argparse.HelpFormatter):
    """``--help`` with each option's default, where it has a meaningful one.

    ``argparse.ArgumentDefaultsHelpFormatter`` also prints ``(default: None)``
    and ``(default: False)`` for options without a default and for flags;
    those say nothing, so they are left out.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or "(default:" in text
            or default in (None, False, argparse.SUPPRESS, [], ())
            or (
                not action.option_strings
                and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)
            )
        ):
            return text
        return text + " (default: %(default)s)"


def add_log_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The logging options. On the top parser an unset one is None (``main`` then
    uses INFO and text, and ``node serve`` may take them from its environment or
    config file); below it they default to SUPPRESS, so a value given before the
    verb is not overwritten by the verb's parser."""
    group = parser.add_argument_group("logging")
    unset = None if top else argparse.SUPPRESS
    group.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default=unset,
        help="level of syncfw's own loggers (other libraries log at WARNING) (default: INFO)",
    )
    group.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=unset,
        help="log lines as text or as one JSON object per line (default: text)",
    )
    group.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="shorthand for --log-level DEBUG (syncfw's loggers only)",
    )


def _children(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    out: list[argparse.ArgumentParser] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                if child not in out:  # aliases map to the same parser
                    out.append(child)
    return out


def finish_parsers(parser: argparse.ArgumentParser) -> None:
    """Give every parser below ``parser`` the defaults-showing help and the logging options."""
    for child in _children(parser):
        child.formatter_class = DefaultsFormatter
        add_log_options(child, top=False)
        finish_parsers(child)


def fail(verb: str, message: str, *, stream: IO[str] | None = None) -> int:
    """Print ``syncfw VERB: message`` and return exit status 2.

    Verbs whose stdout is data (``get``, ``scan``, ``status --json``) pass
    ``sys.stderr``; the others print on stdout as they always have.
    """
    print(f"syncfw {verb}: {message}", file=stream or sys.stdout, flush=True)
    return 2


def _split(address: str) -> tuple[str, str] | None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or (":" in host and not host.startswith("[")):
        return None
    return host, port


def check_listen_address(address: str) -> str | None:
    """Why ``address`` cannot be listened on (``host:port``, port 0 for any), or None."""
    parts = _split(address) if isinstance(address, str) else None
    if parts is None:
        return "must be host:port (e.g. 127.0.0.1:7001, 0.0.0.0:7001, [::]:7001)"
    host, port = parts
    if not (port.isdigit() and len(port) <= 5 and int(port) <= 65535):
        return f"port {port!r} is not 0..65535"
    if check_address(f"{host}:1") is not None:
        return f"host {host!r} is not a hostname or an IP address"
    return None


def check_dial_address(address: str) -> str | None:
    """Why a peer at ``address`` cannot be dialed (``host:port``, port 1..65535), or None."""
    if not isinstance(address, str) or check_address(address) is not None:
        return "must be host:port with port 1..65535 (e.g. 10.0.0.7:7001, depot.local:7000)"
    return None


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def any_of(value: Any, kinds: tuple[type, ...]) -> bool:
    """isinstance, with bool never passing for a number (TOML's ``true`` is not 1)."""
    return isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
