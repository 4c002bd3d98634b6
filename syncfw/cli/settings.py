"""Settings of ``syncfw node serve`` from four places: flags, ``SYNCFW_*``, a TOML file, defaults.

Invariants:

1. One table (:data:`SERVE_OPTIONS`) names every setting once: its flag
   (``--peer-bytes-per-s``), its environment variable (``SYNCFW_PEER_BYTES_PER_S``),
   its key in the config file (``peer_bytes_per_s``), its type, default, help and check.
   Adding a setting is one row.
2. Precedence is flag > environment > config file > default, per setting (a
   list given on the command line replaces the environment's, which replaces
   the file's; lists are never merged).
3. Nothing is opened before every value is parsed and checked. An unknown
   config key, an unknown ``SYNCFW_*`` variable, a value of the wrong type or
   one that fails its check is refused with :class:`SettingsError`, whose text
   names the setting, where the value came from and the value itself.
"""

from __future__ import annotations

import argparse
import math
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from syncfw.cli.common import (
    LOG_FORMATS,
    LOG_LEVELS,
    any_of,
    check_dial_address,
    check_listen_address,
    is_loopback_host,
)
from syncfw.log import is_node_id

__all__ = [
    "ENV_PREFIX",
    "SERVE_OPTIONS",
    "Option",
    "SettingsError",
    "add_options",
    "ntp_servers",
    "resolve",
]

ENV_PREFIX = "SYNCFW_"
CONFIG_ENV = "SYNCFW_CONFIG"
PRESET_NAMES = ("lan", "metered", "test")

Check = Callable[[Any], str | None]


class SettingsError(ValueError):
    """A setting that cannot be used; the message names it and where it came from."""


@dataclass(frozen=True, slots=True)
class Option:
    """One setting of ``node serve``.

    Attributes:
        name: the flag without dashes (``"peer-bytes-per-s"``).
        help: one line for ``--help``.
        kind: ``"str"``, ``"float"``, ``"list"`` (repeatable flag; a TOML array;
            comma-separated in the environment) or ``"bool"`` (a flag).
        default: the value when no place sets it.
        check: returns why a (parsed) value is unusable, or None.
        choices: the values allowed, if a fixed set.
        dest: the attribute on the resolved namespace (the name with ``_`` by default).
        metavar: the placeholder in ``--help``.
        positional: a positional argument (optional on the command line, so it
            may come from the environment or the file instead).
        required: it must be set somewhere.
        flag: it has a flag of its own; False for the logging settings, whose
            flags every verb shares (:mod:`syncfw.cli.common`): for those a
            flag left unset is None.
    """

    name: str
    help: str
    kind: str = "str"
    default: Any = None
    check: Check | None = None
    choices: tuple[str, ...] = ()
    dest: str = ""
    metavar: str | None = None
    positional: bool = False
    required: bool = False
    flag: bool = True

    @property
    def attr(self) -> str:
        return self.dest or self.name.replace("-", "_")

    @property
    def key(self) -> str:
        """The config file key."""
        return self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.upper()

    @property
    def option(self) -> str:
        """How errors name it: ``--name``, or the positional's name."""
        return self.name if self.positional else "--" + self.name


# -- checks (each returns why a value is unusable, or None) ------------------------


def _node_id(value: str) -> str | None:
    if is_node_id(value):
        return None
    return "must be 1-256 letters, digits or . _ : @ + -, starting with a letter or digit"


def _non_empty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def _each(check: Check) -> Check:
    def run(values: list[str]) -> str | None:
        for v in values:
            why = check(v)
            if why is not None:
                return f"{v!r} {why}"
        return None

    return run


def _prefix(value: str) -> str | None:
    return None if value and value.endswith("/") else "must be a key prefix ending in '/'"


def _positive(value: float) -> str | None:
    return None if value > 0 and math.isfinite(value) else "must be a number above 0"


def _not_negative(value: float) -> str | None:
    return None if value >= 0 and math.isfinite(value) else "must be a number >= 0"


def _proxy(value: str) -> str | None:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        port = None
        parts = None
    if parts is None or parts.scheme != "http" or not parts.hostname or port is None:
        return "must be http://host:port"
    return None


def ntp_servers(values: Sequence[str]) -> tuple[list[str], int]:
    """``--ntp`` values as hosts and the one UDP port they share (123 when none names one).

    Raises:
        ValueError: a port that is not 1-65535, or two different ports.
    """
    hosts: list[str] = []
    ports: set[int] = set()
    for v in values:
        host, sep, port = v.rpartition(":") if v.count(":") == 1 else ("", "", v)
        if sep:
            if not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{v!r}: the port must be 1-65535")
            ports.add(int(port))
        else:
            host = v
        if not host.strip():
            raise ValueError(f"{v!r}: no host")
        hosts.append(host)
    if len(ports) > 1:
        raise ValueError(f"the NTP servers name different ports {sorted(ports)}: use one")
    return hosts, ports.pop() if ports else 123


def _ntp_servers(values: list[str]) -> str | None:
    try:
        ntp_servers(values)
    except ValueError as exc:
        return str(exc)
    return None


def _one_of(allowed: Sequence[str]) -> Check:
    def run(value: str) -> str | None:
        return None if value.upper() in allowed else f"is not one of {', '.join(allowed)}"

    return run


def _optional_address(check: Check) -> Check:
    def run(value: str) -> str | None:
        return None if value in ("", "none") else check(value)

    return run


SERVE_OPTIONS: list[Option] = [
    Option(
        "db", "path of the node's SQLite file (created if absent)", positional=True, required=True
    ),
    Option("id", "this node's id", dest="node_id", check=_node_id, required=True, metavar="ID"),
    Option("fleet", "fleet id (peers of another are refused)", default="default", check=_non_empty),
    Option("authority", "node id of the fleet authority", default="cloud", check=_node_id),
    Option(
        "shared",
        "a zone every node may write (repeatable), e.g. site/",
        kind="list",
        default=[],
        check=_each(_prefix),
        metavar="PREFIX",
    ),
    Option(
        "listen",
        "host:port to serve on (port 0: any port)",
        default="127.0.0.1:0",
        check=check_listen_address,
    ),
    Option(
        "advertise",
        "address gossiped to peers, if not --listen",
        check=check_dial_address,
        metavar="HOST:PORT",
    ),
    Option(
        "seed",
        "a peer address (repeatable)",
        kind="list",
        default=[],
        check=_each(check_dial_address),
        metavar="HOST:PORT",
    ),
    Option("preset", "mesh tunables", default="lan", choices=PRESET_NAMES),
    Option("proxy", "dial peers via this HTTP CONNECT proxy", check=_proxy, metavar="URL"),
    Option(
        "peer-bytes-per-s",
        "per-peer send budget in bytes/s",
        kind="float",
        check=_positive,
        metavar="N",
    ),
    Option("ca", "fleet CA certificate (PEM); enables mutual TLS", metavar="FILE"),
    Option("cert", "this node's certificate (PEM, CN = node id)", metavar="FILE"),
    Option("key", "this node's private key (PEM)", metavar="FILE"),
    Option(
        "keys",
        "this node's key directory (syncfw keys export): a signed fleet with mutual TLS",
        metavar="DIR",
    ),
    Option(
        "status-file",
        "write status JSON here every --status-every seconds (atomically)",
        metavar="FILE",
    ),
    Option(
        "status-every",
        "seconds between status writes",
        kind="float",
        default=1.0,
        check=_positive,
        metavar="S",
    ),
    Option(
        "digest-every",
        "seconds between state digests in the status file (only when the log moved; 0: every write)",
        kind="float",
        default=30.0,
        check=_not_negative,
        metavar="S",
    ),
    Option(
        "metrics",
        "serve Prometheus metrics at http://HOST:PORT/metrics (port 0: any free port)",
        check=check_listen_address,
        metavar="HOST:PORT",
    ),
    Option(
        "admin",
        "serve the admin endpoint (status, get, put, scan) on HOST:PORT; 'none': off",
        default="127.0.0.1:0",
        check=_optional_address(check_listen_address),
        metavar="HOST:PORT",
    ),
    Option(
        "admin-remote",
        "let --admin bind a non-loopback address (anyone who reaches it can write)",
        kind="bool",
        default=False,
    ),
    Option(
        "ntp",
        "an NTP server HOST[:PORT] the clock is checked against (repeatable, one port for "
        "all; 123 if none is given): a high-water mark far ahead of its time is a WARNING, "
        "status and a metric on every check; none set: no check",
        kind="list",
        default=[],
        check=_ntp_servers,
        metavar="HOST[:PORT]",
    ),
    Option(
        "ntp-every",
        "seconds between clock checks (the first one at start)",
        kind="float",
        default=600.0,
        check=_positive,
        metavar="S",
    ),
    Option("log-level", "", default="INFO", check=_one_of(LOG_LEVELS), flag=False),
    Option("log-format", "", default="text", choices=LOG_FORMATS, flag=False),
]
"""Every setting of ``node serve``, in ``--help`` order."""


def add_options(parser: argparse.ArgumentParser, options: Sequence[Option]) -> None:
    """Add ``options`` as flags whose defaults are SUPPRESS (so :func:`resolve`
    sees only what the command line set); ``--help`` shows the real defaults."""
    for opt in options:
        if not opt.flag:
            continue
        shown = "" if opt.default in (None, [], False) else f" (default: {opt.default})"
        text = f"{opt.help}{shown} [{opt.env}]"
        if opt.positional:
            parser.add_argument(
                opt.attr, nargs="?", default=argparse.SUPPRESS, help=text, metavar=opt.name.upper()
            )
            continue
        kwargs: dict[str, Any] = {"dest": opt.attr, "default": argparse.SUPPRESS, "help": text}
        if opt.kind == "bool":
            parser.add_argument(opt.option, action="store_true", **kwargs)
            continue
        if opt.kind == "list":
            kwargs["action"] = "append"
        if opt.choices:
            kwargs["choices"] = opt.choices
        if opt.metavar:
            kwargs["metavar"] = opt.metavar
        # Values stay strings here: resolve() parses them so that its errors
        # name the setting and its source the same way for all three places.
        parser.add_argument(opt.option, **kwargs)
    parser.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        metavar="FILE",
        help=f"a TOML file of these settings, keys as the flags with '_' for '-' [{CONFIG_ENV}]",
    )


def _env_value(opt: Option, raw: str) -> Any:
    if opt.kind == "list":
        return [v.strip() for v in raw.split(",") if v.strip()]
    if opt.kind == "bool":
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off", ""):
            return False
        raise SettingsError(f"{opt.env}={raw!r}: must be true or false")
    return raw


def _parse(opt: Option, value: Any, where: str) -> Any:
    """``value`` as ``opt``'s type; strings from flags and the environment are parsed."""

    def bad(why: str) -> SettingsError:
        return SettingsError(f"{where}: {value!r} {why}")

    if opt.kind == "float":
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise bad("is not a number") from None
        if not any_of(value, (int, float)):
            raise bad("is not a number")
        return float(value)
    if opt.kind == "list":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad("is not a list of strings")
        return list(value)
    if opt.kind == "bool":
        if not isinstance(value, bool):
            raise bad("is not true or false")
        return value
    if not isinstance(value, str):
        raise bad("is not a string")
    return value


def _load_config(path: str, options: Sequence[Option]) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise SettingsError(f"config {path!r}: cannot read it: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config {path!r}: not valid TOML: {exc}") from None
    known = {opt.key for opt in options}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SettingsError(
            f"config {path!r}: unknown key(s) {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(sorted(known))}"
        )
    return data


def resolve(
    given: argparse.Namespace,
    options: Sequence[Option] = SERVE_OPTIONS,
    environ: Mapping[str, str] | None = None,
) -> argparse.Namespace:
    """Every setting's value, by precedence flag > environment > config file > default.

    Args:
        given: the parsed command line (only what it set is present).
        options: the settings table.
        environ: the environment (``os.environ`` by default).

    Returns:
        A namespace with every setting (``.node_id``, ``.seed``, ...), the
        other attributes of ``given`` (``func``, logging options), and
        ``.sources``: where each setting came from.

    Raises:
        SettingsError: an unknown key or variable, a malformed value, a value
            failing its check, a required setting missing.
    """
    env = os.environ if environ is None else environ
    known_env = {opt.env for opt in options} | {CONFIG_ENV}
    unknown_env = sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in known_env)
    if unknown_env:
        raise SettingsError(
            f"unknown environment variable(s) {', '.join(unknown_env)}; "
            f"known: {', '.join(sorted(known_env))}"
        )
    config_path = getattr(given, "config", None) or env.get(CONFIG_ENV) or None
    config = _load_config(config_path, options) if config_path else {}
    out = argparse.Namespace(**vars(given))
    sources: dict[str, str] = {}
    for opt in options:
        if getattr(given, opt.attr, None) is not None:
            value, where = getattr(given, opt.attr), opt.option
        elif opt.env in env:
            value, where = _env_value(opt, env[opt.env]), f"{opt.env}={env[opt.env]!r}"
        elif opt.key in config:
            value, where = config[opt.key], f"config {config_path!r}: {opt.key}"
        else:
            if opt.required:
                raise SettingsError(
                    f"{opt.option} is required (or {opt.env}, or {opt.key!r} in --config)"
                )
            value = list(opt.default) if isinstance(opt.default, list) else opt.default
            setattr(out, opt.attr, value)
            sources[opt.attr] = "default"
            continue
        value = _parse(opt, value, where)
        if opt.choices and value not in opt.choices:
            raise SettingsError(f"{where}: {value!r} is not one of {', '.join(opt.choices)}")
        why = opt.check(value) if opt.check is not None else None
        if why is not None:
            shown = "" if opt.kind == "list" else f"{value!r} "
            raise SettingsError(f"{where}: {shown}{why}")
        setattr(out, opt.attr, value)
        sources[opt.attr] = where
    _check_together(out, sources)
    out.sources = sources
    return out


def _check_together(out: argparse.Namespace, sources: Mapping[str, str]) -> None:
    """Rules between settings."""
    tls = [getattr(out, n, None) for n in ("ca", "cert", "key")]
    if any(tls) and not all(tls):
        raise SettingsError("--ca, --cert and --key go together")
    admin = getattr(out, "admin", None)
    if admin and admin != "none" and not getattr(out, "admin_remote", False):
        host = admin.rpartition(":")[0]
        if not is_loopback_host(host):
            raise SettingsError(
                f"{sources.get('admin', '--admin')}: {admin!r} is not a loopback address; "
                "the admin endpoint can write to the node: pass --admin-remote to serve it there"
            )
