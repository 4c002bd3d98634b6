"""Drive real Yjs clients (``peer.mjs``, npm ``yjs``) from Python, for tests and bench.

``YjsPeer()`` starts one ``node`` process holding any number of ``Y.Doc``
clients; each call is one JSON line each way. :func:`unavailable` says why it
cannot run (no ``node``, or ``npm ci --prefix tests/yjs`` not run).
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def unavailable() -> str | None:
    """Why real Yjs cannot run here, or None if it can."""
    if shutil.which("node") is None:
        return "node is not installed: the real-Yjs interop tests need Node.js"
    if not (HERE / "node_modules" / "yjs").is_dir():
        return "npm yjs is not installed: run `npm ci --prefix tests/yjs` (make test does)"
    return None


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


class YjsPeer:
    """One node process of Yjs clients (see ``peer.mjs`` for the requests)."""

    def __init__(self) -> None:
        why = unavailable()
        if why is not None:
            raise RuntimeError(why)
        self._proc = subprocess.Popen(
            ["node", str(HERE / "peer.mjs")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=HERE,
        )

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the Yjs peer exited (code {self._proc.poll()})")
        answer: dict[str, Any] = json.loads(line)
        if not answer.pop("ok"):
            raise RuntimeError(f"Yjs peer failed on {op}: {answer['error']}")
        return answer

    # Shorthands -----------------------------------------------------------

    def new(self, cid: str, client: int | None = None) -> None:
        self.call("new", id=cid, **({} if client is None else {"client": client}))

    def edits(self, cid: str, n: int, seed: int) -> None:
        self.call("edits", id=cid, n=n, seed=seed)

    def insert(self, cid: str, index: int, text: str) -> None:
        self.call("insert", id=cid, index=index, text=text)

    def outbox(self, cid: str) -> list[bytes]:
        return [unb64(u) for u in self.call("outbox", id=cid)["updates"]]

    def sync(self, src: str, dst: str) -> None:
        self.call("sync", **{"from": src, "to": dst})

    def apply(self, cid: str, update: bytes) -> None:
        self.call("apply", id=cid, update=b64(update))

    def state_vector(self, cid: str) -> bytes:
        return unb64(self.call("sv", id=cid)["sv"])

    def state(self, cid: str) -> bytes:
        return unb64(self.call("state", id=cid)["update"])

    def state_v2(self, cid: str) -> bytes:
        return unb64(self.call("state_v2", id=cid)["update"])

    def to_v2(self, update: bytes) -> bytes:
        return unb64(self.call("to_v2", update=b64(update))["update"])

    def content(self, cid: str) -> dict[str, Any]:
        return dict(self.call("content", id=cid)["content"])

    def merge(self, updates: list[bytes]) -> dict[str, Any]:
        """Yjs's own merge of ``updates``, read through a fresh ``Y.Doc``."""
        return dict(self.call("merge", updates=[b64(u) for u in updates])["content"])

    def stream(self, cid: str, n: int, seed: int, client: int) -> list[bytes]:
        return [unb64(u) for u in self.call("stream", id=cid, n=n, seed=seed, client=client)["updates"]]

    def close(self) -> None:
        if self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()

    def __enter__(self) -> YjsPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
