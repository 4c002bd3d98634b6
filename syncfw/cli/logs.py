"""Logging for the ``syncfw`` command: syncfw's loggers at the chosen level, the rest at WARNING.

Invariants:

1. ``--log-level`` (INFO by default) and ``-v`` (DEBUG) set the level of the
   ``syncfw`` logger tree only; the root logger stays at WARNING, so a DEBUG run
   shows syncfw's lines, not aiosqlite's or grpc's.
2. One handler, on stderr; stdout stays for what a verb prints.
3. ``--log-format json`` writes one JSON object per line (``ts`` as Unix seconds,
   ``time`` as ISO 8601 UTC, ``level``, ``logger``, ``message``, and ``exc`` with
   the traceback text when there is one).
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import IO

__all__ = ["JsonFormatter", "configure_logging"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": round(record.created, 6),
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(
    level: str = "INFO", fmt: str = "text", *, verbose: bool = False, stream: IO[str] | None = None
) -> logging.Handler:
    """Set up the command's logging (replacing what an earlier call set up).

    Args:
        level: the ``syncfw`` loggers' level name.
        fmt: ``"text"`` or ``"json"``.
        verbose: ``-v``: DEBUG for the ``syncfw`` loggers, whatever ``level`` says.
        stream: where lines go (stderr by default).

    Returns:
        The handler installed on the root logger.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_syncfw_cli", False)]:
        root.removeHandler(old)
    handler._syncfw_cli = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("syncfw").setLevel(logging.DEBUG if verbose else level.upper())
    return handler
