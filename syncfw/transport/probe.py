"""Liveness probes (SWIM): what a probe answers, and what serves one.

A direct probe asks a peer "are you there?" and is answered at once. An
indirect probe (memberlist's ping-req) asks a helper to probe a target on the
caller's behalf, so a cut between the caller and the target alone is told
apart from the target being gone. Transports carry probes
(``syncfw.v1.Sync/Probe`` on gRPC, a direct call in memory); the mesh decides
what they mean.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

__all__ = ["MAX_TARGET_CHARS", "ProbeAnswer", "ProbeHandler"]

MAX_TARGET_CHARS = 256  # a probe target is a gossiped address: the same cap


@dataclass(frozen=True, slots=True)
class ProbeAnswer:
    """How a probe went.

    Attributes:
        reachable: direct: the peer answered; indirect: the helper reached the target.
        node_id: the node id of whoever answered ("" when nobody did).
        reason: why it was not reached.
    """

    reachable: bool
    node_id: str = ""
    reason: str = ""


ProbeHandler = Callable[[str, float], Awaitable[ProbeAnswer]]
"""Serves one probe: ``(target, timeout_s)``; an empty target is a direct probe."""
