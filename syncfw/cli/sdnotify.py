"""systemd readiness: ``sd_notify`` in a few lines, no dependency.

Under systemd with ``Type=notify`` the service manager sets ``NOTIFY_SOCKET``
(a path, or ``@name`` for an abstract socket); the node sends ``READY=1`` once
it listens and ``STOPPING=1`` when it begins to stop. Without the variable
nothing is sent. A failed send is a WARNING, never a failed start.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["notify"]

log = logging.getLogger("syncfw.cli.sdnotify")


def notify(message: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``message`` (``"READY=1\\nSTATUS=..."``) to systemd, if it listens.

    Returns:
        True if it was sent; False without ``NOTIFY_SOCKET`` or when sending failed.
    """
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("cannot notify systemd at %r: %s", address.replace("\0", "@"), exc)
        return False
    return True
