"""What a gossiped member may look like before this node holds or dials it.

Invariants:

1. Pure: every check is a function of its arguments; nothing is resolved, so a
   peer cannot make a check cost a DNS lookup.
2. A check returns None for an acceptable value, or the refusal's reason (one
   of :data:`REFUSALS`, a fixed set: the reason is a metric label).
3. An accepted address is ``host:port`` (or a bare host where ports are not
   required) where host is an RFC 1123 hostname, a dotted IPv4 literal or a
   bracketed IPv6 literal, and port is 1..65535; it is at most
   :data:`MAX_ADDRESS_CHARS` long. With allowed networks, host must be an IP
   literal inside one of them.
4. An accepted node id is a valid node id (:func:`syncfw.log.is_node_id`: the
   rule the store applies at open and zones apply to remote ops).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from functools import lru_cache

from syncfw.log import is_node_id
from syncfw.sync.frames import MAX_ADDRESS_CHARS, MAX_NODE_ID_CHARS

__all__ = [
    "BAD_ADDRESS",
    "BAD_NODE_ID",
    "FRAME_CAP",
    "MAX_ADDRESS_CHARS",
    "MAX_NODE_ID_CHARS",
    "NETWORK",
    "REFUSALS",
    "TABLE_FULL",
    "check_address",
    "check_node_id",
]

# The wire's caps, so what the mesh accepts is exactly what a Peers frame can carry.

BAD_ADDRESS = "bad_address"
BAD_NODE_ID = "bad_node_id"
NETWORK = "network"
FRAME_CAP = "frame_cap"
TABLE_FULL = "table_full"
REFUSALS = (BAD_ADDRESS, BAD_NODE_ID, NETWORK, FRAME_CAP, TABLE_FULL)
"""Every reason a gossiped member is refused (the ``reason`` label's values)."""

_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")


def _host_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP literal ``host`` names, or None if it is not one (a hostname)."""
    if host.startswith("[") and host.endswith("]"):
        try:
            return ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return None
    try:
        return ipaddress.IPv4Address(host)
    except ValueError:
        return None


def _is_hostname(host: str) -> bool:
    if not 1 <= len(host) <= 253:
        return False
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    # an all-digit last label would make "1.2.3" or "999.1.1.1" pass as a name
    return all(_LABEL.match(x) for x in labels) and not labels[-1].isdigit()


@lru_cache(maxsize=64)
def _networks(
    blocks: tuple[str, ...],
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(b, strict=False) for b in blocks)


def check_address(
    address: str, *, require_port: bool = True, allowed_networks: Sequence[str] = ()
) -> str | None:
    """Whether a gossiped ``address`` may be held and dialed.

    Args:
        address: the address as gossiped.
        require_port: refuse a bare host without ``:port``.
        allowed_networks: CIDR blocks the host must be an IP literal inside;
            empty allows any host.

    Returns:
        None if it is acceptable, else :data:`BAD_ADDRESS` or :data:`NETWORK`.
    """
    if not address or len(address) > MAX_ADDRESS_CHARS or not address.isascii():
        return BAD_ADDRESS
    host, sep, port = address.rpartition(":")
    if not sep or (":" in host and not host.startswith("[")):
        # no colon at all, or an unbracketed IPv6 literal (its port is ambiguous)
        if require_port or ":" in address:
            return BAD_ADDRESS
        host, port = address, ""
    elif not (port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535):
        return BAD_ADDRESS
    ip = _host_ip(host)
    if ip is None and not _is_hostname(host):
        return BAD_ADDRESS
    if allowed_networks and (
        ip is None or not any(ip in n for n in _networks(tuple(allowed_networks)))
    ):
        return NETWORK
    return None


def check_node_id(node_id: str) -> str | None:
    """Whether a gossiped ``node_id`` may be held.

    Returns:
        None if it is acceptable, else :data:`BAD_NODE_ID`.
    """
    if not is_node_id(node_id):  # is_node_id caps the length at MAX_NODE_ID_CHARS
        return BAD_NODE_ID
    return None
